"""CloudBridge auth provider ``oidc``."""
