"""CloudBridge Pushgateway exporter."""
