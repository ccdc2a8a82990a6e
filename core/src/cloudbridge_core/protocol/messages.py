"""Control messages and stream-open headers, sans-IO.

Each message is a JSON object preceded by its length (4 bytes, big-endian); its shape is
``schemas/protocol/messages.schema.json``, checked on every decode because the bytes come
from the network. The control stream (the first stream a client opens) carries hello →
welcome or error (a relay pacing its admissions may first answer ``queued``), then
ping/pong, refresh → refreshed or refresh_failed (a fresh token before the current one
expires), and goaway when the relay is about to restart; every
other stream starts with ``open`` (or ``peer_splice``), answered by ``accept`` or
``reject``, after which raw bytes flow; or with ``peer_ticket``, answered by ``ticket`` or
``reject``, after which it ends.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from typing import Any, ClassVar, Generic, TypeVar

from jsonschema import Draft202012Validator

from cloudbridge_core.errors import ProtocolViolation

PROTOCOL_VERSION = 1
LENGTH = struct.Struct("!I")
#: largest message the relay accepts; a hello with a large token fits (a security limit)
MAX_MESSAGE_SIZE = 16 * 1024
#: largest message a client accepts from its relay: a tenant's peer list, certificates included
MAX_RELAY_MESSAGE_SIZE = 1024 * 1024
#: largest message the relay accepts on a session's control stream: a ``mesh_report``,
#: which a client cuts to fit (a security limit: the relay keeps one per member)
MAX_CONTROL_MESSAGE_SIZE = 64 * 1024
#: the capability a client offers and a relay takes for ``mesh_report``
MESH_REPORT = "mesh_report"
#: the capability of a client that reads the welcome's ``degraded`` (older clients refuse a
#: welcome with a field they do not know)
DEGRADED = "degraded"
#: in ``degraded``: the relay's cluster store (Redis) cannot be reached
CLUSTER_BACKEND = "cluster_backend"


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    token: str = field(repr=False)
    client_version: str
    capabilities: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION
    #: the session this client lost on this relay, for the relay to close if it still holds it
    replaces: str = ""
    #: the slot a relay pacing its admissions reserved for this client (``error.slot``)
    slot: str = ""


@dataclass(frozen=True)
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    session_id: str
    tenant_id: str
    heartbeat_interval_seconds: float
    server_time: float
    #: what the relay takes of what the hello offered (``mesh_report``); left out for a
    #: client that offered nothing it could name (older clients know no such field)
    capabilities: tuple[str, ...] | None = None
    #: what the relay cannot do now while it serves this session (``cluster_backend``); left
    #: out when nothing is degraded, by older relays, and for a client that did not offer
    #: ``degraded``
    degraded: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ErrorMessage:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    #: when to try again, from a relay pacing its admissions (0: no advice)
    retry_in_seconds: float = 0.0
    #: the slot reserved for this client at that time, to present in its next hello
    slot: str = ""


@dataclass(frozen=True)
class Queued:
    """Before welcome: the relay holds the hello until the client's turn, this far away."""

    TYPE: ClassVar[str] = "queued"
    wait_seconds: float


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    nonce: int


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    nonce: int


@dataclass(frozen=True)
class Open:
    TYPE: ClassVar[str] = "open"
    target: str


@dataclass(frozen=True)
class Accept:
    TYPE: ClassVar[str] = "accept"


@dataclass(frozen=True)
class Reject:
    TYPE: ClassVar[str] = "reject"
    code: str
    message: str


@dataclass(frozen=True)
class Goaway:
    TYPE: ClassVar[str] = "goaway"
    reason: str
    reconnect_in_seconds: float


@dataclass(frozen=True)
class Refresh:
    TYPE: ClassVar[str] = "refresh"
    token: str = field(repr=False)


@dataclass(frozen=True)
class Refreshed:
    TYPE: ClassVar[str] = "refreshed"
    expires_at: float


@dataclass(frozen=True)
class RefreshFailed:
    TYPE: ClassVar[str] = "refresh_failed"
    code: str
    message: str


@dataclass(frozen=True)
class MeshChallenge:
    """The key a session's ``mesh_join`` proves possession of the device key against."""

    TYPE: ClassVar[str] = "mesh_challenge"
    key: str


@dataclass(frozen=True)
class MeshJoin:
    TYPE: ClassVar[str] = "mesh_join"
    name: str
    public_key: str
    certificate: str
    instance: str = ""
    proof: str = ""
    #: the device's WireGuard public key (base64, 32 bytes) when it wants an overlay
    #: address; None is left out of the message (older relays refuse fields they do not know)
    overlay_key: str | None = None


@dataclass(frozen=True)
class MeshRefresh:
    TYPE: ClassVar[str] = "mesh_refresh"


@dataclass(frozen=True)
class MeshReport:
    """How this device reaches each peer: ``peer_id``, ``name``, ``path``, ``rtt_seconds``,
    ``last_seen``, ``bytes_sent``, ``bytes_received``, ``summary``, ``attempts``,
    ``path_changes`` (see ``p2p/report.py``, which builds it within the schema's bounds)."""

    TYPE: ClassVar[str] = "mesh_report"
    peers: list[dict[str, Any]]


@dataclass(frozen=True)
class MeshPeers:
    """Each peer: ``peer_id``, ``name``, ``public_key``, ``certificate``, ``instance``; and
    ``overlay_ip``, ``overlay_key`` for a device holding an overlay address."""

    TYPE: ClassVar[str] = "mesh_peers"
    self: dict[str, str]
    peers: list[dict[str, str]]
    #: this device's overlay address, ``{"address", "pool"}``, or why it has none,
    #: ``{"error"}``; None (left out) when its join asked for none
    overlay: dict[str, str] | None = None


@dataclass(frozen=True)
class MeshEvent:
    TYPE: ClassVar[str] = "mesh_event"
    event: str
    peer: dict[str, str]
    reason: str = ""


@dataclass(frozen=True)
class Signal:
    TYPE: ClassVar[str] = "signal"
    peer_id: str
    kind: str
    body: dict[str, Any]


@dataclass(frozen=True)
class SignalFailed:
    TYPE: ClassVar[str] = "signal_failed"
    peer_id: str
    code: str
    message: str


@dataclass(frozen=True)
class PeerOpen:
    TYPE: ClassVar[str] = "peer_open"
    port: int
    proof: str = field(repr=False)


@dataclass(frozen=True)
class PeerSplice:
    """Instead of ``open``: join this stream to the same tenant's peer ``peer_id``, which
    opens one naming this device with the same ``attempt``."""

    TYPE: ClassVar[str] = "peer_splice"
    peer_id: str
    attempt: int


@dataclass(frozen=True)
class PeerTicket:
    """Instead of ``open``: a ticket for a raw TCP connection to the relay's TLS port, which
    the relay joins to the same tenant's peer ``peer_id``'s connection for ``attempt``."""

    TYPE: ClassVar[str] = "peer_ticket"
    peer_id: str
    attempt: int


@dataclass(frozen=True)
class Ticket:
    """The answer to ``peer_ticket``: single-use, short-lived; see ``protocol/preamble.py``."""

    TYPE: ClassVar[str] = "ticket"
    ticket: str = field(repr=False)
    port: int


@dataclass(frozen=True)
class Redeem:
    TYPE: ClassVar[str] = "redeem"
    code: str = field(repr=False)


@dataclass(frozen=True)
class Redeemed:
    TYPE: ClassVar[str] = "redeemed"
    token: str = field(repr=False)
    tenant_id: str
    host: str
    ports: dict[str, int]


@dataclass(frozen=True)
class TurnCredentials:
    """Short-lived TURN credentials the relay issues for the client's tenant."""

    TYPE: ClassVar[str] = "turn_credentials"
    urls: list[str]
    username: str
    credential: str = field(repr=False)
    expires_at: float


Message = (
    Hello
    | Welcome
    | ErrorMessage
    | Queued
    | Ping
    | Pong
    | Goaway
    | Refresh
    | Refreshed
    | RefreshFailed
    | Open
    | Accept
    | Reject
    | MeshChallenge
    | MeshJoin
    | MeshRefresh
    | MeshReport
    | MeshPeers
    | MeshEvent
    | Signal
    | SignalFailed
    | PeerOpen
    | PeerSplice
    | PeerTicket
    | Ticket
    | Redeem
    | Redeemed
    | TurnCredentials
)
_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        ErrorMessage,
        Queued,
        Ping,
        Pong,
        Goaway,
        Refresh,
        Refreshed,
        RefreshFailed,
        Open,
        Accept,
        Reject,
        MeshChallenge,
        MeshJoin,
        MeshRefresh,
        MeshReport,
        MeshPeers,
        MeshEvent,
        Signal,
        SignalFailed,
        PeerOpen,
        PeerSplice,
        PeerTicket,
        Ticket,
        Redeem,
        Redeemed,
        TurnCredentials,
    )
}


@cache
def _validators() -> dict[str, Draft202012Validator]:
    """One validator per message type, from the schema's ``oneOf`` branches."""
    text = resources.files("cloudbridge_core") / "schemas" / "protocol" / "messages.schema.json"
    schema = json.loads(text.read_text(encoding="utf-8"))
    shared = {"$defs": schema.get("$defs", {})}
    return {
        branch["properties"]["type"]["const"]: Draft202012Validator({**branch, **shared})
        for branch in schema["oneOf"]
    }


K = TypeVar("K")
V = TypeVar("V")


class _Recent(Generic[K, V]):
    """The last :data:`CHECKED_KEPT` entries used."""

    def __init__(self) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        if len(self._entries) > CHECKED_KEPT:
            self._entries.popitem(last=False)


#: per-tunnel messages, remembered once checked against the schema, by value and by their
#: bytes: a tunnel's setup sends and receives the same few every time, and checking one
#: takes longer than the rest of the setup (30-100 µs); a peer tunnel's ``peer_open`` holds
#: the pair's proof, which the device keeps anyway. No other kind (a hello holds a token).
CHECKED_KINDS = frozenset({"open", "accept", "peer_open"})
CHECKED_KEPT = 256
_encoded: _Recent[Message, bytes] = _Recent()
_decoded: _Recent[bytes, Message] = _Recent()


def encode(message: Message) -> bytes:
    """The message with its length prefix. Raises ``ValueError`` when it breaks the schema
    (what we send is checked like what we receive: a claim value the relay echoes, such
    as a tenant id, must never produce a message its peer has to refuse) or is too large.
    """
    remembered = message.TYPE in CHECKED_KINDS
    if remembered and (known := _encoded.get(message)) is not None:
        return known
    # an optional field left unset (None) is left out: what older peers never knew of
    body = {
        "type": message.TYPE,
        **{key: value for key, value in asdict(message).items() if value is not None},
    }
    for listed in ("capabilities", "degraded"):
        if listed in body:
            body[listed] = list(body[listed])
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_RELAY_MESSAGE_SIZE:
        raise ValueError(
            f"{message.TYPE} message of {len(data)} bytes exceeds {MAX_RELAY_MESSAGE_SIZE}"
        )
    error = next(iter(_validators()[message.TYPE].iter_errors(body)), None)
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "message"
        raise ValueError(f"outgoing {message.TYPE}: field {where!r} fails {error.validator!r}")
    encoded = LENGTH.pack(len(data)) + data
    if remembered:
        _encoded.put(message, encoded)
    return encoded


def decode_body(data: bytes) -> Message:
    """One message body (without its length prefix); :class:`ProtocolViolation` if invalid."""
    if (known := _decoded.get(data)) is not None:
        return known
    try:
        body: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolViolation("message is not valid UTF-8 JSON") from None
    kind = body.get("type") if isinstance(body, dict) else None
    validator = _validators().get(kind) if isinstance(kind, str) else None
    if validator is None:
        raise ProtocolViolation("invalid message: unknown or missing 'type'")
    error = next(iter(validator.iter_errors(body)), None)
    if error is not None:
        # the schema's message may quote a token: name the field only
        where = ".".join(str(p) for p in error.absolute_path) or "message"
        raise ProtocolViolation(f"invalid {kind}: field {where!r} fails {error.validator!r}")
    fields = {k: v for k, v in body.items() if k != "type"}
    for listed in ("capabilities", "degraded"):
        if listed in fields:
            fields[listed] = tuple(fields[listed])
    message = _TYPES[body["type"]](**fields)
    if kind in CHECKED_KINDS:
        _decoded.put(bytes(data), message)
    return message


class MessageReader:
    """Splits a byte stream into messages; keeps whatever follows for the caller."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        #: the largest message taken; raised once the peer is authenticated
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        if len(self._buffer) < LENGTH.size:
            return None
        (size,) = LENGTH.unpack_from(self._buffer)
        if size > self.max_size:
            raise ProtocolViolation(f"message of {size} bytes exceeds the limit of {self.max_size}")
        if len(self._buffer) < LENGTH.size + size:
            return None
        body = bytes(self._buffer[LENGTH.size : LENGTH.size + size])
        del self._buffer[: LENGTH.size + size]
        return decode_body(body)

    def take_buffered(self) -> bytes:
        """Bytes received after the last message (a stream's first raw data)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data
