"""Relay state shared by the relays of a cluster: one small interface
(:class:`~cloudbridge_core.relay.cluster.store.ClusterStore`), kept in memory for a relay
alone (:mod:`.memory`) or in Redis for several (:mod:`.redis_store`)."""
