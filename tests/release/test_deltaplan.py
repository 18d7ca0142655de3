"""The patch planner: weighing a patch against its chunks by bytes and by who can deliver them
(release/deltaplan.py), as properties over random patches, holdings and sources."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.release.deltaplan import CDN_WEIGHT, Candidate, PatchPlan, Sources, choose
from p2pnode.release.patchmeta import Patch


def _id(kind: str, n: int) -> bytes:
    return f"{kind}{n}".encode().ljust(32, b".")


def _candidate(n: int, size: int, base: list[int], produces: dict[int, int]) -> Candidate:
    base_ids = tuple(_id("b", b) for b in base)
    patch = Patch(
        base=_id("m", 0),
        path="f",
        first=0,
        count=len(produces),
        base_chunks=tuple((b, 1) for b in base_ids),
        offset=0,
        size=size,
        id=_id("p", n),
    )
    return Candidate(patch, base_ids, {_id("c", c): length for c, length in produces.items()})


@dataclass
class World:
    candidates: list[Candidate]
    wanted: set[bytes]
    held: set[bytes]
    skip: set[bytes]
    sources: Sources


@st.composite
def worlds(draw: st.DrawFn, *, uniform: bool = False) -> World:
    """Chunks with lengths, patches producing some of them from some base chunks, a node
    holding some base chunks, and sources delivering some pieces."""
    n_chunks = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, 5000), min_size=n_chunks, max_size=n_chunks))
    candidates = []
    for n in range(draw(st.integers(0, 8))):
        produced = draw(st.sets(st.integers(0, n_chunks - 1), min_size=1))
        base = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
        size = draw(st.integers(1, 8000))
        candidates.append(_candidate(n, size, base, {c: lengths[c] for c in produced}))
    chunk_ids = [_id("c", c) for c in range(n_chunks)]
    wanted = set(draw(st.sets(st.sampled_from(chunk_ids))))
    held = {_id("b", b) for b in draw(st.sets(st.integers(0, 5)))}
    patch_ids = [c.patch.id for c in candidates]
    skip = set(draw(st.sets(st.sampled_from(patch_ids)))) if patch_ids and not uniform else set()
    cdn = draw(st.booleans())
    if uniform:  # every piece the same sources: all peers or none
        on_peers = chunk_ids + patch_ids if draw(st.booleans()) else []
    else:
        on_peers = draw(st.lists(st.sampled_from(chunk_ids + patch_ids))) if patch_ids else []
    rates = st.none() | st.floats(1.0, 1e9)
    sources = Sources(
        cdn=cdn,
        peers={pid: 1 for pid in on_peers},
        peer_rate=draw(rates),
        cdn_rate=draw(rates),
    )
    return World(candidates, wanted, held, skip, sources)


def _plan(w: World, sources: Sources | None = None) -> PatchPlan:
    return choose(w.candidates, w.wanted, w.held.__contains__, sources or w.sources, skip=w.skip)


def _deliverable(sources: Sources, pid: bytes, size: int) -> bool:
    return not math.isinf(sources.cost({pid: size}))


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_only_held_deliverable_patches_are_taken(w: World) -> None:
    plan = _plan(w)
    for p in plan.patches:
        assert p.id not in w.skip
        assert all(cid in w.held for cid, _ in p.base_chunks)  # base held
        assert _deliverable(w.sources, p.id, p.size)  # some source has it
    assert set(plan.chunks) <= w.wanted
    assert set(plan.chunks.values()) == set(plan.patches)


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_an_undeliverable_chunk_comes_from_a_deliverable_patch_if_any(w: World) -> None:
    """Never an undeliverable option when a deliverable one exists: a wanted chunk no source
    has is left to the chunk fetch only if no usable patch produces it."""
    plan = _plan(w)
    for c in w.candidates:
        p = c.patch
        usable = (
            p.id not in w.skip
            and all(b in w.held for b in c.base)
            and _deliverable(w.sources, p.id, p.size)
        )
        if not usable:
            continue
        for cid, n in c.produces.items():
            if cid in w.wanted and not _deliverable(w.sources, cid, n):
                assert cid in plan.chunks


@settings(max_examples=150, deadline=None)
@given(worlds(uniform=True))
def test_with_equal_availability_fewer_bytes_wins(w: World) -> None:
    """Every piece the same sources: the plan is the bytes-only one, and never fetches more
    bytes than the chunks alone."""
    plan = _plan(w)
    if not w.sources.cdn and not w.sources.peers:
        assert not plan.patches  # nothing can deliver anything
        return
    assert plan.chunks == _plan(w, Sources()).chunks
    lengths = {cid: n for c in w.candidates for cid, n in c.produces.items()}
    for p in plan.patches:
        replaced = sum(lengths[cid] for cid, q in plan.chunks.items() if q is p)
        assert p.size < replaced


# -- the cases the issue names -------------------------------------------------------------

PATCH = _candidate(0, 300, [0], {0: 11_000})  # a patch ~37x smaller than its chunk
HELD = {_id("b", 0)}
WANTED = {_id("c", 0)}


def _chosen(sources: Sources, held: set[bytes] = HELD) -> bool:
    return bool(choose([PATCH], WANTED, held.__contains__, sources).patches)


def test_the_smaller_patch_wins_from_the_same_source() -> None:
    assert _chosen(Sources(cdn=True))
    everything = {_id("c", 0): 1, PATCH.patch.id: 1}
    assert _chosen(Sources(cdn=False, peers=everything))


def test_a_patch_only_the_cdn_has_is_not_taken_with_the_cdn_down() -> None:
    chunk_on_peers = {_id("c", 0): 2}
    assert not _chosen(Sources(cdn=False, peers=chunk_on_peers))  # peers' chunks, though bigger
    assert _chosen(Sources(cdn=True, peers=chunk_on_peers))  # the CDN is up: 37x fewer bytes


def test_a_patch_peers_hold_is_taken_with_the_cdn_down() -> None:
    assert _chosen(Sources(cdn=False, peers={PATCH.patch.id: 1}))


def test_a_patch_whose_base_is_not_held_is_never_taken() -> None:
    assert not _chosen(Sources(), held=set())


def test_measured_rates_weigh_in() -> None:
    chunk_on_peers = {_id("c", 0): 1}
    # The CDN measured 100x slower than peers: 11 kB from a peer beats 300 B from the CDN.
    slow_cdn = Sources(cdn=True, peers=chunk_on_peers, peer_rate=100e6, cdn_rate=1e6)
    assert not _chosen(slow_cdn)
    # 10x slower only: the patch is still cheaper in time.
    assert _chosen(Sources(cdn=True, peers=chunk_on_peers, peer_rate=10e6, cdn_rate=1e6))


def test_cdn_bytes_weigh_more_than_peer_bytes() -> None:
    # Chunk 1000 B on peers against a 900 B patch only on the CDN: egress tips it.
    c = _candidate(0, 900, [0], {0: 1000})
    plan = choose([c], WANTED, HELD.__contains__, Sources(cdn=True, peers={_id("c", 0): 1}))
    assert 900 * CDN_WEIGHT > 1000 and not plan.patches
    assert choose([c], WANTED, HELD.__contains__, Sources(cdn=True)).patches
