"""CloudBridge WireGuard overlay."""
