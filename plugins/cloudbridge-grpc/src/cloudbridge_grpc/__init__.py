"""CloudBridge gRPC transport."""
