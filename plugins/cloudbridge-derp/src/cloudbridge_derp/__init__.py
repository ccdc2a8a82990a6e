"""CloudBridge DERP: the path that always works, through the relay, sealed end to end."""
