"""The relay: authenticated sessions, tunnel streams, egress policy, its own state."""
