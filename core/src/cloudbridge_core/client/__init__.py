"""The client: a session with the relay, and the tunnels that use it."""
