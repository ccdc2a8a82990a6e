"""Happy Eyeballs for transports: each candidate starts a head start after the previous one.

The first to connect and authenticate wins; a candidate that fails starts the next at
once; the others are cancelled, and any that succeeded too are closed. A candidate whose
endpoint presents a certificate the client does not trust ends the race with that error
(unless ``transport.fallback_on_certificate_error``): that is an attack or a
misconfiguration, and another transport to the same relay would only hide it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from cloudbridge_core.breaker import CircuitBreaker
from cloudbridge_core.client.connection import (
    FIRST_TIME,
    Comeback,
    RelayConnection,
    attempt,
    transport_order,
)
from cloudbridge_core.client.tokens import TokenSupply
from cloudbridge_core.config import Config
from cloudbridge_core.errors import (
    AuthError,
    CircuitOpen,
    CloudBridgeError,
    TlsVerificationFailed,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.plugins import Plugins
from cloudbridge_core.providers import ProviderSpec, Transport

log = get_logger("relay.link")

Candidate = tuple[str, ProviderSpec[Transport]]
Attempt = asyncio.Task[RelayConnection]


async def connect(config: Config, plugins: Plugins) -> RelayConnection:
    """Connect to the relay over the best transport that works (one-shot: no watching).

    A relay pacing its admissions is waited for while the slot it gives comes within
    ``transport.connect_timeout``; a later one is raised, with when to come back.
    """
    token = await TokenSupply(config, plugins).token()  # before any network attempt
    head_start = config.settings.transport.race_head_start
    patience = config.settings.transport.connect_timeout
    comeback = FIRST_TIME
    while True:
        try:
            connection, _ = await race(
                config, transport_order(config, plugins), head_start, token, comeback=comeback
            )
        except CloudBridgeError as error:
            wait = error.retry_after
            if wait is None or isinstance(error, CircuitOpen) or wait > patience:
                raise
            patience -= wait
            comeback = Comeback(slot=error.slot)
            await asyncio.sleep(wait)
            continue
        return connection


async def race(
    config: Config,
    candidates: list[Candidate],
    head_start: float,
    token: str,
    failed: Callable[[str, CloudBridgeError], None] | None = None,
    breakers: Mapping[str, CircuitBreaker] | None = None,
    comeback: Comeback = FIRST_TIME,
) -> tuple[RelayConnection, str]:
    """The first candidate to connect, and why it was chosen; ``failed`` hears of the others.

    With ``breakers`` (by transport), an endpoint that keeps failing is skipped at once
    (``circuit_open``) until its breaker lets a trial through. A relay that answers when to
    come back (it is pacing its admissions, or restarting) ends the race: it would give
    every transport the same answer; one that holds a candidate's hello for its turn
    (``queued``) is waited for without starting the others.
    """
    names: dict[Attempt, str] = {}
    failures: dict[str, CloudBridgeError] = {}
    winner: Attempt | None = None
    queued = asyncio.Event()  # a candidate's hello is held for its turn: it has connected
    try:
        for index, (name, spec) in enumerate(candidates):
            breaker = (breakers or {}).get(name)
            connecting = _guarded(breaker, config, name, spec, token, comeback, queued.set)
            names[asyncio.create_task(connecting)] = name
            last = index == len(candidates) - 1
            winner = await _first_success(names, failures, None if last else head_start, config)
            if winner is None and queued.is_set():  # another candidate would queue again
                winner = await _first_success(names, failures, None, config)
            if winner is not None:
                return winner.result(), _reason(names[winner], candidates, failures, config)
    finally:
        if failed is not None:
            for failed_name, error in failures.items():
                failed(failed_name, error)
        await _discard([task for task in names if task is not winner])
    raise next(reversed(failures.values()))


async def _guarded(
    breaker: CircuitBreaker | None,
    config: Config,
    name: str,
    spec: ProviderSpec[Transport],
    token: str,
    comeback: Comeback,
    on_queued: Callable[[], None],
) -> RelayConnection:
    if breaker is None:
        return await attempt(config, name, spec, token, comeback, on_queued)
    async with breaker.guard():
        return await attempt(config, name, spec, token, comeback, on_queued)


async def _first_success(
    names: dict[Attempt, str],
    failures: dict[str, CloudBridgeError],
    wait_at_most: float | None,
    config: Config,
) -> Attempt | None:
    """Wait up to ``wait_at_most`` s (None: until all end) for a success; None if one fails."""
    running = {task for task in names if not task.done()}
    while running:
        done, running = await asyncio.wait(
            running, timeout=wait_at_most, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            return None  # the head start is over
        for task in done:
            error = task.exception()
            if error is None:
                return task
            if isinstance(error, AuthError) or not isinstance(error, CloudBridgeError):
                raise error  # a refused token is refused on every transport alike
            if error.retry_after is not None and not isinstance(error, CircuitOpen):
                raise error  # the relay's own answer: when to come back
            failures[names[task]] = error
            transport = config.settings.transport
            if isinstance(error, TlsVerificationFailed) and not (
                transport.fallback_enabled and transport.fallback_on_certificate_error
            ):
                log.error(
                    "transport_certificate_rejected",
                    transport=names[task],
                    code=error.code,
                    reason=error.message,
                )
                raise TlsVerificationFailed(
                    f"{names[task]}: {error.message}",
                    hint=error.hint
                    or "check relay.tls.ca_file; transport.fallback_on_certificate_error: true"
                    " lets the client use another transport meanwhile",
                ) from error
            log.warning(
                "transport_failed", transport=names[task], code=error.code, reason=error.message
            )
            if not transport.fallback_enabled:
                raise error
        if wait_at_most is not None:
            return None  # start the next candidate now rather than after the head start
    return None


async def _discard(tasks: list[Attempt]) -> None:
    for task in tasks:
        task.cancel()
    results: list[Awaitable[object]] = []
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, RelayConnection):
            results.append(outcome.aclose())
    await asyncio.gather(*results, return_exceptions=True)


def _reason(
    name: str, candidates: list[Candidate], failures: dict[str, CloudBridgeError], config: Config
) -> str:
    if config.settings.transport.mode != "auto":
        return f"transport.mode is {name}"
    failed = "; ".join(f"{n} failed: {e.message}" for n, e in failures.items())
    if name == candidates[0][0]:
        return "preferred transport"
    ahead = [n for n, _ in candidates[: [n for n, _ in candidates].index(name)]]
    slower = [n for n in ahead if n not in failures]
    parts = [failed] if failed else []
    if slower:
        parts.append(f"{', '.join(slower)} did not answer within the head start")
    return f"fallback: {'; '.join(parts)}"
