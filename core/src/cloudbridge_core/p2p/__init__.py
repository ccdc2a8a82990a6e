"""The peer-to-peer mesh: this device's identity, the tenant's peers, paths through NAT
and the QUIC sessions carried over them."""
