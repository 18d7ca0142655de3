"""The daemon's one DHT node finds peers for its jobs: an entry added by manifest URL, with no
tracker, gets its bytes from another daemon found through the DHT, and no job starts a DHT node
of its own."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.discovery.dht import node as dht_node
from tests.service.test_daemon_swarm import results_of
from tests.support.daemon import TRUST, daemon, game, installed, until
from tests.support.dht import free_udp_port
from tests.support.release import tree


@pytest.mark.parametrize("listen", ["127.0.0.1:0", None], ids=["serving", "asking-only"])
def test_jobs_find_peers_through_the_daemons_one_dht_node(
    tmp_path: Path, cdn: LocalCDN, monkeypatch: pytest.MonkeyPatch, listen: str | None
) -> None:
    """The second daemon serves too, or (no --listen) its DHT node only asks."""
    url, pub = game(tmp_path, cdn, "quiet", 1_500_000)
    # The second daemon's manifest URL: a host holding the manifest and no chunk, so once the
    # CDN is down its bytes can come from a peer only.
    only = tmp_path / "manifest-only"
    manifest = only / pub.manifest_path.lstrip("/")
    manifest.parent.mkdir(parents=True)
    shutil.copyfile(cdn.root / pub.manifest_path.lstrip("/"), manifest)
    nodes: list[Any] = []  # every DHT node started in this process
    real = dht_node.serve_dht

    async def counted(*args: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async def started(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            await real(*args, task_status=task_status)

        async with trio.open_nursery() as nursery:
            node = await nursery.start(started)
            nodes.append(node)
            task_status.started(node)

    monkeypatch.setattr(dht_node, "serve_dht", counted)
    dht_port = free_udp_port()

    async def main() -> None:
        opts = {"listen": "127.0.0.1:0", "dht_port": dht_port}
        async with daemon(tmp_path / "s1", **opts) as one:
            _, a = one.service.add(url, str(tmp_path / "one"), TRUST)
            await installed(one, a.id)
            await until(lambda: len(one.daemon._announced) == 1)  # (through the DHT)
            cdn.stop()
            with LocalCDN(only) as host:
                boot = {"dht_port": 0, "dht_bootstrap": [f"127.0.0.1:{dht_port}"]}
                async with daemon(tmp_path / "s2", listen=listen, **boot) as two:
                    got = results_of(two)
                    source = host.url + pub.manifest_path
                    _, b = two.service.add(source, str(tmp_path / "two"), TRUST)
                    await installed(two, b.id, timeout=60)
                    assert len(got) == 1
                    r = got[0]
                    assert r.bytes_peers > 0 and r.bytes_cdn == 0, (r.bytes_peers, r.bytes_cdn)
                    assert r.discovery is not None and r.discovery["winner"] == "dht"
                    # One DHT node per daemon: the job borrowed its daemon's.
                    assert one.daemon.discovery is not None and two.daemon.discovery is not None
                    assert nodes == [one.daemon.discovery.dht, two.daemon.discovery.dht]

    trio.run(main)
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
