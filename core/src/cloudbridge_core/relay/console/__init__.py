"""The relay's web console (``server.console``, docs/console.md).

Served by the relay itself, on its own port (loopback unless TLS is configured), to holders
of a token with ``relay:admin``: each sees and changes its own tenant only. Pages are
rendered on the server (they read without JavaScript); a small script refreshes their live
parts. The same data is JSON under ``/api/v1/``, described in ``schemas/console/``.
"""
