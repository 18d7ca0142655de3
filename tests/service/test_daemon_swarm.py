"""Daemons installing one build at once trade its chunks, as ``watch --listen`` leechers do:
each job announces its daemon's serving node for the build it stages, which offers the chunks
as they land and tells connected peers of them."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pnode.demo.cdn import LocalCDN
from tests.service.test_daemon_tracker import publish
from tests.support.daemon import daemon, installed
from tests.support.e2e import registered_app
from tests.support.release import tree


def test_daemons_fetching_one_build_serve_each_other(tmp_path: Path, tracker_url: str) -> None:
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        publish(src, cdn_root, key, tracker_url, cdn.url, 1)

        async def main() -> None:
            # A seed whose uplink is too thin to feed two daemons quickly, and no CDN: what a
            # daemon does not take from the seed it can only have from the other daemon.
            slow = {"max_upload_rate": 600_000}
            async with daemon(tmp_path / "s0", listen="127.0.0.1:0", table=slow) as seed:
                _, j = seed.service.add("game", str(tmp_path / "seed"), [pub], tracker=tracker_url)
                await installed(seed, j.id)
                cdn.stop()
                async with (
                    daemon(tmp_path / "s1", listen="127.0.0.1:0") as one,
                    daemon(tmp_path / "s2", listen="127.0.0.1:0") as two,
                ):
                    where = [str(tmp_path / "one"), str(tmp_path / "two")]
                    _, a = one.service.add("game", where[0], [pub], tracker=tracker_url)
                    await trio.sleep(0.5)  # (the first has announced itself when the second asks)
                    _, b = two.service.add("game", where[1], [pub], tracker=tracker_url)
                    await installed(one, a.id, timeout=60)
                    await installed(two, b.id, timeout=60)
                    assert one.daemon.node is not None and two.daemon.node is not None
                    traded = one.daemon.node.uploaded + two.daemon.node.uploaded
                    assert traded > 0, "the daemons fetched everything from the seed"
                assert tree(tmp_path / "one") == tree(tmp_path / "two") == tree(src)

        trio.run(main)
