"""CloudBridge QUIC transport."""
