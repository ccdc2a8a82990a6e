"""The core's built-in transport and the session machinery transports share."""
