"""Hot reload: keep a configuration current while a long-running command works.

The watcher observes the config file's *directory*, because editors and Kubernetes
ConfigMaps replace files atomically (a new inode, or a swapped ``..data`` symlink) and a
watch on the old inode would silently stop firing. SIGHUP forces a reload. A new file is
validated before anyone sees it: when it is invalid, the paths at fault are logged and
the configuration in force stays in force. So it does when the file is caught half-written
(written in place, it changes between two reads ``settle`` apart) or is empty (nothing but
blank lines and comments: a save truncated mid-way, not a wish for every default).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import watchfiles

from cloudbridge_core.config.changes import ConfigChanges
from cloudbridge_core.config.loader import Config
from cloudbridge_core.errors import ConfigError
from cloudbridge_core.log import get_logger

#: what a subscriber returns: what it applied (``["tunnels: started web"]``), for the log line
Applied = Iterable[str] | None
Subscriber = Callable[[Config], Awaitable[Applied] | Applied]

log = get_logger("config.reload")


class ConfigWatcher:
    """Reloads ``path`` with ``load`` on change or SIGHUP and hands new configs to subscribers.

    Use as ``async with ConfigWatcher(...) as watcher:``; ``current`` is always the config
    in force. ``load`` reads and validates, raising :class:`ConfigError` when invalid.
    """

    def __init__(
        self,
        path: Path,
        load: Callable[[], Config],
        initial: Config,
        *,
        debounce_ms: int = 100,
        force_polling: bool | None = None,
        settle: float = 0.075,
    ) -> None:
        self._path = path.absolute()
        self._load = load
        self.current = initial
        self._digest = self._read_digest()
        self._subscribers: list[Subscriber] = []
        self._debounce_ms = debounce_ms
        self._force_polling = force_polling
        self._settle = settle
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._signalled: set[asyncio.Task[bool]] = set()
        self.applied = 0
        self.rejected = 0
        self._attempted = asyncio.Condition()

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(config)`` (sync or async) after each successful reload; what it
        returns (what it applied) is listed in the ``reloaded`` log line."""
        self._subscribers.append(callback)

    async def wait_attempts(self, count: int) -> None:
        """Wait until ``count`` reloads have been attempted (applied or rejected) in total."""
        async with self._attempted:
            await self._attempted.wait_for(lambda: self.applied + self.rejected >= count)

    async def reload(self, reason: str) -> bool:
        """Reload now; return whether a new config was applied."""
        content = self._read()
        digest = _digest(content)
        if reason != "sighup" and digest == self._digest:
            return False
        try:
            if content is None:  # unreadable: load() reports why
                return await self._apply(reason, digest)
            await asyncio.sleep(self._settle)
            if self._read() != content:
                # digest not kept: the writer's last write brings another change to check
                return self._reject(reason, ["the file changed while being read (half-written?)"])
            if _is_blank(content):
                self._digest = digest
                return self._reject(reason, ["the file is empty (only blank lines or comments)"])
            return await self._apply(reason, digest)
        finally:
            async with self._attempted:
                self._attempted.notify_all()

    async def _apply(self, reason: str, digest: str | None) -> bool:
        try:
            config = self._load()
        except ConfigError as exc:
            self._digest = digest
            return self._reject(reason, [str(issue) for issue in exc.issues])
        self._digest = digest
        changes = ConfigChanges.between(self.current, config)
        self.current = config
        self.applied += 1
        if changes.restart_required:
            log.warning(
                "restart_required",
                keys=list(changes.restart_required),
                note="these take effect when the process restarts; the rest is applied now",
            )
        applied: list[str] = []
        for callback in self._subscribers:
            try:
                result = callback(config)
                if inspect.isawaitable(result):
                    result = await result
                applied.extend(result or ())
            except Exception:  # a subscriber's bug must not stop the others
                log.exception(
                    "subscriber_failed", subscriber=getattr(callback, "__qualname__", "?")
                )
        log.info("reloaded", reason=reason, path=str(self._path), applied=applied)
        return True

    async def __aenter__(self) -> ConfigWatcher:
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(ready))
        await ready.wait()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self, ready: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup, loop)
        try:
            watcher = watchfiles.awatch(
                self._path.parent,
                debounce=self._debounce_ms,
                step=20,
                stop_event=self._stop,
                force_polling=self._force_polling,
                recursive=False,
                yield_on_timeout=True,
                rust_timeout=200,
            )
            async for _changes in watcher:
                # the first (timeout) yield means the watch is armed
                ready.set()
                if _changes:
                    await self.reload("file_changed")
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            ready.set()

    def _reject(self, reason: str, errors: list[str]) -> bool:
        self.rejected += 1
        log.warning(
            "reload_rejected",
            reason=reason,
            path=str(self._path),
            errors=errors,
            note="the previous configuration stays in force",
        )
        return False

    def _on_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self.reload("sighup"))
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    def _read_digest(self) -> str | None:
        return _digest(self._read())

    def _read(self) -> bytes | None:
        try:
            return self._path.read_bytes()
        except OSError:
            return None


def _digest(content: bytes | None) -> str | None:
    return hashlib.sha256(content).hexdigest() if content is not None else None


def _is_blank(content: bytes) -> bool:
    lines = content.decode("utf-8", errors="replace").splitlines()
    return all(not line.strip() or line.lstrip().startswith("#") for line in lines)
