"""Happy Eyeballs for transports and relays: each candidate starts a head start after the
previous one.

The first to connect and authenticate wins; a candidate that fails starts the next at
once; the others are cancelled, and any that succeeded too are closed. A candidate whose
endpoint presents a certificate the client does not trust ends the race with that error
(unless ``transport.fallback_on_certificate_error``): that is an attack or a
misconfiguration, and another transport to the same relay would only hide it.

With several relays (``relay.hosts``) each relay runs that race, the next one starting
``RELAY_STAGGER_SECONDS`` after the previous one (at once when it failed): a relay that is
down or black-holed costs the stagger, not its ``connect_timeout``. A relay named by a
name with several addresses (DNS round robin over a cluster, ``/etc/hosts``) is that many
relays: each address is raced on its own, families interleaved (RFC 8305), the
certificate checked against the name.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cloudbridge_core.breaker import CircuitBreaker
from cloudbridge_core.client.connection import (
    FIRST_TIME,
    Comeback,
    RelayConnection,
    attempt,
    relay_hosts,
    transport_order,
)
from cloudbridge_core.client.tokens import TokenSupply
from cloudbridge_core.config import Config
from cloudbridge_core.errors import (
    AuthError,
    CircuitOpen,
    CloudBridgeError,
    ConnectionTimeout,
    ServerUnavailable,
    TlsVerificationFailed,
    TransportError,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.plugins import Plugins, transport_port
from cloudbridge_core.providers import ProviderSpec, Transport

log = get_logger("relay.link")

Candidate = tuple[str, ProviderSpec[Transport]]
#: the hint of a failure where something answered, but not as a relay would
_NOT_A_RELAY = (
    "something answers there, but not as a CloudBridge relay: check relay.host and"
    " transport.{name}.port against what the relay prints when it starts"
)
Attempt = asyncio.Task[RelayConnection]
RelayRace = asyncio.Task[tuple[RelayConnection, str]]
#: the head start of each relay over the next in ``relay.hosts`` (Happy Eyeballs' 250 ms)
RELAY_STAGGER_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class RelayTarget:
    """One relay to dial: ``host`` (an address of ``server_name`` when that is set, which
    the relay's certificate must name), else the host as configured."""

    host: str
    server_name: str | None = None

    @property
    def label(self) -> str:
        """How errors, reasons and logs name it: ``name (address)`` for a name's address."""
        return self.host if self.server_name is None else f"{self.server_name} ({self.host})"


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
            connection, _ = await race_relays(
                config,
                relay_hosts(config.settings.relay),
                transport_order(config, plugins),
                head_start,
                token,
                comeback=comeback,
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
    host: str | None = None,
    server_name: str | None = None,
) -> tuple[RelayConnection, str]:
    """The first candidate to connect to ``host`` (default ``relay.host``; an address of
    ``server_name`` when that is set), and why it was chosen; ``failed`` hears of the others.

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
    host = host or config.settings.relay.host
    try:
        for index, (name, spec) in enumerate(candidates):
            breaker = (breakers or {}).get(name)
            connecting = _guarded(
                breaker, config, name, spec, token, comeback, queued.set, host, server_name
            )
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
    raise _summary(config, candidates, failures, RelayTarget(host, server_name).label)


async def race_relays(
    config: Config,
    hosts: Sequence[str],
    candidates: list[Candidate],
    head_start: float,
    token: str,
    failed: Callable[[str, CloudBridgeError], None] | None = None,
    breakers: Callable[[str], Mapping[str, CircuitBreaker]] | None = None,
    comeback: Comeback = FIRST_TIME,
) -> tuple[RelayConnection, str]:
    """The first of ``hosts`` whose :func:`race` ends in a session, and why; a name stands
    for each of its addresses (:func:`relay_targets`), one that does not resolve is a relay
    that failed.

    Each relay's race starts ``RELAY_STAGGER_SECONDS`` after the previous one, or as soon as
    that one failed; the first session wins and the other races are cancelled (a session
    they made too is closed). ``breakers`` gives each host's breakers by transport. A refused
    token or an untrusted certificate ends the whole race; a relay that says when to come
    back is only one relay: the others are still tried, and its answer is raised when none
    of them works. Raises one error naming the most useful cause and the relays tried.
    """
    resolved = await relay_targets(hosts, config.settings.transport.connect_timeout)
    targets = [target for found in resolved.values() if isinstance(found, list) for target in found]
    failures = {
        host: found for host, found in resolved.items() if isinstance(found, CloudBridgeError)
    }
    if len(targets) == 1 and not failures:  # one relay: its own race, with its own errors
        [only] = targets
        return await race(
            config,
            candidates,
            head_start,
            token,
            failed,
            breakers(only.host) if breakers else None,
            comeback,
            only.host,
            only.server_name,
        )
    if not targets and len(failures) == 1:  # the one name did not resolve
        raise next(iter(failures.values()))
    # the relays in their order, as reasons name them: a name's addresses, or the name
    labels = [
        label
        for host, found in resolved.items()
        for label in ([host] if isinstance(found, CloudBridgeError) else _labels_of(found))
    ]
    races: dict[RelayRace, str] = {}
    winner: RelayRace | None = None
    try:
        for index, target in enumerate(targets):
            racing = race(
                config,
                candidates,
                head_start,
                token,
                failed,
                breakers(target.host) if breakers else None,
                comeback,
                target.host,
                target.server_name,
            )
            races[asyncio.create_task(racing)] = target.label
            last = index == len(targets) - 1
            winner = await _first_relay(races, failures, None if last else RELAY_STAGGER_SECONDS)
            if winner is not None:
                connection, why = winner.result()
                return connection, _relay_reason(races[winner], labels, failures, why)
    finally:
        await _discard_races([task for task in races if task is not winner])
    raise _relays_summary(hosts, failures)


async def relay_targets(
    hosts: Sequence[str], within: float
) -> dict[str, list[RelayTarget] | CloudBridgeError]:
    """The relays to dial for each of ``hosts``, in order: an address as it is, a name as
    each of its addresses, or why it did not resolve (all names together, each within
    ``within`` s)."""
    found = await asyncio.gather(*(_resolved(host, within) for host in hosts))
    return dict(zip(hosts, found, strict=True))


def interleaved(addresses: Iterable[tuple[int, str]]) -> list[str]:
    """``(family, address)`` pairs as the resolver gave them (RFC 6724 order), without
    repeats, families alternating from the resolver's first (RFC 8305 section 4): a
    family that does not work costs one stagger, not one per address."""
    unique = list(dict.fromkeys(addresses))
    if not unique:
        return []
    first_family = unique[0][0]
    first = [address for family, address in unique if family == first_family]
    other = [address for family, address in unique if family != first_family]
    pairs = itertools.zip_longest(first, other)
    return [address for pair in pairs for address in pair if address is not None]


async def _resolved(host: str, within: float) -> list[RelayTarget] | CloudBridgeError:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [RelayTarget(host)]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except TimeoutError:
        return ConnectionTimeout(f"cannot resolve {host}: no answer within {within:g}s")
    except OSError as exc:
        return ServerUnavailable(f"cannot resolve {host}: {exc.strerror or exc}")
    found = interleaved((family, str(address[0])) for family, _, _, _, address in infos)
    if not found:
        return ServerUnavailable(f"cannot resolve {host}: it has no address")
    log.debug("relay_resolved", relay=host, addresses=found)
    return [RelayTarget(address, host) for address in found]


def _labels_of(targets: list[RelayTarget]) -> list[str]:
    return [target.label for target in targets]


async def _first_relay(
    races: dict[RelayRace, str],
    failures: dict[str, CloudBridgeError],
    wait_at_most: float | None,
) -> RelayRace | None:
    """Wait up to ``wait_at_most`` s (None: until all end) for a relay's session; None when
    the stagger is over or a relay failed (the next one starts at once)."""
    running = {task for task in races if not task.done()}
    while running:
        done, running = await asyncio.wait(
            running, timeout=wait_at_most, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            return None
        for task in done:
            error = task.exception()
            if error is None:
                return task
            if isinstance(error, AuthError | TlsVerificationFailed) or not isinstance(
                error, CloudBridgeError
            ):
                raise error  # the cluster shares its keys: another relay would say the same
            failures[races[task]] = error
            log.debug("relay_failed", relay=races[task], code=error.code, reason=error.message)
        if wait_at_most is not None:
            return None
    return None


async def _discard_races(tasks: list[RelayRace]) -> None:
    for task in tasks:
        task.cancel()
    results: list[Awaitable[object]] = []
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, tuple):
            results.append(outcome[0].aclose())
    await asyncio.gather(*results, return_exceptions=True)


def _relays_summary(
    hosts: Sequence[str], failures: dict[str, CloudBridgeError]
) -> CloudBridgeError:
    """One error for a race every relay lost: a relay's word on when to come back leads (the
    client waits as told), else the most useful cause; the relays tried are listed."""
    if not failures:
        return ServerUnavailable(f"no relay could be tried ({', '.join(hosts)})")
    paced = [
        (host, error)
        for host, error in failures.items()
        if error.retry_after is not None and not isinstance(error, CircuitOpen)
    ]
    ranked = paced or sorted(failures.items(), key=lambda item: _usefulness(item[1]))
    lead_host, lead = ranked[0]
    others = "; ".join(
        f"{host}: {_briefly(error)}" for host, error in failures.items() if host != lead_host
    )
    text = f"{lead_host}: {lead.message}" if lead_host not in lead.message else lead.message
    lead.message = f"no relay answered ({', '.join(hosts)}): {text}" + (
        f" (also {others})" if others else ""
    )
    lead.args = (lead.message,)
    return lead


def _relay_reason(
    host: str, hosts: Sequence[str], failures: dict[str, CloudBridgeError], why: str
) -> str:
    ahead = list(hosts[: list(hosts).index(host)])
    parts = [f"{h} failed: {_briefly(failures[h])}" for h in ahead if h in failures]
    slower = [h for h in ahead if h not in failures]
    if slower:
        parts.append(f"{', '.join(slower)} did not answer within {RELAY_STAGGER_SECONDS:g}s")
    return f"relay {host}" + (f" ({'; '.join(parts)})" if parts else "") + f"; {why}"


async def _guarded(
    breaker: CircuitBreaker | None,
    config: Config,
    name: str,
    spec: ProviderSpec[Transport],
    token: str,
    comeback: Comeback,
    on_queued: Callable[[], None],
    host: str,
    server_name: str | None,
) -> RelayConnection:
    if breaker is None:
        return await attempt(config, name, spec, token, comeback, on_queued, host, server_name)
    async with breaker.guard():
        return await attempt(config, name, spec, token, comeback, on_queued, host, server_name)


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
            # debug: when all fail, the race's error sums them up; when one wins, its reason
            log.debug(
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


def _summary(
    config: Config, candidates: list[Candidate], failures: dict[str, CloudBridgeError], host: str
) -> CloudBridgeError:
    """One error for a race every candidate lost, naming the most useful cause: nothing
    listening anywhere says "is the relay running?"; otherwise the failure that got
    furthest (something answered, but not as a relay would) leads, with the others after it.
    """
    if not failures:  # every candidate was skipped: nothing was tried
        return ServerUnavailable("no transport to the relay could be tried")
    refused = {name: error for name, error in failures.items() if _refused(error)}
    if len(failures) == 1 and not refused:
        [(name, only)] = failures.items()
        error = _with_reason(only, name)
        if _usefulness(only) == 0 and error.hint is None:
            error.hint = _NOT_A_RELAY.format(name=name)
        return error
    if refused and all(
        name in refused or isinstance(error, ConnectionTimeout) for name, error in failures.items()
    ):
        ports = [
            f"{transport_port(name, config.data)} ({name})"
            for name, _ in candidates
            if name in refused
        ]
        waited = [name for name in failures if name not in refused]
        also = f"; {', '.join(waited)} got no answer" if waited else ""
        where = f"{host} port{'s' if len(ports) > 1 else ''} {', '.join(ports)}"
        nothing = ServerUnavailable(
            f"nothing listens at {where}{also} — is the relay running?",
            hint="start it (cloudbridge relay serve), or check relay.host and"
            " transport.<name>.port against what the relay prints when it starts",
        )
        nothing.__cause__ = next(iter(refused.values()))  # ranks it as a refusal among relays
        return nothing
    ranked = sorted(failures.items(), key=lambda item: _usefulness(item[1]))
    lead_name, lead = ranked[0]
    others = "; ".join(f"{name}: {_briefly(error)}" for name, error in ranked[1:])
    summary = _with_reason(lead, lead_name)
    if _usefulness(lead) == 0 and lead.hint is None:
        summary.hint = _NOT_A_RELAY.format(name=lead_name)
    if others:
        summary.message = f"{summary.message} (also {others})"
    return summary


def _usefulness(error: CloudBridgeError) -> int:
    """Lower is more useful: something answered (a wrong port, a proxy), then timeouts
    (a filter), then refusals (nothing there)."""
    if _refused(error):
        return 3
    if isinstance(error, ConnectionTimeout | CircuitOpen):
        return 2
    if isinstance(error, TransportError | ServerUnavailable):  # a reset, a bad handshake
        return 0
    return 1


def _briefly(error: CloudBridgeError) -> str:
    if _refused(error):
        return "refused"
    if isinstance(error, ConnectionTimeout):
        return "no answer in time"
    return _described(error)


def _refused(error: CloudBridgeError) -> bool:
    cause: BaseException | None = error
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        ):
            return True
        cause = cause.__cause__ or cause.__context__
    return isinstance(error, ServerUnavailable) and "refused" in error.message


_CLOSED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def _described(error: CloudBridgeError) -> str:
    """The error's message, never with an empty reason (``cannot connect to h:p: ``)."""
    text = error.message.rstrip()
    cause = error.__cause__ or error.__context__
    if isinstance(cause, _CLOSED) and cause.strerror and text.endswith(cause.strerror):
        # a reset reads the same whether it came during the TCP or the TLS handshake
        text = text.removesuffix(cause.strerror).rstrip()
    if text and not text.endswith(":"):
        return text
    if isinstance(cause, ConnectionResetError | BrokenPipeError):
        why = "the connection was reset"
    elif isinstance(cause, EOFError | ConnectionAbortedError) or cause is None:
        why = "the connection was closed before the handshake finished"
    else:
        why = str(cause) or type(cause).__name__
    return f"{text} {why}" if text else why


def _with_reason(error: CloudBridgeError, name: str) -> CloudBridgeError:
    """``error`` with its transport named and a reason it never lacks."""
    text = _described(error)
    if name not in text.lower():
        text = f"{name}: {text}"
    error.message = text
    error.args = (text,)
    return error


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
