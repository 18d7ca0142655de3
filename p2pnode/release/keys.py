"""Ed25519 keys: publisher keys that sign manifests, and how users name them.

A public key is written ``ed25519:<64 hex>`` everywhere a person sees or types one (``--trust``,
``keygen``'s output, the tracker's app registry). Private keys live in PKCS#8 PEM files with mode
0600, so that OpenSSL and other tools can read them too.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import SignatureError, UsageError

__all__ = [
    "KEY_PREFIX",
    "format_public_key",
    "generate_key",
    "load_private_key",
    "node_id_of",
    "parse_public_key",
    "public_key_bytes",
    "save_private_key",
    "sign",
    "verify_signature",
]

KEY_PREFIX = "ed25519:"


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of the public half of ``key``."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def format_public_key(raw: bytes) -> str:
    return KEY_PREFIX + raw.hex()


def parse_public_key(text: str) -> bytes:
    """Read ``ed25519:<64 hex>`` into 32 raw bytes."""
    body = text.strip()
    if body.startswith(KEY_PREFIX):
        body = body[len(KEY_PREFIX) :]
    try:
        raw = bytes.fromhex(body)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise UsageError(
            f"{text!r} is not a public key",
            fix="write keys as ed25519:<64 hex digits>, as printed by `p2pnode keygen`",
        )
    return raw


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write ``key`` to ``path`` with mode 0600, never replacing an existing key."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise UsageError(
            f"key file {path} already exists",
            fix="choose another path, or delete the old key if you really mean to replace it",
        ) from exc
    except OSError as exc:
        raise UsageError(f"cannot create key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read key file {path}: {exc.strerror}",
            fix="create one with `p2pnode keygen KEYFILE`",
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"{path} does not hold an unencrypted PEM private key",
            fix="create one with `p2pnode keygen KEYFILE`",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


NODE_ID_BYTES = 20


def node_id_of(public: bytes) -> bytes:
    """A node's id: the first 160 bits of blake3 of its Ed25519 public key.

    160 bits so that ids live in the same space as the ``kademlia`` package's node ids; derived
    from the key so that a node cannot choose where it sits in the DHT, and so that anyone who
    holds a signed message from a node can check the claimed id.
    """

    return blake3.blake3(public).digest()[:NODE_ID_BYTES]


def sign(key: Ed25519PrivateKey, domain: bytes, message: bytes) -> bytes:
    """Sign ``message`` under a domain tag, so a signature made for one purpose (a manifest)
    can never be replayed as another (a peer record) by the same key."""
    return key.sign(domain + b"\x00" + message)


def verify_signature(public: bytes, signature: bytes, domain: bytes, message: bytes) -> None:
    """Raise ``SignatureError`` unless ``signature`` is ``public``'s over ``domain``+``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, domain + b"\x00" + message)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            f"signature does not verify with key {format_public_key(public)}"
        ) from exc
