"""The swarms a node serves, and the rule for joining one a peer shows it, sans-IO.

A node serves the manifests it ``offer``s (the build it installs and the kept earlier builds),
answering each ``join`` with a bitfield. A peer may also push a signed manifest this node does
not know (protocol.md section 5, cross-version partial seeds): it is taken on only when signed
by a publisher key of the same app that this node already serves (``verify_push``), and at most
``MAX_PUSHED`` are kept, the oldest forgotten (``take_pushed``), so peers cannot grow the table.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ManifestError
from ..release import manifest as M
from ..release.delta import pieces
from . import wire as W

__all__ = ["MAX_PUSHED", "Offers"]

#: Manifests peers showed us that we serve as partial seeds, at most (oldest forgotten).
MAX_PUSHED = 8


class Offers:
    def __init__(self) -> None:
        self.manifests: dict[bytes, M.Manifest] = {}
        self.chunks: dict[bytes, list[bytes]] = {}  # manifest id -> unique chunk ids
        self.index: dict[bytes, dict[bytes, int]] = {}  # manifest id -> chunk id -> index
        self.signed: dict[bytes, bytes] = {}  # manifest id -> signed manifest, to push
        self._pushed: dict[bytes, None] = {}  # manifests peers pushed to us, oldest first

    def offer(self, manifest: M.Manifest, signed: bytes | None = None) -> None:
        if signed is not None:
            self.signed[manifest.id] = signed
        self.manifests[manifest.id] = manifest
        self.chunks[manifest.id] = list(pieces(manifest))  # chunks, then patches
        self.index[manifest.id] = {cid: i for i, cid in enumerate(self.chunks[manifest.id])}

    def verify_push(self, push: W.ManifestPush) -> M.Manifest:
        """The pushed manifest, if its signature verifies under a publisher key of an app we
        serve (the trust rule); raises a P2PNodeError if not. Parsing and checking cost a
        few milliseconds for a large manifest: the shell runs this in a thread."""
        signed = M.parse_signed(bytes(push.signed), source="a manifest pushed by a peer")
        if signed.id != push.manifest:
            raise ManifestError("a pushed manifest is not the one its message names")
        app = signed.manifest.app
        trusted = {m.key for m in list(self.manifests.values()) if m.app == app}
        return M.verify(signed, trusted)

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
