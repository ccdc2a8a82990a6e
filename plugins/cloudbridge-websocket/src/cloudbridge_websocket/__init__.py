"""CloudBridge WebSocket transport."""
