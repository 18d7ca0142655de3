"""Choosing, per file, between a delta patch and the chunks it produces (sans-IO).

Theory of operation
-------------------
After an install has found which chunks it holds locally, every chunk it still wants can come
either as itself or as the output of a patch whose base chunks it holds. Which is cheaper
depends on bytes *and* on who can deliver them: a patch only the CDN has is worth nothing to a
node whose CDN is down or forbidden (``p2p-only``), and a peer-held chunk is cheaper for the
publisher than origin egress.

The model (docs/delta.md, "Choosing"):

* Every piece (chunk or patch) is **deliverable** by the peers if at least one connected peer
  advertises it (its bitfield at planning time: :attr:`Sources.peers`), and by the CDN if the
  policy allows it, there are mirrors and the node does not know it to be down
  (:attr:`Sources.cdn`). A piece neither can deliver costs infinity.
* A deliverable piece costs ``bytes * seconds_per_byte(source) * weight(source)``, the
  cheapest of its sources: ``seconds_per_byte`` is 1 / the rate measured from that source
  (a source without a measured rate is taken to be as fast as the other; both unknown: equal),
  ``weight`` is 1 for peers and :data:`CDN_WEIGHT` for the CDN (origin egress is paid for).
* A patch is a **candidate** only if the node holds every base chunk (``holds``) and it is
  not known to fail (``skip``); a candidate is **taken** when it costs less than the wanted
  chunks it still produces. Candidates go greedily by what they save; a chunk counts for the
  first taken patch that produces it.

Consequences the tests hold as properties: an undeliverable patch is never taken; a chunk no
source can deliver is produced by a deliverable candidate patch when one exists, whatever the
bytes; with every piece deliverable by the same sources, the plan is the bytes-only plan (fewer
bytes wins); a patch whose base is not held is never taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from .manifest import Manifest
from .patchmeta import Patch

__all__ = [
    "CDN_WEIGHT",
    "Candidate",
    "PatchPlan",
    "Sources",
    "choose",
    "choose_patches",
]

#: What a byte from the CDN costs next to a byte from a peer, at equal rates: the publisher
#: pays origin egress for the one and not the other. Small, so that bytes still decide unless
#: sizes are close: a 10x smaller patch from the CDN beats the chunks from peers.
CDN_WEIGHT = 1.25


@dataclass(frozen=True)
class Sources:
    """What can deliver pieces, as the node knows at planning time.

    ``cdn``: the CDN may be asked (the policy allows it, there are mirrors) and is not known
    to be down. ``peers``: piece id -> how many connected peers advertise it (their bitfields;
    absent: none). ``peer_rate``, ``cdn_rate``: bytes/s measured from each, if any.
    """

    cdn: bool = True
    peers: Mapping[bytes, int] = field(default_factory=dict)
    peer_rate: float | None = None
    cdn_rate: float | None = None

    def seconds_per_byte(self) -> tuple[float, float]:
        """(peers, CDN): 1 / the measured rate, an unmeasured source as fast as the other,
        both 1.0 when neither is measured (only the ratio matters)."""
        peer, cdn = self.peer_rate or 0.0, self.cdn_rate or 0.0
        if peer <= 0 and cdn <= 0:
            return 1.0, 1.0
        peer = peer if peer > 0 else cdn
        cdn = cdn if cdn > 0 else peer
        top = max(peer, cdn)
        return top / peer, top / cdn

    def factors(self) -> tuple[float, float]:
        """What a byte costs from (peers, the CDN)."""
        peer_s, cdn_s = self.seconds_per_byte()
        return peer_s, cdn_s * CDN_WEIGHT

    def cost(self, sizes: Mapping[bytes, int]) -> float:
        """What the pieces ``sizes`` (id -> bytes) cost together, each from its cheapest
        source (inf if any has none). Bytes are summed per source before they are weighed,
        so that equal availability compares exact byte counts."""
        peer_f, cdn_f = self.factors()
        peer_cheaper = peer_f <= cdn_f
        by_peers = by_cdn = 0
        for pid, n in sizes.items():
            held = self.peers.get(pid, 0) > 0
            if held and (peer_cheaper or not self.cdn):
                by_peers += n
            elif self.cdn:
                by_cdn += n
            else:
                return math.inf
        return by_peers * peer_f + by_cdn * cdn_f


#: Every piece deliverable by the CDN alone, no rate measured: the plan compares bytes only.
BYTES_ONLY = Sources()


@dataclass(frozen=True)
class Candidate:
    """A patch as the planner sees it: its id and size, the base chunks it reads and the
    chunks (id -> length) it produces."""

    patch: Patch
    base: tuple[bytes, ...]
    produces: Mapping[bytes, int]


@dataclass
class PatchPlan:
    """What to apply, and what it saves: ``chunks`` are the chunk ids the chosen patches
    produce (fetch them only if a patch fails)."""

    patches: list[Patch] = field(default_factory=list)
    chunks: dict[bytes, Patch] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(p.size for p in self.patches)


def choose(
    candidates: Iterable[Candidate],
    wanted: Collection[bytes],
    holds: Callable[[bytes], bool],
    sources: Sources = BYTES_ONLY,
    *,
    skip: Collection[bytes] = (),
) -> PatchPlan:
    """The plan over ``candidates`` for chunk ids ``wanted`` (see the module)."""

    scored: list[tuple[float, float, int, Candidate]] = []
    for c in candidates:
        p = c.patch
        if p.id in skip or not all(holds(cid) for cid in c.base):
            continue
        cost = sources.cost({p.id: p.size})
        if math.isinf(cost):
            continue  # no source can deliver it
        fresh = {cid: n for cid, n in c.produces.items() if cid in wanted}
        saves = sources.cost(fresh) - cost
        if saves > 0:
            # Most saved first; among patches replacing undeliverable chunks (inf), the
            # cheapest patch first.
            scored.append((-saves, cost, len(scored), c))
    scored.sort(key=lambda item: item[:3])
    plan = PatchPlan()
    for _, cost, _, c in scored:
        fresh = {
            cid: n for cid, n in c.produces.items() if cid in wanted and cid not in plan.chunks
        }
        if not fresh or sources.cost(fresh) <= cost:
            continue
        plan.patches.append(c.patch)
        for cid in fresh:
            plan.chunks[cid] = c.patch
    return plan


def candidates(manifest: Manifest) -> list[Candidate]:
    """The manifest's patches as the planner sees them."""
    files = {f.path: f for f in manifest.files}
    out = []
    for p in manifest.patches:
        chunks = files[p.path].chunks[p.first : p.first + p.count]
        out.append(
            Candidate(p, tuple(cid for cid, _ in p.base_chunks), {c.id: c.length for c in chunks})
        )
    return out


def choose_patches(
    manifest: Manifest,
    wanted: Collection[bytes],
    holds: Callable[[bytes], bool],
    *,
    skip: Iterable[bytes] = (),
    sources: Sources = BYTES_ONLY,
) -> PatchPlan:
    """Pick patches of ``manifest`` that deliver chunks of ``wanted`` for less than fetching
    them, given what this node ``holds`` and what ``sources`` can deliver. ``skip``: patch
    ids known to fail (a re-plan after a bad or undeliverable patch)."""
    return choose(candidates(manifest), wanted, holds, sources, skip=set(skip))
