"""Delta patches: making and applying them, describing them in the manifest, generating them
at publish time and choosing them against what a node holds."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import ManifestError, PatchError
from p2pnode.release import canonical, layout
from p2pnode.release import manifest as M
from p2pnode.release.chunker import hash_chunk
from p2pnode.release.delta import (
    apply_patch,
    choose_patches,
    make_patch,
    pieces,
    result_chunks,
    split_verified,
)
from tests.support.release import publish_pack_builds, scatter_edits

# Level 3 keeps hypothesis fast; the format is the same at every level.
FAST = 3


@st.composite
def edited(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A base and a result made from it by inserts, deletes and overwrites."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    base = rng.randbytes(draw(st.integers(0, 60_000)))
    out = bytearray(base)
    for _ in range(draw(st.integers(0, 6))):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(3)
        if kind == 0:
            out[at:at] = rng.randbytes(rng.randrange(1, 500))
        elif kind == 1:
            del out[at : at + rng.randrange(1, 500)]
        else:
            out[at : at + 50] = rng.randbytes(50)
    return base, bytes(out)


@settings(max_examples=40, deadline=None)
@given(edited())
def test_patch_round_trip(pair: tuple[bytes, bytes]) -> None:
    base, result = pair
    base = base or b"\0"  # a patch always reads at least one base chunk
    patch = make_patch(base, result, FAST)
    assert apply_patch(patch, base, len(result)) == result


def test_small_edit_makes_a_small_patch() -> None:
    rng = random.Random(5)
    base = rng.randbytes(1 << 20)
    result = base[:1000] + b"edit" + base[1000:]
    assert len(make_patch(base, result)) < 200


def test_a_patch_over_the_wrong_base_or_corrupt_fails() -> None:
    rng = random.Random(6)
    base = rng.randbytes(100_000)
    result = base[:5000] + rng.randbytes(300) + base[5000:]
    patch = make_patch(base, result, FAST)
    wrong = rng.randbytes(100_000)
    broken = bytearray(patch)
    broken[len(broken) // 2] ^= 0xFF
    chunk = M.ChunkRef(hash_chunk(result), 0, len(result))
    for bad_patch, bad_base in [(patch, wrong), (bytes(broken), base)]:
        # zstd may decode garbage without complaint: the chunk check is what refuses it.
        with pytest.raises(PatchError):
            split_verified(apply_patch(bad_patch, bad_base, len(result)), [chunk])


# -- the manifest ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[M.Manifest]]:
    tmp = tmp_path_factory.mktemp("builds")
    v1 = random.Random(1).randbytes(1_500_000)
    v2 = scatter_edits(v1, 2, 3)
    return tmp, publish_pack_builds(tmp, [v1, v2, scatter_edits(v2, 3, 3)])


def test_publish_writes_patches_and_a_format_2_manifest(
    three_builds: tuple[Path, list[M.Manifest]],
) -> None:
    tmp, (m1, m2, m3) = three_builds
    assert m1.format == 1 and not m1.patches  # nothing to patch from: format 1, as before
    assert m2.format == 2 and {p.base for p in m2.patches} == {m1.id}
    assert {p.base for p in m3.patches} == {m1.id, m2.id}  # the last two builds
    pack = (tmp / "cdn" / layout.patch_pack_path("game", 3)).read_bytes()
    for p in m3.patches:
        assert p.path == "data/pack.bin"  # the unchanged file needs none
        _, chunks = result_chunks(m3, p)
        assert p.size < 0.8 * sum(c.length for c in chunks)
    # Parsed back from the signed bytes, the patches are the same.
    blob = (tmp / "cdn" / layout.manifest_path("game", 3)).read_bytes()
    assert M.parse_signed(blob).manifest.patches == m3.patches
    assert len(pack) == max(p.offset + p.size for p in m3.patches)


@pytest.mark.parametrize("workers", [1, 3])
def test_generating_in_parallel_makes_the_same_patches_and_pack(
    three_builds: tuple[Path, list[M.Manifest]], tmp_path: Path, workers: int
) -> None:
    """Segments are made by worker threads, but kept and written in one order: the same
    patches (offsets included) and pack bytes as publish made, whatever the workers."""
    from p2pnode.release.patches import earlier_builds, generate

    tmp, (_, _, m3) = three_builds
    cdn = tmp / "cdn"
    bases = earlier_builds(cdn, "game", 3, 2)
    root = cdn / layout.release_dir("game", 3) / "files"
    pack = tmp_path / "pack"
    patches, stats = generate(m3.files, root, bases, pack, level=6, workers=workers)
    assert patches == m3.patches and stats.patches == len(patches)
    assert pack.read_bytes() == (cdn / layout.patch_pack_path("game", 3)).read_bytes()


def test_segments_beyond_the_memory_budget_wait(
    three_builds: tuple[Path, list[M.Manifest]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a budget no two segments fit in, one segment is made at a time, whatever the
    workers (the publisher's memory bound holds on a multi-GiB file)."""
    import threading

    from p2pnode.release import patches as P

    tmp, (_, _, m3) = three_builds
    cdn = tmp / "cdn"
    real, lock = P._one, threading.Lock()
    now = most = 0

    def counted(*args: object) -> object:
        nonlocal now, most
        with lock:
            now += 1
            most = max(most, now)
        try:
            return real(*args)  # type: ignore[arg-type]
        finally:
            with lock:
                now -= 1

    monkeypatch.setattr(P, "_one", counted)
    monkeypatch.setattr(P, "MEMORY_BUDGET", 1)
    root = cdn / layout.release_dir("game", 3) / "files"
    bases = P.earlier_builds(cdn, "game", 3, 2)
    patches, _ = P.generate(m3.files, root, bases, tmp_path / "pack", level=6, workers=4)
    assert patches == m3.patches and most == 1


def test_every_patch_applies_to_its_base_chunks(
    three_builds: tuple[Path, list[M.Manifest]],
) -> None:
    tmp, ms = three_builds
    by_id = {m.id: m for m in ms}
    pack = (tmp / "cdn" / layout.patch_pack_path("game", 3)).read_bytes()
    for p in ms[2].patches:
        base_build = by_id[p.base]
        data = (
            tmp / "cdn" / "game" / str(base_build.build) / "files" / "data" / "pack.bin"
        ).read_bytes()
        chunks = {c.id: data[c.offset : c.offset + c.length] for c in base_build.files[0].chunks}
        base = b"".join(chunks[cid] for cid, _ in p.base_chunks)
        _, result = result_chunks(ms[2], p)
        out = apply_patch(pack[p.offset : p.offset + p.size], base, sum(c.length for c in result))
        assert [cid for cid, _ in split_verified(out, result)] == [c.id for c in result]


def test_no_patches_flag(tmp_path: Path) -> None:
    v1 = random.Random(1).randbytes(300_000)
    _, m2 = publish_pack_builds(tmp_path, [v1, scatter_edits(v1, 2, 3)], patch_from_builds=0)
    assert m2.format == 1 and not m2.patches
    assert not (tmp_path / "cdn" / layout.patch_pack_path("game", 2)).exists()


def test_manifest_checks_patches(three_builds: tuple[Path, list[M.Manifest]]) -> None:
    _, (_, _, m3) = three_builds
    obj = m3.to_obj()
    obj[b"format"] = 1
    with pytest.raises(ManifestError, match="format-2 fields"):
        M.Manifest.from_obj(canonical.decode(canonical.encode(obj), what="m", max_size=1 << 24))
    for field, value in [(b"path", b"nope"), (b"count", 10_000), (b"chunks", b"x" * 35)]:
        obj = m3.to_obj()
        obj[b"patches"][0][field] = value
        with pytest.raises(ManifestError):
            M.Manifest.from_obj(obj)
    obj = m3.to_obj()
    obj[b"format"] = 3
    with pytest.raises(ManifestError, match="upgrade p2pnode"):
        M.Manifest.from_obj(obj)


# -- choosing ----------------------------------------------------------------------------------


def _holding(m: M.Manifest) -> set[bytes]:
    return {c.id for _, c in m.iter_chunks()}


def test_a_node_picks_patches_from_the_build_it_holds(
    three_builds: tuple[Path, list[M.Manifest]],
) -> None:
    _, (m1, m2, m3) = three_builds
    for held in (m1, m2):  # one and two builds behind
        have = _holding(held)
        wanted = {cid for cid in m3.unique_chunks() if cid not in have}
        plan = choose_patches(m3, wanted, have.__contains__)
        assert any(p.base == held.id for p in plan.patches)
        # Bases are matched by chunk id: another build's patch may qualify when the node
        # holds the same bytes, but never one reading a chunk it lacks.
        assert all(cid in have for p in plan.patches for cid, _ in p.base_chunks)
        assert set(plan.chunks) <= wanted
        saved = sum(m3.unique_chunks()[cid] for cid in plan.chunks)
        assert plan.bytes < saved


def test_a_patch_whose_base_is_not_held_is_never_chosen(
    three_builds: tuple[Path, list[M.Manifest]],
) -> None:
    _, (m1, _, m3) = three_builds
    wanted = set(m3.unique_chunks())
    assert not choose_patches(m3, wanted, lambda cid: False).patches
    # Holding all but one base chunk of every patch is not holding the base.
    have = _holding(m1) - {p.base_chunks[0][0] for p in m3.patches}
    plan = choose_patches(m3, wanted, have.__contains__)
    assert not plan.patches
    # A patch that failed once is skipped.
    have = _holding(m1)
    plan = choose_patches(m3, wanted, have.__contains__, skip={p.id for p in m3.patches})
    assert not plan.patches


def test_nothing_wanted_chooses_nothing(three_builds: tuple[Path, list[M.Manifest]]) -> None:
    _, (m1, _, m3) = three_builds
    assert not choose_patches(m3, set(), _holding(m1).__contains__).patches
    m = dataclasses.replace(m3, patches=())
    assert not choose_patches(m, set(m.unique_chunks()), _holding(m1).__contains__).patches


def test_the_swarm_indexes_chunks_then_patches(
    three_builds: tuple[Path, list[M.Manifest]],
) -> None:
    _, (m1, _, m3) = three_builds
    assert pieces(m1) == m1.unique_chunks()  # format 1: the index space of before
    ids = list(pieces(m3))
    n = len(m3.unique_chunks())
    assert ids[:n] == list(m3.unique_chunks())
    assert ids[n:] == list(dict.fromkeys(p.id for p in m3.patches))
    assert all(pieces(m3)[p.id] == p.size for p in m3.patches)


def test_a_renamed_file_finds_its_base_by_shared_chunks_or_by_name() -> None:
    from p2pnode.release.patches import _Earlier

    def entry(path: str, *ids: bytes) -> M.FileEntry:
        chunks = tuple(M.ChunkRef(i * 32, n * 10, 10) for n, i in enumerate(ids))
        return M.FileEntry(path, 10 * len(ids), 0o644, chunks)

    old = [
        entry("a/data.pak", b"1", b"2"),
        entry("pkg-1.0/META", b"3"),
        entry("x/META", b"4", b"5"),
    ]
    earlier = _Earlier(_m(old))
    assert earlier.base_file(entry("a/data.pak", b"9")).path == "a/data.pak"  # same path
    assert earlier.base_file(entry("b/moved.pak", b"9", b"2")).path == "a/data.pak"
    # By name, the closest in size (x/META is twice as big).
    assert earlier.base_file(entry("pkg-1.1/META", b"8")).path == "pkg-1.0/META"
    assert earlier.base_file(entry("new/other", b"7")) is None


def _m(files: list[M.FileEntry]) -> M.Manifest:
    return M.Manifest("g", "1", 1, "stable", 1, 2, b"k" * 32, tuple(files))
