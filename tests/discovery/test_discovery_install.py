"""Installs whose peers come from discovery alone: the tracker, the DHT, both, or the LAN.

Every leecher runs ``--policy p2p-only`` (the CDN files are on disk right there: make sure
none is used) and is given no ``--peer``; a seed in the same process serves the release.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pnode.demo.tracker import LocalTracker
from p2pnode.discovery.race import DiscoveryOptions
from p2pnode.discovery.tracker import TrackerClient
from p2pnode.node.install import InstallOptions, InstallResult, install
from p2pnode.node.seed import seed
from p2pnode.release.publish import publish
from tests.support.release import KEY, PUB, TRUST, make_release, tree

ADMIN = "discovery-admin-token-0123456789ab"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Release:
    src: Path
    manifest: str
    size: int
    signed: bytes


@pytest.fixture
def release(tmp_path: Path) -> Release:
    src, cdn_root = tmp_path / "src", tmp_path / "cdn"
    make_release(src, big=6 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=cdn_root)
    return Release(
        src,
        str(cdn_root / p.manifest_path),
        sum(p.manifest.unique_chunks().values()),
        p.signed.encode(),
    )


@pytest.fixture
def tracker_url(tmp_path: Path) -> Iterator[str]:
    with LocalTracker(tmp_path / "tracker", ADMIN) as url:
        yield url


async def published(url: str, release: Release) -> None:
    async with TrackerClient(url, token=ADMIN) as tracker:
        await tracker.add_app("game", PUB)
        await tracker.publish("game", "stable", release.signed)


@asynccontextmanager
async def seeding(
    tmp_path: Path, release: Release, options: DiscoveryOptions
) -> AsyncIterator[int]:
    """A seed box holding the release, announcing through ``options``; yields its port."""
    await install(release.manifest, tmp_path / "seed", TRUST, InstallOptions())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(seed, tmp_path / "seed", "127.0.0.1:0", tmp_path / "seed-id", discovery=options)
        )
        yield port
        nursery.cancel_scope.cancel()


async def leech(
    tmp_path: Path, release: Release, listen: str | None = "127.0.0.1:0", **discovery: object
) -> InstallResult:
    options = InstallOptions(
        listen=listen,
        policy="p2p-only",
        identity_dir=tmp_path / "leecher-id",
        **discovery,  # type: ignore[arg-type]
    )
    with trio.fail_after(40):
        r = await install(release.manifest, tmp_path / "leecher", TRUST, options)
    assert tree(tmp_path / "leecher") == tree(release.src)
    assert r.bytes_cdn == 0 and r.bytes_peers == release.size and len(r.peers) == 1
    return r


async def test_peers_from_the_tracker_alone(
    tmp_path: Path, release: Release, tracker_url: str
) -> None:
    await published(tracker_url, release)
    async with seeding(tmp_path, release, DiscoveryOptions(tracker=tracker_url)):
        r = await leech(tmp_path, release, tracker=tracker_url)
    assert r.discovery is not None and r.discovery["winner"] == "tracker"
    assert set(r.discovery["sources"]) == {"tracker"}


async def test_a_node_that_does_not_serve_gets_peers_from_the_tracker(
    tmp_path: Path, release: Release, tracker_url: str
) -> None:
    await published(tracker_url, release)
    async with seeding(tmp_path, release, DiscoveryOptions(tracker=tracker_url)):
        r = await leech(tmp_path, release, listen=None, tracker=tracker_url)
    assert r.discovery is not None and r.discovery["winner"] == "tracker"


async def test_tracker_down_the_dht_still_finds_the_seed(tmp_path: Path, release: Release) -> None:
    dead_tracker = f"http://127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    dht_port = free_port(socket.SOCK_DGRAM)
    options = DiscoveryOptions(dht_port=dht_port, tracker=dead_tracker)
    async with seeding(tmp_path, release, options):
        r = await leech(
            tmp_path, release, tracker=dead_tracker, dht_bootstrap=[f"127.0.0.1:{dht_port}"]
        )
    assert r.discovery is not None and r.discovery["winner"] == "dht"
    tracker = r.discovery["sources"]["tracker"]
    assert tracker["answers"] == 0 and tracker["failures"] >= 1 and tracker["error"]
    assert r.seconds < 20  # the dead tracker did not hold the install up


async def test_tracker_and_dht_both_up(tmp_path: Path, release: Release, tracker_url: str) -> None:
    await published(tracker_url, release)
    dht_port = free_port(socket.SOCK_DGRAM)
    options = DiscoveryOptions(dht_port=dht_port, tracker=tracker_url)
    async with seeding(tmp_path, release, options):
        r = await leech(
            tmp_path, release, tracker=tracker_url, dht_bootstrap=[f"127.0.0.1:{dht_port}"]
        )
    assert r.discovery is not None and r.discovery["winner"] in {"tracker", "dht"}
    assert r.discovery["sources"]["tracker"]["answers"] >= 1


async def test_peers_from_the_lan_alone(tmp_path: Path, release: Release) -> None:
    lan_port = free_port(socket.SOCK_DGRAM)
    async with seeding(tmp_path, release, DiscoveryOptions(lan=True, lan_port=lan_port)):
        r = await leech(tmp_path, release, lan=True, lan_port=lan_port)
    assert r.discovery is not None and r.discovery["winner"] == "lan"


async def test_the_tracker_hands_out_dht_bootstrap_nodes(tmp_path: Path, release: Release) -> None:
    """Given only a tracker URL and --dht-port, a node joins the DHT through the tracker's
    bootstrap list, and finds the seed there although this tracker knows nothing of the release
    (its announces are refused)."""
    dht_port = free_port(socket.SOCK_DGRAM)
    boot = f"127.0.0.1:{dht_port}"
    with LocalTracker(tmp_path / "tracker", ADMIN, "--dht-bootstrap", boot) as url:
        async with TrackerClient(url) as client:
            assert await client.dht_bootstrap() == [boot]
        async with seeding(tmp_path, release, DiscoveryOptions(dht_port=dht_port)):
            r = await leech(tmp_path, release, tracker=url, dht_port=0)
    assert r.discovery is not None and r.discovery["winner"] == "dht"
    assert r.discovery["sources"]["tracker"]["answers"] == 0


async def test_an_install_borrows_a_running_dht_node(
    tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client daemon's jobs: an install given a running discovery looks the seed up through
    its DHT node, and starts no DHT node of its own even when asked for one."""
    from p2pnode.discovery import race
    from p2pnode.identity import load_or_create

    started: list[object] = []
    real = race._start_dht

    async def counted(disc: race.Discovery, *args: Any) -> None:
        started.append(disc)
        await real(disc, *args)

    monkeypatch.setattr(race, "_start_dht", counted)
    dht_port = free_port(socket.SOCK_DGRAM)
    async with seeding(tmp_path, release, DiscoveryOptions(dht_port=dht_port)):
        del started[:]  # (the seed's)
        owner = tmp_path / "daemon-id"
        options = DiscoveryOptions(dht_bootstrap=[f"127.0.0.1:{dht_port}"], identity_dir=owner)
        async with race.open_discovery(load_or_create(owner), options, None) as shared:
            r = await leech(tmp_path, release, shared_discovery=shared, dht_port=0)
    assert started == [shared]
    assert r.discovery is not None and r.discovery["winner"] == "dht"
    assert list(r.discovery["sources"]) == ["dht"]
