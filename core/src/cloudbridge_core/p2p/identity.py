"""This device's identity in the mesh: an X25519 key that names it (DERP addresses
packets to it and seals them with it) and the certificate its QUIC and TCP endpoints present.

The X25519 key is kept in a 0600 file so the device keeps its peer id across restarts;
the certificate is made at each start and published through the relay, which is what
peers pin.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudbridge_core.errors import ProtocolViolation
from cloudbridge_core.protocol import messages
from cloudbridge_core.relay.mesh import join_proof, peer_id_of
from cloudbridge_core.secretfile import write_secret
from cloudbridge_core.tlsutil import KeyPair, generate_ca, issue_server_certificate

NONCE_SIZE = 12
#: peers whose DERP cipher and stream proof are kept (more than p2p.max_connections, 100,
#: allows by default)
MAX_DERP_CIPHERS = 1024


@dataclass(frozen=True)
class DeviceIdentity:
    private_key: X25519PrivateKey
    ca: KeyPair  # what peers pin (published)
    #: what the QUIC endpoint and both ends of a TCP path present, signed by ``ca``
    server: KeyPair
    #: the DERP cipher of each peer: deriving its key (X25519 and HKDF) for every packet
    #: cost more than sealing the packet
    _derp_ciphers: dict[bytes, ChaCha20Poly1305] = field(
        default_factory=dict, repr=False, compare=False
    )
    #: the stream proof for each peer, kept for the same reason: every peer stream shows
    #: one (opener) or checks one (acceptor)
    _proofs: dict[bytes, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def create(cls, key_file: Path | None = None) -> DeviceIdentity:
        """Load the device key from ``key_file`` (made on first use), or a fresh one."""
        private_key = load_or_create_key(key_file) if key_file else X25519PrivateKey.generate()
        public = base64.b64encode(private_key.public_key().public_bytes_raw()).decode()
        peer_id = peer_id_of(public)
        ca = generate_ca(f"cloudbridge peer {peer_id}", days=30)
        server = issue_server_certificate(ca, [server_name(peer_id)], days=30, client_auth=True)
        return cls(private_key, ca, server)

    @property
    def public_key(self) -> str:
        return base64.b64encode(self.private_key.public_key().public_bytes_raw()).decode()

    @property
    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def pair_key(self, peer_public_key: bytes, purpose: bytes) -> bytes:
        """A key only this device and that peer can compute, one per ``purpose``."""
        shared = self.private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
        keys = sorted([self.public_key_bytes, peer_public_key])
        info = b"cloudbridge/1 " + purpose + b" " + keys[0] + keys[1]
        return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(shared)

    def seal(self, peer_public_key: bytes, packet: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._derp_cipher(peer_public_key).encrypt(nonce, packet, None)

    def open(self, peer_public_key: bytes, sealed: bytes) -> bytes:
        cipher = self._derp_cipher(peer_public_key)
        try:
            return cipher.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], None)
        except (InvalidTag, ValueError):  # forged, or too short: either way not from that peer
            raise ProtocolViolation("a DERP packet failed authentication") from None

    def _derp_cipher(self, peer_public_key: bytes) -> ChaCha20Poly1305:
        cipher = self._derp_ciphers.get(peer_public_key)
        if cipher is None:
            if len(self._derp_ciphers) >= MAX_DERP_CIPHERS:
                self._derp_ciphers.clear()
            cipher = ChaCha20Poly1305(self.pair_key(peer_public_key, b"derp"))
            self._derp_ciphers[peer_public_key] = cipher
        return cipher

    def proof_for(self, peer_public_key: bytes) -> str:
        """What this device shows a peer to be let in: only it and the peer can make it."""
        proof = self._proofs.get(peer_public_key)
        if proof is None:
            if len(self._proofs) >= MAX_DERP_CIPHERS:
                self._proofs.clear()
            key = self.pair_key(peer_public_key, b"proof")
            proof = hmac.new(key, b"open", hashlib.sha256).hexdigest()
            self._proofs[peer_public_key] = proof
        return proof

    def accepts_proof(self, peer_public_key: bytes, proof: str) -> bool:
        return hmac.compare_digest(self.proof_for(peer_public_key), proof)

    def prove_join(
        self, challenge: messages.MeshChallenge, request: messages.MeshJoin
    ) -> messages.MeshJoin:
        """``request`` with the proof that this device holds its key, for this session."""
        relay_key = X25519PublicKey.from_public_bytes(base64.b64decode(challenge.key))
        proof = join_proof(self.private_key.exchange(relay_key), request)
        return dataclasses.replace(request, proof=proof)


def server_name(peer_id: str) -> str:
    """The name in a peer's QUIC certificate (DNS-safe; its CA, pinned, is what counts)."""
    return f"{peer_id.lower().replace('_', '-')}.peer.cloudbridge"


def load_or_create_key(key_file: Path) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(base64.b64decode(key_file.read_text()))
    except FileNotFoundError:
        pass
    key = X25519PrivateKey.generate()
    write_secret(key_file, base64.b64encode(key.private_bytes_raw()))
    return key
