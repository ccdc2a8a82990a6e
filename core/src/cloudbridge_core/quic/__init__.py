"""QUIC sessions with bounded buffers, shared by the QUIC transport and peer sessions."""
