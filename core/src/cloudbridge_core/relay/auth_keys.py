"""The auth provider's keys seen from the relay: loaded at start-up in the background
(``/readyz`` waits for them), and reported in ``/metrics`` while the relay serves.

A provider that fetches its keys (a JWKS, OIDC discovery) implements
:class:`~cloudbridge_core.providers.KeyedAuthProvider`; others (a key file) are ready at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloudbridge_core.errors import CloudBridgeError
from cloudbridge_core.log import get_logger
from cloudbridge_core.providers import AuthKeyStatistics, AuthProvider, KeyedAuthProvider
from cloudbridge_core.retry import Backoff

if TYPE_CHECKING:
    from cloudbridge_core.relay.server import Relay

log = get_logger("relay")

#: how often a relay whose provider does not answer tries again (it also tries at each login)
RETRY = Backoff(initial_delay=1.0, multiplier=2.0, max_delay=60.0, jitter=0.5, max_retries=0)


def key_statistics(auth: AuthProvider) -> AuthKeyStatistics:
    if isinstance(auth, KeyedAuthProvider):
        return auth.statistics()
    return AuthKeyStatistics(loaded=True, stale=False, refresh_failures=0)


async def load_keys(auth: AuthProvider) -> None:
    """Until ``auth`` has its keys: try, log why not, back off, try again."""
    if not isinstance(auth, KeyedAuthProvider):
        return
    attempt = 0
    while True:
        try:
            await auth.load_keys()
        except CloudBridgeError as error:
            delay = RETRY.delay_for(attempt)
            log.warning(
                "auth_keys_not_loaded", code=error.code, reason=error.message, retry_in=delay
            )
            attempt += 1
            await asyncio.sleep(delay)
        else:
            log.info("auth_keys_loaded")
            return


class AuthKeysCollector(Collector):
    """The keys of the auth provider in force at each scrape (it changes on reload)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        keys = key_statistics(self._relay.auth)
        yield GaugeMetricFamily(
            "cloudbridge_relay_auth_keys_loaded",
            "1 when the auth provider has the keys to check tokens.",
            value=int(keys.loaded),
        )
        yield GaugeMetricFamily(
            "cloudbridge_relay_auth_keys_stale",
            "1 while the keys in use are past their refresh time because the identity"
            " provider does not answer (they are still used).",
            value=int(keys.stale),
        )
        yield CounterMetricFamily(
            "cloudbridge_relay_auth_key_fetch_failures",
            "Key or discovery fetches that failed or ran out of time.",
            value=keys.refresh_failures,
        )
