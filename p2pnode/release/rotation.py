"""Publisher key rotation: a statement signed by the old key that names the new one.

Nodes pin the key that signs an app's builds (``--trust``, then state.json). To move an app to a
new key without re-pinning every node, the holder of the old key signs a *rotation*: app, old
key, new key, and ``old_until``, the time from which builds signed by the old key are refused.
A node shown the statement (by its tracker, ``GET /v1/apps/APP/rotations``, or in a
``rotations`` file beside the release on a CDN) trusts the new key from then on and the old one
only until that date, so a key retired because it might leak stops shipping builds. Chains
(old -> new -> newer) are followed, at most :data:`MAX_HOPS` keys past the pinned ones; each hop
must be signed by a key the chain already trusts, for the same app.

One rotation per old key: a second, different statement by the same key (a stolen old key
naming the thief's key) loses to the first one known. The tracker keeps the first it was given,
a node the ones it learnt (state.json), and :func:`follow` takes statements in the order given,
so callers pass what they already hold first.

Encoding, as manifests: canonical bencode ``{"rotation": <canonical bytes>, "signature": <64
bytes>}``, signed under its own domain, so no manifest signature can pass for a rotation.
A rotations document (the tracker's answer, the CDN file) is a bencoded list of them.

Nodes learn of a rotation on their normal polls: the tracker's feed names the app's chain by
:func:`chain_digest` of its rotations document (``key_chain``), and a node whose last
document differs fetches it again (node/rotations.py). The digest only says *when* to look:
what is followed is still only what the pinned keys sign.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import ManifestError, SignatureError
from . import canonical, keys
from . import manifest as M

__all__ = [
    "MAX_HOPS",
    "MAX_ROTATIONS_BYTES",
    "ROTATION_DOMAIN",
    "KeyRing",
    "Rotation",
    "SignedRotation",
    "chain_digest",
    "encode_list",
    "follow",
    "parse_list",
    "parse_rotation",
    "sign_rotation",
]

ROTATION_DOMAIN = b"p2pnode-key-rotation-v1"
#: Keys a chain may add past the pinned ones; more is a loop or an abuse, not an app's history.
MAX_HOPS = 8
#: A rotations document holds at most this many statements, in at most this many bytes.
MAX_ROTATIONS = 32
MAX_ROTATIONS_BYTES = 16 * 1024
_FIELDS = {b"app", b"created", b"new", b"old", b"old_until"}
_MAX_TIME = 1 << 40


@dataclass(frozen=True)
class Rotation:
    """``old`` hands ``app`` over to ``new``; builds signed by ``old`` are refused from
    ``old_until`` (Unix seconds) on."""

    app: str
    old: bytes
    new: bytes
    old_until: int
    created: int

    def to_obj(self) -> dict[bytes, Any]:
        return {
            b"app": self.app.encode(),
            b"created": self.created,
            b"new": self.new,
            b"old": self.old,
            b"old_until": self.old_until,
        }

    @classmethod
    def from_obj(cls, obj: Any) -> Rotation:
        if not isinstance(obj, dict) or set(obj) != _FIELDS:
            raise ManifestError("a key rotation has missing or unknown fields")
        app, old, new = obj[b"app"], obj[b"old"], obj[b"new"]
        times = obj[b"old_until"], obj[b"created"]
        if not isinstance(app, bytes) or not M.is_name(app.decode("utf-8", "replace")):
            raise ManifestError("a key rotation names no valid app")
        if not all(isinstance(k, bytes) and len(k) == 32 for k in (old, new)) or old == new:
            raise ManifestError("a key rotation must name two different Ed25519 keys")
        if not all(type(t) is int and 0 <= t < _MAX_TIME for t in times):
            raise ManifestError("a key rotation's times must be Unix seconds")
        return cls(app.decode(), old, new, times[0], times[1])


@dataclass(frozen=True)
class SignedRotation:
    rotation: Rotation
    raw: bytes
    signature: bytes

    def encode(self) -> bytes:
        return canonical.encode({b"rotation": self.raw, b"signature": self.signature})

    def check(self) -> Rotation:
        """The rotation, if its old key signed it; else SignatureError."""
        r = self.rotation
        keys.verify_signature(r.old, self.signature, ROTATION_DOMAIN, self.raw)
        return r


def sign_rotation(rotation: Rotation, old_key: Ed25519PrivateKey) -> SignedRotation:
    if keys.public_key_bytes(old_key) != rotation.old:
        raise ValueError("a rotation is signed by the key it retires")
    raw = canonical.encode(rotation.to_obj())
    Rotation.from_obj(canonical.decode(raw, what="rotation", max_size=MAX_ROTATIONS_BYTES))
    return SignedRotation(rotation, raw, keys.sign(old_key, ROTATION_DOMAIN, raw))


def parse_rotation(data: bytes, *, source: str = "key rotation") -> SignedRotation:
    """Parse one signed rotation's structure. Does not check the signature: :func:`follow`."""
    outer = canonical.decode(data, what=source, max_size=MAX_ROTATIONS_BYTES)
    if not isinstance(outer, dict) or set(outer) != {b"rotation", b"signature"}:
        raise ManifestError(f"{source} is not a signed p2pnode key rotation")
    raw, signature = outer[b"rotation"], outer[b"signature"]
    if not isinstance(raw, bytes) or not isinstance(signature, bytes) or len(signature) != 64:
        raise ManifestError(f"{source} is not a signed p2pnode key rotation")
    inner = canonical.decode(raw, what=f"{source} (inner)", max_size=MAX_ROTATIONS_BYTES)
    return SignedRotation(Rotation.from_obj(inner), raw, signature)


def encode_list(rotations: Sequence[SignedRotation]) -> bytes:
    return canonical.encode([r.encode() for r in rotations[:MAX_ROTATIONS]])


def chain_digest(document: bytes) -> str:
    """The name of a rotations document (:func:`encode_list`'s bytes) on the tracker's feed:
    32 hex digits of its blake3, so a node can tell a chain it holds from a longer one."""
    return blake3.blake3(document).hexdigest()[:32]


def parse_list(data: bytes, *, source: str = "key rotations") -> list[SignedRotation]:
    items = canonical.decode(data, what=source, max_size=MAX_ROTATIONS_BYTES)
    if not isinstance(items, list) or len(items) > MAX_ROTATIONS:
        raise ManifestError(f"{source} is not a list of at most {MAX_ROTATIONS} rotations")
    if not all(isinstance(i, bytes) for i in items):
        raise ManifestError(f"{source} is not a list of signed rotations")
    return [parse_rotation(i, source=source) for i in items]


@dataclass
class KeyRing:
    """The keys an app's builds may be signed by: each with the time its builds stop being
    accepted (None: no limit), and the rotations that led there (to keep)."""

    until: dict[bytes, int | None]
    learned: list[SignedRotation] = field(default_factory=list)

    def __contains__(self, key: object) -> bool:
        return key in self.until

    def current(self, key: bytes) -> bytes:
        """Where ``key``'s chain ends: the key builds are signed by now."""
        seen = {key}
        for r in self.learned:
            if r.rotation.old == key and r.rotation.new not in seen:
                key = r.rotation.new
                seen.add(key)
        return key

    def verify(
        self, signed: M.SignedManifest, *, now: float | None = None, check_expiry: bool = True
    ) -> M.Manifest:
        """:func:`manifest.verify` against these keys, then the signing key's date: a build
        signed by a retired key is refused once its ``old_until`` has passed (a kept build
        being rolled back to, ``check_expiry=False``, is not: it was checked when it came)."""
        now = time.time() if now is None else now
        m = M.verify(signed, self.until.keys(), now=now, check_expiry=check_expiry)
        until = self.until[m.key]
        if check_expiry and until is not None and now >= until:
            raise SignatureError(
                f"build {m.build} of {m.app} is signed by {keys.format_public_key(m.key)}, "
                f"retired since {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(until))}",
                fix="the publisher rotated to a new key: install a build signed by that key",
            )
        return m


def follow(pinned: Collection[bytes], app: str, rotations: Iterable[SignedRotation]) -> KeyRing:
    """The keys ``pinned`` (trusted without limit) lead to through ``rotations`` of ``app``:
    each statement whose old key is already in the ring and whose signature that key made adds
    its new key and dates its old one. A statement of another app, a bad signature, a second
    statement by one old key, and anything past :data:`MAX_HOPS` new keys are left out."""
    ring = KeyRing({k: None for k in pinned})
    limit = len(ring.until) + MAX_HOPS
    pending = [r for r in rotations if r.rotation.app == app]
    retired: set[bytes] = set()
    changed = True
    while changed and len(ring.until) < limit:
        changed = False
        for s in pending:
            r = s.rotation
            if r.old not in ring.until or r.old in retired:
                continue
            try:
                s.check()
            except SignatureError:
                continue
            retired.add(r.old)
            old = ring.until[r.old]
            ring.until[r.old] = r.old_until if old is None else min(old, r.old_until)
            ring.until.setdefault(r.new, None)  # pinned already (state.json): keep its date
            ring.learned.append(s)
            changed = True
            break  # from the start: statements are taken in the order given
    return ring
