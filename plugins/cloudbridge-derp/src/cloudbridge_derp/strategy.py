"""DERP: packets to a peer go to the relay on this client's DERP channel, addressed by the
peer's key; the relay forwards them on the peer's channel. Every packet is sealed for the
peer (X25519, ChaCha20-Poly1305) before it leaves, so the relay carries only ciphertext.

One channel (a stream of the client's relay session) serves every peer; it is opened on
first use and again after it ends (a reconnection, a relay restart).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib

from cloudbridge_core.api import (
    CloudBridgeError,
    P2PConnectionFailed,
    PeerInfo,
    PeerPath,
    ProtocolViolation,
    SignalChannel,
    Stream,
    derp,
    get_logger,
)

log = get_logger("p2p.derp")

#: packets waiting for a slow reader beyond this many are dropped, as on any datagram path
MAX_QUEUED = 1024
#: queued in a peer's inbox when the relay says the peer has no DERP channel
GONE = b""


class DerpChannel:
    """The client's one DERP stream, its frames sorted by the key they come from."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._inboxes: dict[bytes, asyncio.Queue[bytes | None]] = {}
        self._writing = asyncio.Lock()
        self.closed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def subscribe(self, key: bytes) -> asyncio.Queue[bytes | None]:
        """A new inbox for packets from ``key`` (replacing an earlier path's)."""
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_QUEUED)
        self._inboxes[key] = inbox
        return inbox

    def unsubscribe(self, key: bytes, inbox: asyncio.Queue[bytes | None]) -> None:
        if self._inboxes.get(key) is inbox:
            del self._inboxes[key]

    async def send(self, key: bytes, sealed: bytes) -> None:
        frame = derp.encode(derp.Frame(derp.FrameType.SEND_PACKET, key, sealed))
        async with self._writing:
            await self._stream.write(frame)

    async def _read(self) -> None:
        reader = derp.FrameReader()
        try:
            while data := await self._stream.read():
                for frame in reader.feed(data):
                    self._dispatch(frame)
        except CloudBridgeError as error:
            log.info("derp_channel_ended", reason=error.message)
        finally:
            self.closed.set()
            for inbox in self._inboxes.values():
                _put(inbox, None)

    def _dispatch(self, frame: derp.Frame) -> None:
        inbox = self._inboxes.get(frame.key)
        if frame.type is derp.FrameType.RECV_PACKET and inbox is not None:
            _put(inbox, frame.payload)
        elif frame.type is derp.FrameType.PEER_GONE and inbox is not None:
            _put(inbox, GONE)
        elif frame.type is derp.FrameType.RESTARTING:
            log.info("derp_relay_restarting")

    async def aclose(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._stream.aclose()


class DerpPath:
    kind = "derp"
    endpoint = "relay"

    def __init__(self, channel: DerpChannel, peer: PeerInfo, signal: SignalChannel) -> None:
        self._channel = channel
        self._key = base64.b64decode(peer.public_key)
        self._signal = signal
        self._inbox = channel.subscribe(self._key)
        self._heard = False
        self.name = peer.name

    async def send(self, datagram: bytes) -> None:
        if self._channel.closed.is_set():
            raise P2PConnectionFailed("the DERP channel to the relay has ended")
        await self._channel.send(self._key, self._signal.seal(datagram))

    async def receive(self) -> bytes:
        while True:
            sealed = await self._inbox.get()
            if sealed is None:
                raise P2PConnectionFailed("the DERP channel to the relay has ended")
            if sealed == GONE:
                if self._heard:  # it was there and left; before that it was still joining
                    raise P2PConnectionFailed(f"{self.name} is gone from the relay's DERP")
                continue
            try:
                packet = self._signal.open(sealed)
            except ProtocolViolation:
                log.warning("derp_packet_dropped", peer=self.name, reason="failed authentication")
                continue
            self._heard = True
            return packet

    async def aclose(self) -> None:
        self._channel.unsubscribe(self._key, self._inbox)


class DerpStrategy:
    def __init__(self) -> None:
        self._channel: DerpChannel | None = None
        self._opening = asyncio.Lock()

    async def connect(self, peer: PeerInfo, signal: SignalChannel) -> PeerPath:
        async with self._opening:
            if self._channel is None or self._channel.closed.is_set():
                try:
                    stream = await signal.open_relay_stream(derp.TARGET)
                except CloudBridgeError as error:
                    raise P2PConnectionFailed(f"no DERP channel: {error.message}") from error
                self._channel = DerpChannel(stream)
        return DerpPath(self._channel, peer, signal)


def _put(inbox: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    with contextlib.suppress(asyncio.QueueFull):
        inbox.put_nowait(item)
