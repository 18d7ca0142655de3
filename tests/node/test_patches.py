"""Updates through delta patches: chosen against what the node holds, applied into the stage
with every chunk verified, falling back to chunks when a patch fails, resumable."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pnode.node.install import InstallOptions, InstallResult, install
from p2pnode.release import keys, layout
from p2pnode.release import manifest as M
from p2pnode.release.delta import choose_patches
from tests.support.release import KEY, TRUST, publish_pack_builds, scatter_edits, tree


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[M.Manifest]]:
    """Three builds of a 2 MB pack with a few scattered edits each, published with patches
    (build 3 has patches from builds 1 and 2)."""
    tmp = tmp_path_factory.mktemp("patched")
    v1 = random.Random(1).randbytes(2_000_000)
    v2 = scatter_edits(v1, 2, 4)
    ms = publish_pack_builds(tmp, [v1, v2, scatter_edits(v2, 3, 4)])
    assert ms[2].patches
    return tmp, ms


def _install(cdn: Path, build: int, dest: Path, **kw: object) -> InstallResult:
    async def go() -> InstallResult:
        where = str(cdn / layout.manifest_path("game", build))
        return await install(where, dest, TRUST, InstallOptions(**kw))  # type: ignore[arg-type]

    return trio.run(go)


def _copy_cdn(tmp: Path, into: Path) -> Path:
    subprocess.run(["cp", "-a", str(tmp / "cdn"), str(into)], check=True)
    return into


@pytest.mark.parametrize("behind", [1, 2])
def test_update_fetches_patches_not_chunks(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path, behind: int
) -> None:
    tmp, ms = builds
    dest = tmp_path / "game"
    _install(tmp / "cdn", 3 - behind, dest)
    r = _install(tmp / "cdn", 3, dest)
    assert tree(dest) == tree(tmp / "src3")
    assert r.bytes_cdn == 0 and r.patches_applied and not r.patches_failed
    assert 0 < r.bytes_patches < 20_000  # the changed chunks are ~4 x 64 KiB
    assert r.methods == {"data/pack.bin": "patch", "readme.txt": "reused"}
    # A node two builds behind uses the patches from its own build.
    have = {c.id for _, c in ms[2 - behind].iter_chunks()}
    plan = choose_patches(ms[2], set(ms[2].unique_chunks()) - have, have.__contains__)
    assert any(p.base == ms[2 - behind].id for p in plan.patches)
    assert r.bytes_patches == sum({p.id: p.size for p in plan.patches}.values())
    # As announced while it ran, at its end: what the patches made is not left.
    assert r.bytes_patched > 0 and dataclasses.replace(r, action="").bytes_left() == 0
    assert r.from_cdn == r.bytes_patches and r.from_peers == 0  # patch bytes: origin egress


def test_without_patches_or_a_base_the_node_fetches_chunks(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path
) -> None:
    tmp, _ = builds
    dest = tmp_path / "game"
    _install(tmp / "cdn", 2, dest)
    r = _install(tmp / "cdn", 3, dest, patches=False)
    assert tree(dest) == tree(tmp / "src3") and r.bytes_patches == 0 and r.bytes_cdn > 0
    assert r.methods["data/pack.bin"] == "chunks"
    fresh = _install(tmp / "cdn", 3, tmp_path / "fresh")  # holds no base: no patch is chosen
    assert fresh.bytes_patches == 0 and not fresh.patches_applied
    assert tree(tmp_path / "fresh") == tree(tmp / "src3")


def test_a_corrupt_patch_on_the_cdn_falls_back_to_chunks(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path
) -> None:
    tmp, _ = builds
    cdn = _copy_cdn(tmp, tmp_path / "cdn")
    pack = cdn / layout.patch_pack_path("game", 3)
    blob = bytearray(pack.read_bytes())
    for i in range(0, len(blob), 7):
        blob[i] ^= 0x55
    pack.write_bytes(bytes(blob))
    dest = tmp_path / "game"
    _install(cdn, 2, dest)
    r = _install(cdn, 3, dest)
    assert tree(dest) == tree(tmp / "src3")  # nothing corrupt was staged
    assert r.patches_failed and not r.patches_applied and r.bytes_cdn > 0
    assert r.methods["data/pack.bin"] == "chunks"


def test_a_patch_that_makes_the_wrong_bytes_falls_back_to_chunks(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path
) -> None:
    """A signed manifest whose patches read the wrong base (a publisher's bug): the output
    fails the chunk check, nothing of it is staged, and the chunks are fetched instead."""
    tmp, ms = builds
    cdn = _copy_cdn(tmp, tmp_path / "cdn")
    m3 = ms[2]
    other = next(c for c in ms[0].files[0].chunks)  # a chunk the node holds, the wrong one
    wrong = tuple(
        dataclasses.replace(p, base_chunks=((other.id, other.length),)) for p in m3.patches
    )
    bad = dataclasses.replace(m3, patches=wrong, version="1.3b")
    (cdn / layout.manifest_path("game", 3)).write_bytes(M.sign(bad, KEY).encode())
    dest = tmp_path / "game"
    _install(cdn, 2, dest)
    r = _install(cdn, 3, dest)
    assert tree(dest) == tree(tmp / "src3")
    assert r.patches_failed >= 1
    assert not r.patches_applied and r.bytes_cdn > 0


def test_kill_9_while_applying_then_resume(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path
) -> None:
    tmp, ms = builds
    dest = tmp_path / "game"
    _install(tmp / "cdn", 1, dest)
    where = str(tmp / "cdn" / layout.manifest_path("game", 3))
    trust = keys.format_public_key(TRUST[0])
    killed = subprocess.run(
        [
            *(sys.executable, "-m", "tests.support.killat", "update", where),
            *("--dest", str(dest), "--trust", trust, "--connections", "1", "--json"),
        ],
        env={**os.environ, "P2PNODE_KILL_AT": "p2pnode.node.patching.split_verified:2"},
        capture_output=True,
    )
    assert killed.returncode == -9, killed.stderr
    r = _install(tmp / "cdn", 3, dest)
    assert tree(dest) == tree(tmp / "src3")
    assert r.bytes_resumed > 0 and r.bytes_cdn == 0  # the first patch's chunks were journaled
    assert r.patches_applied < len({p.id for p in ms[2].patches if p.base == ms[0].id})


def test_patches_come_by_http_range_from_a_static_server(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path
) -> None:
    from p2pnode.demo.cdn import LocalCDN

    tmp, _ = builds
    cdn = _copy_cdn(tmp, tmp_path / "cdn")
    server = LocalCDN(cdn)
    server.start()
    try:
        dest = tmp_path / "game"
        _install(cdn, 1, dest)

        async def go() -> InstallResult:
            url = server.url + layout.manifest_path("game", 3)
            return await install(url, dest, TRUST, InstallOptions())

        r = trio.run(go)
    finally:
        server.close()
    assert tree(dest) == tree(tmp / "src3")
    assert r.patches_applied and r.bytes_cdn == 0 and 0 < r.bytes_patches < 20_000


def _seed_and_update(
    seeder: Path, leecher: Path, manifest: M.Manifest, signed: bytes, **kw: object
) -> InstallResult:
    """Serve ``seeder``'s install to ``leecher``, which updates to ``manifest`` with ``kw``."""
    from p2pnode.disk.state import StateDir
    from p2pnode.disk.switch import local_chunks
    from p2pnode.swarm.node import SwarmNode
    from tests.support.swarm import node

    async def go() -> InstallResult:
        sd = StateDir(seeder)
        seed = SwarmNode(node(), local_chunks(sd, sd.load()))
        seed.offer(manifest)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(seed.serve, "127.0.0.1", 0)
            options = InstallOptions(peers=[f"127.0.0.1:{port}"], **kw)  # type: ignore[arg-type]
            r = await install("tracker", leecher, TRUST, options, manifest_data=signed)
            nursery.cancel_scope.cancel()
        return r

    return trio.run(go)


def test_a_leecher_gets_patches_from_a_peer_with_the_cdn_stopped(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path
) -> None:
    tmp, ms = builds
    cdn = _copy_cdn(tmp, tmp_path / "cdn")
    seeder, leecher = tmp_path / "seeder", tmp_path / "leecher"
    _install(cdn, 1, seeder)
    assert _install(cdn, 3, seeder).patches_applied  # the seeder keeps the patches it used
    _install(cdn, 1, leecher)
    signed = (cdn / layout.manifest_path("game", 3)).read_bytes()
    subprocess.run(["rm", "-rf", str(cdn)], check=True)  # the CDN is gone
    r = _seed_and_update(seeder, leecher, ms[2], signed, policy="p2p-only")
    assert tree(leecher) == tree(tmp / "src3")
    assert r.patches_applied and not r.patches_failed and r.bytes_cdn == 0
    assert 0 < r.bytes_patches < 20_000 and r.methods["data/pack.bin"] == "patch"
    assert r.from_peers >= r.bytes_patches_peers == r.bytes_patches  # counted as from peers


def test_a_peer_serving_corrupt_patches_is_banned_and_the_cdn_gives_them(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path
) -> None:
    from p2pnode.disk.state import StateDir
    from p2pnode.disk.switch import local_chunks
    from tests.support.swarm import CorruptSeed, node

    tmp, ms = builds
    seeder, leecher = tmp_path / "seeder", tmp_path / "leecher"
    for dest in (seeder, leecher):
        _install(tmp / "cdn", 1, dest)
    _install(tmp / "cdn", 3, seeder)  # holds the patches, and serves garbage for them

    async def go() -> InstallResult:
        sd = StateDir(seeder)
        evil = CorruptSeed(node(), local_chunks(sd, sd.load()))
        evil.offer(ms[2])
        async with trio.open_nursery() as nursery:
            port = await nursery.start(evil.serve, "127.0.0.1", 0)
            where = str(tmp / "cdn" / layout.manifest_path("game", 3))
            options = InstallOptions(peers=[f"127.0.0.1:{port}"])
            r = await install(where, leecher, TRUST, options)
            nursery.cancel_scope.cancel()
        return r

    r = trio.run(go)
    assert tree(leecher) == tree(tmp / "src3")  # nothing corrupt was staged
    (st,) = r.peers.values()
    assert st.corrupt >= 1 and "banned" in st.error
    assert r.patches_applied and not r.patches_failed and r.bytes_peers == 0


@pytest.mark.parametrize("policy", ["p2p-only", "p2p-first"])
def test_with_the_cdn_gone_peers_chunks_beat_a_patch_only_the_cdn_has(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path, policy: str
) -> None:
    """The seeder installed build 3 from chunks: it holds no patch. Peers-only, the planner
    knows the patches are undeliverable and never takes one; p2p-first with the CDN gone, the
    first plan takes them (the CDN is not known to be down), the CDN gives nothing, and the
    re-plan takes the peers' chunks."""
    tmp, ms = builds
    cdn = _copy_cdn(tmp, tmp_path / "cdn")
    seeder, leecher = tmp_path / "seeder", tmp_path / "leecher"
    _install(cdn, 3, seeder, patches=False)
    _install(cdn, 1, leecher)
    signed = (cdn / layout.manifest_path("game", 3)).read_bytes()
    subprocess.run(["rm", "-rf", str(cdn)], check=True)  # the CDN is gone
    r = _seed_and_update(seeder, leecher, ms[2], signed, policy=policy)
    assert tree(leecher) == tree(tmp / "src3")
    assert not r.patches_applied and r.bytes_patches == 0 and r.bytes_cdn == 0
    assert r.methods["data/pack.bin"] == "chunks" and r.bytes_peers > 0
    if policy == "p2p-only":
        assert r.patches_failed == 0  # never taken: no source had them
    else:
        assert r.patches_failed >= 1  # taken, undelivered, re-planned as chunks


def test_a_patch_that_fails_is_replanned_with_another_base(
    builds: tuple[Path, list[M.Manifest]], tmp_path: Path
) -> None:
    """A node holding builds 1 and 2: the patches it picks first are corrupt on the CDN, so
    the re-plan takes the other build's patches for the same chunks instead of the chunks."""
    tmp, ms = builds
    cdn = _copy_cdn(tmp, tmp_path / "cdn")
    dest = tmp_path / "game"
    _install(cdn, 1, dest)
    _install(cdn, 2, dest)  # build 1's chunks are kept in the store
    have = {c.id for m in ms[:2] for _, c in m.iter_chunks()}
    first = choose_patches(ms[2], set(ms[2].unique_chunks()) - have, have.__contains__)
    others = [p for p in ms[2].patches if p not in first.patches]
    assert {p.base for p in first.patches} != {p.base for p in others}
    pack = cdn / layout.patch_pack_path("game", 3)
    blob = bytearray(pack.read_bytes())
    for p in first.patches:
        blob[p.offset] ^= 0xFF
    pack.write_bytes(bytes(blob))
    r = _install(cdn, 3, dest)
    assert tree(dest) == tree(tmp / "src3")
    assert r.patches_failed == len(first.patches) and r.patches_applied
    assert r.methods["data/pack.bin"] == "patch"


def test_announced_figures_count_patches_by_source(
    builds: tuple[Path, list[M.Manifest]],
) -> None:
    """Mid-install figures: what patches made is not left; patch bytes are from the source
    that gave them, in the running announces and in the outcome the fleet gets."""
    from p2pnode.node.peers import Swarm
    from p2pnode.node.tracking import outcome_fields

    _, ms = builds
    m = ms[2]
    r = InstallResult("", m, 2, m.total_size)
    r.bytes_reused, r.bytes_patched = m.total_size // 2, m.total_size // 4
    r.bytes_patches, r.bytes_patches_peers, r.bytes_peers, r.bytes_cdn = 900, 300, 1000, 50
    assert r.bytes_left() == m.total_size - m.total_size // 2 - m.total_size // 4 - 1050

    class Node:
        uploaded = 7

    swarm = Swarm(Node(), [], result=r)  # type: ignore[arg-type]
    assert swarm.tally(m.id) == (m.total_size, r.bytes_left(), 1300, 650, 7)
    r.action = "updated"
    fields = outcome_fields(
        app=m.app, manifest_id=m.id, to_build=m.build, from_build=2, seconds=1.0, result=r
    )
    assert (fields["bytes_peers"], fields["bytes_cdn"]) == (1300, 650)
    # ... and how many of those were patches, by source (the tracker's traffic series)
    assert (fields["bytes_patches"], fields["bytes_patches_cdn"]) == (900, 600)
    assert fields["bytes_patches_peers"] == 300
    # ``install/update --json``: the patch bytes by source and the chunk bytes they made
    from p2pnode.node.render import install_json

    got = install_json(r)
    assert (got["bytes_patches"], got["bytes_patches_peers"], got["bytes_patches_cdn"]) == (
        900,
        300,
        600,
    )
    assert got["bytes_patched"] == m.total_size // 4
