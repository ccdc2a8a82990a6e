"""The L3 overlay, driven by the client: an address from the relay, the interface through
the selected overlay plugin, its peers following the mesh and the paths to them, names,
and the inbound filter."""
