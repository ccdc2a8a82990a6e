"""Helpers for testing CloudBridge plugins: throwaway TLS, and (later) conformance kits."""
