"""The swarms a node serves, and the rule for joining one a peer shows it, sans-IO.

A node serves the manifests it ``offer``s (the build it installs and the kept earlier builds),
answering each ``join`` with a bitfield. A peer may also push a signed manifest this node does
not know (protocol.md section 5, cross-version partial seeds): it is taken on only when it is
of an app this node serves and verifies against that app's keys (``verify_push``), and at most
``MAX_PUSHED`` are kept, the oldest forgotten (``take_pushed``), so peers cannot grow the table.

An app's keys are what the node that runs this swarm knows of them (:class:`AppKeys`, set in
``keys`` by node/peers.py and the daemon: its pinned keys and the key rotations it learnt,
release/rotation.py), so a build signed by the app's new key is taken after a rotation, and one
signed by a retired key is refused once its ``old_until`` has passed: the same
:meth:`KeyRing.verify <p2pnode.release.rotation.KeyRing.verify>` as an install's. A push signed
by a key not known yet raises :class:`~p2pnode.errors.UnknownKeyError`: the shell may then ask
``AppKeys.learn`` for the chain (at most once per :data:`LEARN_INTERVAL` per app, so peers
pushing builds of made-up keys cannot make the node hammer its tracker) and check again.
Without ``keys`` for the app, the keys of its served manifests are trusted, with no date.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..errors import ManifestError, SignatureError, UnknownKeyError
from ..release import keys as K
from ..release import manifest as M
from ..release import rotation as R
from ..release.delta import pieces
from . import wire as W

__all__ = ["LEARN_INTERVAL", "MAX_PUSHED", "AppKeys", "Offers"]

#: Manifests peers showed us that we serve as partial seeds, at most (oldest forgotten).
MAX_PUSHED = 8
#: Seconds between two asks for one app's key chain on behalf of pushed manifests.
LEARN_INTERVAL = 60.0


class AppKeys(Protocol):
    """What the node knows of one app's publisher keys (node/rotations.py implements it)."""

    def ring(self) -> R.KeyRing:
        """The keys its builds are checked against now (may read the disk: called in a
        worker thread)."""
        ...

    async def learn(self, key: bytes) -> R.KeyRing:
        """The keys once the app's rotations were fetched from the node's sources, to find
        ``key`` (the caller bounds the time)."""
        ...


class Offers:
    def __init__(self) -> None:
        self.manifests: dict[bytes, M.Manifest] = {}
        self.chunks: dict[bytes, list[bytes]] = {}  # manifest id -> unique chunk ids
        self.index: dict[bytes, dict[bytes, int]] = {}  # manifest id -> chunk id -> index
        self.signed: dict[bytes, bytes] = {}  # manifest id -> signed manifest, to push
        self._pushed: dict[bytes, None] = {}  # manifests peers pushed to us, oldest first
        #: app -> its keys as the node knows them (see the module's docstring)
        self.keys: dict[str, AppKeys] = {}
        self._asked: dict[str, float] = {}  # app -> when its chain was last asked for

    def offer(self, manifest: M.Manifest, signed: bytes | None = None) -> None:
        if signed is not None:
            self.signed[manifest.id] = signed
        self.manifests[manifest.id] = manifest
        self.chunks[manifest.id] = list(pieces(manifest))  # chunks, then patches
        self.index[manifest.id] = {cid: i for i, cid in enumerate(self.chunks[manifest.id])}

    def verify_push(self, push: W.ManifestPush, now: float | None = None) -> M.Manifest:
        """The pushed manifest, if it is of an app we serve and verifies under that app's keys
        (the trust rule, ``now`` the wall clock); raises a P2PNodeError if not, an
        :class:`UnknownKeyError` when only its key is unknown. Parsing and checking cost a
        few milliseconds for a large manifest (and ``AppKeys.ring`` may read the disk): the
        shell runs this in a thread."""
        signed = M.parse_signed(bytes(push.signed), source="a manifest pushed by a peer")
        if signed.id != push.manifest:
            raise ManifestError("a pushed manifest is not the one its message names")
        app, key = signed.manifest.app, signed.manifest.key
        served = {m.key for m in list(self.manifests.values()) if m.app == app}
        if not served:
            raise SignatureError(f"a pushed manifest is of {app}, an app this node does not serve")
        known = self.keys.get(app)
        ring = known.ring() if known is not None else R.follow(served, app, ())
        if key not in ring:
            raise UnknownKeyError(
                f"a pushed manifest of {app} is signed by {K.format_public_key(key)}, "
                "which is not a key of the app this node knows",
                app=app,
                key=key,
            )
        return ring.verify(signed, now=now)

    def may_learn(self, app: str, now: float) -> AppKeys | None:
        """Whether to ask for ``app``'s key chain now (``now``: a monotonic clock) on behalf of a
        push signed by an unknown key: its :class:`AppKeys` if so, at most once per
        :data:`LEARN_INTERVAL`; None without keys for the app (nothing to ask)."""
        known = self.keys.get(app)
        last = self._asked.get(app)
        if known is None or (last is not None and now - last < LEARN_INTERVAL):
            return None
        self._asked[app] = now  # (bounded: only apps with keys, which the node set)
        return known

    def take_pushed(self, manifest: M.Manifest) -> None:
        """Serve a manifest ``verify_push`` accepted; the oldest pushed one beyond
        ``MAX_PUSHED`` is forgotten (its peers get rejects)."""
        self.offer(manifest)
        self._pushed[manifest.id] = None
        while len(self._pushed) > MAX_PUSHED:
            old = next(iter(self._pushed))
            del self._pushed[old]
            for table in (self.manifests, self.chunks, self.index, self.signed):
                table.pop(old, None)

    def bitfield(self, mid: bytes, availability: Callable[[M.Manifest], bytes]) -> W.Bitfield:
        """The answer to a join of ``mid``: what ``availability`` says we hold of it, or
        ``n`` = 0 when it is not a swarm we take part in."""
        manifest = self.manifests.get(mid)
        if manifest is None:
            return W.Bitfield(mid, 0, b"")
        return W.Bitfield(mid, len(self.chunks[mid]), availability(manifest))
