"""A node's identity: an Ed25519 key kept on disk, its node id, and TLS bound to both.

Theory of operation
-------------------
Each node makes an Ed25519 key on first use and keeps it (PKCS#8 PEM, mode 0600). Its node id
is ``keys.node_id_of(public key)``: derived, not chosen, so a node cannot pick its place in the
DHT, and anyone holding the key's certificate can check an id.

Peers talk TLS 1.3 with mutual authentication, and each side's certificate carries its node
key. OpenSSL (through Python's ``ssl``) insists on verifying a chain to a trusted root and
offers no callback to accept self-signed certificates, so every node's certificate is issued by
a *network CA whose private key is public*: it is derived from a constant, and anyone can mint
certificates with it. That CA proves nothing and is not meant to; it only satisfies the chain
check. What authenticates a peer is the TLS handshake itself (the peer proved it holds the
private key of the certificate it sent) plus our own check, after the handshake, that the
certificate's key hashes to the node id we expected (:func:`peer_node_id`).
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import blake3
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from .errors import RemoteProtocolError, UsageError
from .release import keys

__all__ = [
    "ALPN",
    "NodeIdentity",
    "check_alpn",
    "client_context",
    "default_identity_dir",
    "load_or_create",
    "peer_node_id",
    "server_context",
]

ALPN = "p2pnode/1"
KEY_FILE = "node-key.pem"
_CA_SEED = b"p2pnode network CA v1: this key is public on purpose, see identity.py"


@cache
def _network_ca() -> tuple[Ed25519PrivateKey, x509.Certificate, bytes]:
    key = Ed25519PrivateKey.from_private_bytes(blake3.blake3(_CA_SEED).digest())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pnode network CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, None)
    )
    return key, cert, cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class NodeIdentity:
    key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return keys.public_key_bytes(self.key)

    @property
    def node_id(self) -> bytes:
        return keys.node_id_of(self.public_key)

    def certificate_pem(self) -> bytes:
        ca_key, ca_cert, _ = _network_ca()
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.node_id.hex())]))
            .issuer_name(ca_cert.subject)
            .public_key(self.key.public_key())
            .serial_number(int.from_bytes(self.node_id[:16], "big") | 1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(ca_key, None)
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def default_identity_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("p2pnode"))


def load_or_create(directory: Path | None = None) -> NodeIdentity:
    """The node's identity from ``directory`` (default: the user data dir), made on first use."""
    directory = directory or default_identity_dir()
    path = directory / KEY_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise UsageError(
                f"node key {path} is readable by other users",
                fix=f"chmod 600 {path}",
            )
        return NodeIdentity(keys.load_private_key(path))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = keys.generate_key()
    try:
        keys.save_private_key(key, path)
    except UsageError:  # another process made it first: use theirs
        return NodeIdentity(keys.load_private_key(path))
    return NodeIdentity(key)


def _context(identity: NodeIdentity, purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=_network_ca()[2].decode())
    ctx.set_alpn_protocols([ALPN])
    # ssl loads certificates only from files; keep them private and short-lived.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="p2pnode-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.key_pem())
        cert_path.write_bytes(identity.certificate_pem())
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """For accepted connections: requires the peer's certificate."""
    return _context(identity, ssl.Purpose.CLIENT_AUTH)


def client_context(identity: NodeIdentity) -> ssl.SSLContext:
    """For dialled connections: presents ours, requires theirs."""
    return _context(identity, ssl.Purpose.SERVER_AUTH)


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> Any: ...


class _HasALPN(Protocol):
    def selected_alpn_protocol(self) -> str | None: ...


def check_alpn(tls: _HasALPN) -> None:
    """Refuse a peer that did not agree on ``p2pnode/1``.

    OpenSSL completes a handshake in which the two sides share no ALPN name (or the client
    offers none): the server just leaves the extension out. Only this check, after the
    handshake, keeps another protocol (or a later, incompatible version of this one) from
    being spoken at us.

    Raises:
        RemoteProtocolError: the handshake selected another protocol or none.
    """
    selected = tls.selected_alpn_protocol()
    if selected != ALPN:
        got = "none" if selected is None else repr(selected)
        raise RemoteProtocolError(f"the peer did not negotiate ALPN {ALPN!r} (it chose {got})")


def peer_node_id(tls: _HasPeerCert) -> bytes:
    """The node id the peer's certificate proves (the handshake proved it holds the key).

    ``tls``: an ``ssl.SSLObject`` or a ``trio.SSLStream`` (which forwards ``getpeercert``).
    """
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise RemoteProtocolError("the peer presented no certificate")
    public = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(public, Ed25519PublicKey):
        raise RemoteProtocolError("the peer's certificate key is not Ed25519")
    return keys.node_id_of(keys.public_key_bytes(public))
