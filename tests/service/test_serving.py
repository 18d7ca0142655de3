"""The daemon's served index: installed, kept and staging builds of many installs as one."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.disk.stage import Journal, LocalChunks
from p2pnode.disk.state import StateDir
from p2pnode.node.install import InstallOptions, install
from p2pnode.ratelimit import RateLimiter
from p2pnode.release.chunker import hash_chunk
from p2pnode.service.serving import Holdings, read_install
from tests.support.daemon import game
from tests.support.release import TRUST


def test_a_staging_install_offers_its_build_and_the_chunks_it_journaled(
    tmp_path: Path, cdn: LocalCDN
) -> None:
    one, p1 = game(tmp_path, cdn, "a", 300_000)
    other, p2 = game(tmp_path, cdn, "b", 2_000_000)
    done, staging = tmp_path / "done", tmp_path / "staging"
    assert read_install(staging) is None  # nothing there yet

    async def main() -> None:
        await install(one, done, TRUST)
        slow = InstallOptions(limiter=RateLimiter(400_000), max_download_rate=400_000)
        with trio.move_on_after(1.5):  # stopped part way, as a paused job is
            await install(other, staging, TRUST, slow)

    trio.run(main)
    journaled = Journal.read_done(StateDir(staging).journal)
    assert journaled and len(journaled) < len(p2.manifest.unique_chunks())
    a, b = read_install(done), read_install(staging)
    assert a is not None and b is not None
    assert a.current == p1.manifest and b.current is None  # not installed, but served
    assert [m.id for m, signed in b.offers if signed] == [p2.manifest.id]
    both = Holdings([a.local, b.local])
    cid = next(iter(journaled))
    assert both.has(cid) and both.read(cid) is not None
    assert all(both.has(c) for c in p1.manifest.unique_chunks())
    missing = next(c for c in p2.manifest.unique_chunks() if c not in journaled)
    assert not both.has(missing) and both.read(missing) is None


def test_a_running_jobs_stage_stays_served_across_rereads(tmp_path: Path) -> None:
    """A job attaches its stage to the node's index; the daemon's re-reads replace the
    installs read from disk, not what a job attached."""
    stage = tmp_path / "chunk"
    stage.write_bytes(b"x" * 100)
    cid = hash_chunk(b"x" * 100)
    live = LocalChunks()
    holdings = Holdings()
    holdings.attach(live)
    assert not holdings.has(cid)
    live.add(cid, stage, 0, 100)  # landed: served at once
    assert holdings.has(cid) and holdings.read(cid) == b"x" * 100
    holdings.parts = [LocalChunks()]  # a re-read
    assert holdings.has(cid)
    holdings.detach(live)
    assert not holdings.has(cid) and holdings.read(cid) is None
