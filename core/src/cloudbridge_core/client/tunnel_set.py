"""The tunnels of the config's ``tunnels:`` list, kept in step with reloads.

A tunnel is known by its name (by default ``tunnel-<local_port>``). When a reload changes
the list, each tunnel is handled on its own and the others are not touched:

- a new one starts listening; if its address cannot be had, an error names it and its
  address, it is counted as a failure, and the rest of the reload still applies;
- a removed one stops listening; connections already open through it go on until they
  end (a stop of the client drains them like any other);
- a changed target is taken by the same listener for connections accepted from then on
  (open ones keep theirs, and no connection is refused in between);
- a changed local address gets a new listener, and the old one stops as if removed.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterable, MutableSequence, Sequence
from typing import Any

from cloudbridge_core.client.metrics import ClientMetrics
from cloudbridge_core.client.tunnel import ConnectionLimit, ConnectionSource, Tunnel, TunnelSpec
from cloudbridge_core.config import Config
from cloudbridge_core.errors import AddressInUse, UsageError
from cloudbridge_core.log import get_logger

log = get_logger("tunnel")


class TunnelSet:
    """The config file's tunnels, and the one given by flags (which no reload touches).

    ``listed`` is the client's list of every running tunnel (peer tunnels too), updated in
    place as file tunnels come and go.
    """

    def __init__(
        self,
        connection: ConnectionSource,
        buffer_size: int,
        metrics: ClientMetrics,
        listed: MutableSequence[Any],
        limit: ConnectionLimit,
    ) -> None:
        self._connection = connection
        self._limit = limit
        self._buffer_size = buffer_size
        self._metrics = metrics
        self._listed = listed
        self._tunnels: dict[str, Tunnel] = {}
        self._fixed: list[Tunnel] = []
        #: tunnels a reload removed: their open connections still run, and still count
        self.retired: list[Tunnel] = []
        #: tunnels a reload could not start (their address was not free, or not local)
        self.failures = 0

    def all(self) -> list[Tunnel]:
        """Every tunnel of the set, retired ones included (their bytes stay counted)."""
        return [*self._tunnels.values(), *self._fixed, *self.retired]

    async def start(self, specs: Sequence[TunnelSpec], fixed: Sequence[TunnelSpec] = ()) -> None:
        """Start the file's tunnels (``specs``) and the flags' (``fixed``); raises
        ``AddressInUse`` naming the first whose address is taken, ``UsageError`` for one
        that cannot listen otherwise (or a name used twice), after stopping those already
        started."""
        for spec, from_file in [*((s, True) for s in _unique(specs)), *((s, False) for s in fixed)]:
            tunnel = self._tunnel(spec)
            try:
                await tunnel.start()
            except OSError as exc:
                await self.aclose(0.0)
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        f"{spec.local} is already in use: tunnel {spec.key!r} cannot listen there",
                        hint=f"stop what listens on port {spec.local_port}, or choose another"
                        + (" local_port in tunnels:" if from_file else " --local-port"),
                    ) from None
                raise UsageError(_cannot_listen(spec, exc)) from None
            if from_file:
                self._tunnels[spec.key] = tunnel
            else:
                self._fixed.append(tunnel)
            self._listed.append(tunnel)

    async def follow(self, config: Config) -> list[str]:
        """A reload subscriber: the new connection limit, then :meth:`apply` with the new
        config's tunnels."""
        performance = config.settings.performance
        done: list[str] = []
        if performance.max_concurrent_tunnels != self._limit.maximum:
            self._limit.maximum = performance.max_concurrent_tunnels
            done.append("performance.max_concurrent_tunnels")
        specs = [TunnelSpec.of(entry) for entry in config.settings.tunnels]
        return done + await self.apply(specs, performance.buffer_size)

    async def apply(self, specs: Sequence[TunnelSpec], buffer_size: int) -> list[str]:
        """Bring the running tunnels in line with ``specs``; returns what was done."""
        try:
            wanted = {spec.key: spec for spec in _unique(specs)}
        except UsageError as error:
            log.error("tunnels_not_applied", reason=error.message, note="the tunnels stay")
            return []
        done: list[str] = []
        if buffer_size != self._buffer_size:
            self._buffer_size = buffer_size
            for tunnel in [*self._tunnels.values(), *self._fixed]:
                tunnel.buffer_size = buffer_size
            done.append("performance.buffer_size")
        for key in [key for key in self._tunnels if key not in wanted]:
            await self._retire(self._tunnels.pop(key))
            done.append(f"tunnel {key} stopped")
        for key, spec in wanted.items():
            running = self._tunnels.get(key)
            if running is None:
                if await self._start_new(spec):
                    done.append(f"tunnel {key} started")
            elif running.spec == spec:
                continue
            elif (running.spec.local_host, running.spec.local_port) == (
                spec.local_host,
                spec.local_port,
            ):
                running.retarget(spec)
                log.info("tunnel_retargeted", tunnel=key, local=spec.local, target=spec.target)
                done.append(f"tunnel {key} now to {spec.target}")
            else:
                await self._retire(self._tunnels.pop(key))
                if await self._start_new(spec):
                    done.append(f"tunnel {key} moved to {spec.local}")
        return done

    async def aclose(self, drain: float) -> None:
        """Stop every tunnel of the set, giving open connections up to ``drain`` seconds."""
        tunnels = self.all()
        self._tunnels.clear()
        self._fixed.clear()
        self.retired.clear()
        await asyncio.gather(*(tunnel.aclose(drain) for tunnel in tunnels))

    def _tunnel(self, spec: TunnelSpec) -> Tunnel:
        return Tunnel(spec, self._connection, self._buffer_size, self._metrics, self._limit)

    async def _start_new(self, spec: TunnelSpec) -> bool:
        tunnel = self._tunnel(spec)
        try:
            await tunnel.start()
        except OSError as exc:
            self.failures += 1
            self._metrics.tunnel_listen_failures.inc()
            log.error(
                "tunnel_not_started",
                tunnel=spec.key,
                local=spec.local,
                reason=_cannot_listen(spec, exc),
            )
            return False
        self._tunnels[spec.key] = tunnel
        self._listed.append(tunnel)
        log.info("tunnel_started", tunnel=spec.key, local=spec.local, target=spec.target)
        return True

    async def _retire(self, tunnel: Tunnel) -> None:
        await tunnel.stop_listening()
        self._listed.remove(tunnel)
        self.retired.append(tunnel)
        log.info(
            "tunnel_stopped",
            tunnel=tunnel.spec.key,
            local=tunnel.spec.local,
            open_connections=tunnel.statistics.active_connections,
            note="open connections go on until they end",
        )


def _unique(specs: Iterable[TunnelSpec]) -> list[TunnelSpec]:
    seen: dict[str, TunnelSpec] = {}
    for spec in specs:
        if spec.key in seen:
            raise UsageError(
                f"two tunnels are named {spec.key!r} (local {seen[spec.key].local} and"
                f" {spec.local}): give each entry of tunnels: its own name"
            )
        seen[spec.key] = spec
    return list(seen.values())


def _cannot_listen(spec: TunnelSpec, exc: OSError) -> str:
    return f"tunnel {spec.key!r} cannot listen on {spec.local}: {exc.strerror or exc}"
