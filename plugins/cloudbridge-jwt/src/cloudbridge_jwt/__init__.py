"""CloudBridge JWT auth provider."""
