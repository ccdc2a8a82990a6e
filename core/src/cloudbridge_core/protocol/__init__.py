"""Sans-IO protocol code: bytes in, events out; no sockets and no asyncio here."""
