"""CloudBridge TURN: a relayed UDP path when the peers' NATs will not let them meet."""
