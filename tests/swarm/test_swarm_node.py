"""Swarm nodes over loopback TLS, in-process: seeding, fetching, hostile peers."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import trio

from p2pnode.disk.stage import LocalChunks
from p2pnode.disk.state import StateDir
from p2pnode.node.rotations import InstallKeys
from p2pnode.ratelimit import RateLimiter
from p2pnode.release import keys, layout
from p2pnode.release import rotation as R
from p2pnode.release.chunker import hash_chunk
from p2pnode.release.publish import publish
from p2pnode.swarm import wire as W
from p2pnode.swarm.node import PeerStats, SwarmNode
from tests.support.release import KEY, rotation
from tests.support.swarm import CorruptSeed, node, seeded


async def test_a_leecher_fetches_everything_from_a_seed(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    got: dict[bytes, bytes] = {}

    async def deliver(cid: bytes, data: bytes) -> None:
        got[cid] = data

    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        leecher = SwarmNode(node(), LocalChunks())
        wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
        stats: dict[str, PeerStats] = {}
        left = await leecher.fetch(manifest, wanted, [("127.0.0.1", port)], deliver, stats)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert left == set() and set(got) == set(wanted)
    assert all(hash_chunk(d) == c for c, d in got.items())
    (st,) = stats.values()
    assert st.chunks == len(wanted) and st.corrupt == 0 and st.node_id == seed.identity.node_id
    assert st.responses == st.chunks and st.latency_ms > 0 and st.connect_s > 0
    assert seed.uploaded == sum(len(d) for d in got.values())


async def test_a_corrupt_peer_is_banned_and_nothing_bad_is_delivered(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    evil = CorruptSeed(node(), seed.local)
    evil.offer(manifest)  # type: ignore[arg-type]
    got: dict[bytes, bytes] = {}

    async def deliver(cid: bytes, data: bytes) -> None:
        assert hash_chunk(data) == cid
        got[cid] = data

    async with trio.open_nursery() as nursery:
        evil_port = await nursery.start(evil.serve, "127.0.0.1", 0)
        stats: dict[str, PeerStats] = {}
        wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
        leecher = SwarmNode(node(), LocalChunks())
        left = await leecher.fetch(manifest, wanted, [("127.0.0.1", evil_port)], deliver, stats)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    (st,) = stats.values()
    assert st.corrupt == 2 and "banned" in st.error
    assert left == set(wanted) and not got  # all of it left for the CDN


async def test_a_node_outside_the_swarm_gives_nothing(tmp_path: Path) -> None:
    _seed, manifest = await seeded(tmp_path)
    stranger = SwarmNode(node(), LocalChunks())  # offers nothing
    async with trio.open_nursery() as nursery:
        port = await nursery.start(stranger.serve, "127.0.0.1", 0)
        leecher = SwarmNode(node(), LocalChunks())
        wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]

        async def deliver(cid: bytes, data: bytes) -> None:
            raise AssertionError("nothing should arrive")

        with trio.fail_after(10):
            left = await leecher.fetch(manifest, wanted, [("127.0.0.1", port)], deliver)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert left == set(wanted)


async def _fetch_all(
    seed: SwarmNode, manifest: object, leechers: int
) -> tuple[list[list[float]], float]:
    """``leechers`` nodes fetch the whole release from ``seed`` at once: each one's chunk
    arrival times, and the wall time."""
    wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
    arrivals: list[list[float]] = [[] for _ in range(leechers)]

    async def one(k: int, port: int) -> None:
        async def deliver(cid: bytes, data: bytes) -> None:
            assert hash_chunk(data) == cid
            arrivals[k].append(trio.current_time())

        left = await SwarmNode(node(), LocalChunks()).fetch(
            manifest,  # type: ignore[arg-type]
            wanted,
            [("127.0.0.1", port)],
            deliver,
        )
        assert left == set()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        t0 = trio.current_time()
        with trio.fail_after(30):
            async with trio.open_nursery() as fetches:
                for k in range(leechers):
                    fetches.start_soon(one, k, port)
        nursery.cancel_scope.cancel()
    return arrivals, trio.current_time() - t0


async def test_the_per_peer_upload_cap_holds_for_each_peer_not_for_all(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    size = sum(manifest.unique_chunks().values())  # type: ignore[attr-defined]
    rate = 4 << 20
    capped = SwarmNode(node(), seed.local, peer_upload_rate=rate)
    capped.offer(manifest)  # type: ignore[arg-type]
    _arrivals, seconds = await _fetch_all(capped, manifest, leechers=2)
    burst = 0.05 * rate  # ratelimit.default_burst
    assert seconds >= 0.9 * (size - burst) / rate  # each peer was held to the cap...
    assert seconds < 1.6 * size / rate  # ...but the two were served side by side
    assert capped.uploaded == 2 * size


async def test_with_one_upload_slot_peers_are_served_in_turn(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    one_slot = SwarmNode(node(), seed.local, upload_slots=1)
    one_slot.offer(manifest)  # type: ignore[arg-type]
    arrivals, _seconds = await _fetch_all(one_slot, manifest, leechers=2)
    first, second = sorted(arrivals, key=min)
    # The second leecher was choked until the first left and handed the slot on.
    assert max(first) <= min(second)


async def test_every_leecher_gets_a_first_piece_before_anyone_a_second(tmp_path: Path) -> None:
    """First pieces first (sendorder.py): once a leecher has asked a seed for its first
    chunk, no other leecher's later chunk arrives before it, even a chunk already being
    written (it gives way between slices). The seed's uplink is a 4 MiB/s global cap, paid per
    slice, so the order of writes is the order of arrivals. Leecher 0 starts first, so its
    next pieces are being written when the others ask."""
    seed, manifest = await seeded(tmp_path)
    capped = SwarmNode(node(), seed.local, upload_limiter=RateLimiter(4 << 20, burst=16 << 10))
    capped.offer(manifest)  # type: ignore[arg-type]
    asked: dict[bytes, float] = {}  # node id -> when the seed first had a request of it
    want = capped.send_order.want

    def recording_want(peer: tuple[bytes, bytes], now: float, size: int) -> int:
        asked.setdefault(peer[0], now)
        return want(peer, now, size)

    capped.send_order.want = recording_want  # type: ignore[method-assign]
    # Big chunks only: a leecher whose first chunk is 18 bytes waits for nothing.
    chunks = manifest.unique_chunks().items()  # type: ignore[attr-defined]
    wanted = [cid for cid, size in chunks if size >= 256 << 10]
    assert len(wanted) >= 6
    ids = [node() for _ in range(3)]
    arrivals: list[tuple[float, int]] = []  # (when, leecher)
    zero_has_one = trio.Event()

    async def one(k: int, port: int) -> None:
        async def deliver(cid: bytes, data: bytes) -> None:
            arrivals.append((trio.current_time(), k))
            if k == 0:
                zero_has_one.set()

        leecher = SwarmNode(ids[k], LocalChunks())
        assert await leecher.fetch(manifest, wanted, [("127.0.0.1", port)], deliver) == set()  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        port = await nursery.start(capped.serve, "127.0.0.1", 0)
        with trio.fail_after(30):
            async with trio.open_nursery() as fetches:
                fetches.start_soon(one, 0, port)
                await zero_has_one.wait()
                for k in (1, 2):
                    fetches.start_soon(one, k, port)
        nursery.cancel_scope.cancel()
    got: dict[int, float] = {}
    for when, k in sorted(arrivals):
        got.setdefault(k, when)
    # A slice at the capped rate (31 ms) may be on its way when a leecher asks.
    slack = 0.1
    late = [
        (j, k)
        for k in range(3)
        for when, j in arrivals
        if j != k
        and when > got[j]  # j's later chunk...
        and asked[ids[k].node_id] + slack < when < got[k]  # ...while k waited for its first
    ]
    assert late == []


async def _cross_version_fetch(
    tmp_path: Path, publisher: object, app: str = "game", rotations: bytes | None = None
) -> tuple[dict[bytes, bytes], set[bytes], set[bytes], set[bytes]]:
    """A seed holding build 1 only; a leecher of build 2 shows it build 2's signed manifest.
    Returns what arrived, what was left, and the chunk ids of builds 1 and 2. ``rotations``:
    a rotations document beside build 1 on its mirror, where the seed's install keys (as
    an install's node has them) may learn the app's new key."""
    seed, m1 = await seeded(tmp_path)
    if rotations is not None:
        (tmp_path / "cdn" / layout.rotations_path("game")).write_bytes(rotations)
        seed.swarms.keys["game"] = InstallKeys(StateDir(tmp_path / "seed"), "game")
    src = tmp_path / "src"
    big = src / "data" / "big.pak"
    data = bytearray(big.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 100_000] = os.urandom(100_000)  # one region changes
    big.write_bytes(bytes(data))
    p2 = publish(src, app=app, version="2", build=2, key=publisher, out=tmp_path / "cdn2")
    leecher = SwarmNode(node(), LocalChunks())
    leecher.offer(p2.manifest, p2.signed.encode())
    got: dict[bytes, bytes] = {}

    async def deliver(cid: bytes, chunk: bytes) -> None:
        assert hash_chunk(chunk) == cid
        got[cid] = chunk

    wanted = list(p2.manifest.unique_chunks())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        with trio.fail_after(20):
            left = await leecher.fetch(p2.manifest, wanted, [("127.0.0.1", port)], deliver)
        nursery.cancel_scope.cancel()
    return got, left, set(m1.unique_chunks()), set(wanted)  # type: ignore[attr-defined]


async def test_a_holder_of_build_1_serves_build_2_it_was_shown(tmp_path: Path) -> None:
    got, left, old, new = await _cross_version_fetch(tmp_path, KEY)
    assert set(got) == old & new and got  # every shared chunk came from the old build's holder
    assert left == new - old and left  # the changed region is for someone else (the CDN)


async def test_a_pushed_manifest_from_another_publisher_or_app_is_refused(
    tmp_path: Path,
) -> None:
    got, left, _old, new = await _cross_version_fetch(tmp_path / "k", keys.generate_key())
    assert not got and left == new
    got, left, _old, new = await _cross_version_fetch(tmp_path / "a", KEY, app="other-app")
    assert not got and left == new


async def test_a_holder_learns_a_rotation_to_serve_the_new_keys_build(tmp_path: Path) -> None:
    """A build signed by the app's new key, pushed by a peer: the holder of build 1 fetches
    the app's rotations from its mirror (the chain its pinned key signed) and serves it; a
    forged chain (the new key's word for the old one) teaches it nothing."""
    new = keys.generate_key()
    doc = R.encode_list([rotation(KEY, new, 2**33)])
    got, left, old, wanted = await _cross_version_fetch(tmp_path / "r", new, rotations=doc)
    assert set(got) == old & wanted and got and left == wanted - old
    doc = R.encode_list([rotation(KEY, new, 2**33, signer=new)])
    got, left, _old, wanted = await _cross_version_fetch(tmp_path / "f", new, rotations=doc)
    assert not got and left == wanted


async def test_peers_found_during_the_fetch_join_it(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
    got: set[bytes] = set()

    async def deliver(cid: bytes, data: bytes) -> None:
        got.add(cid)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        send, receive = trio.open_memory_channel[tuple[str, int]](4)
        await send.send(("127.0.0.1", port))  # discovered after the fetch was set up
        await send.send(("127.0.0.1", port))  # and again: one connection per address
        stats: dict[str, PeerStats] = {}
        with trio.fail_after(20):
            left = await SwarmNode(node(), LocalChunks()).fetch(
                manifest,  # type: ignore[arg-type]
                wanted,
                [],
                deliver,
                stats,
                more_peers=receive,
            )
        nursery.cancel_scope.cancel()
    assert left == set() and got == set(wanted) and len(stats) == 1


async def test_a_peer_that_connects_to_us_is_dialled_back(tmp_path: Path) -> None:
    """A knows only the seed; B knows the seed and A. B's connection tells A where B listens,
    A dials back, and the two trade (one side knowing the other is enough)."""
    seed, manifest = await seeded(tmp_path)
    seed.upload_limiter.set_rate(4 << 20)  # slow enough that the leechers overlap
    wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
    a, b = SwarmNode(node(), LocalChunks()), SwarmNode(node(), LocalChunks())
    got: dict[str, set[bytes]] = {"a": set(), "b": set()}
    stats: dict[str, dict[str, PeerStats]] = {"a": {}, "b": {}}

    async def fetch(name: str, me: SwarmNode, peers: list[tuple[str, int]]) -> None:
        async def deliver(cid: bytes, data: bytes) -> None:
            got[name].add(cid)
            path = tmp_path / f"{name}-{cid.hex()}"
            path.write_bytes(data)
            me.local.add(cid, path, 0, len(data))  # serve what landed, as an install does
            me.have(cid)

        await me.fetch(manifest, wanted, peers, deliver, stats[name])  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        s_port = await nursery.start(seed.serve, "127.0.0.1", 0)
        for me in (a, b):
            me.offer(manifest)  # type: ignore[arg-type]
        a_port = await nursery.start(a.serve, "127.0.0.1", 0)
        b_port = await nursery.start(b.serve, "127.0.0.1", 0)
        with trio.fail_after(30):
            async with trio.open_nursery() as fetches:
                fetches.start_soon(fetch, "a", a, [("127.0.0.1", s_port)])
                fetches.start_soon(fetch, "b", b, [("127.0.0.1", s_port), ("127.0.0.1", a_port)])
        nursery.cancel_scope.cancel()
    assert got["a"] == got["b"] == set(wanted)
    dialled = stats["a"].get(f"127.0.0.1:{b_port}")
    assert dialled is not None and dialled.node_id == b.identity.node_id


def test_a_seed_box_asks_to_be_spared_unless_told_not_to() -> None:
    """``origin`` in the hello makes leechers spare a seed box's upload (scheduler.py); a box
    run with --no-spare stays frugal but is asked like any peer."""
    assert SwarmNode(node(), LocalChunks(), frugal=True)._caps == (b"origin",)
    assert SwarmNode(node(), LocalChunks(), frugal=True, spare=False)._caps == ()
    assert SwarmNode(node(), LocalChunks())._caps == ()  # a client is never an origin


async def test_the_dialler_answers_joins_and_requests_instead_of_piling_them_up(
    tmp_path: Path,
) -> None:
    """A node serves only on connections it accepted. A peer it dialled that joins and asks
    anyway (a symmetric implementation) gets n = 0 and ``choked`` rejects at once, not silence
    until 64 requests pile up and the connection drops."""
    from p2pnode.identity import server_context

    _seed, manifest = await seeded(tmp_path)
    mid = manifest.id  # type: ignore[attr-defined]
    me = node()
    answers: list[W.Event] = []
    asks = 100  # more than MAX_OUTSTANDING: unanswered, they would break the connection

    async def symmetric_peer(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context(me), server_side=True)
        await tls.do_handshake()
        await tls.send_all(
            W.encode_bytes(W.Hello(me.node_id, 0, capabilities=(b"zstd",)))
            + W.encode_bytes(W.Join(mid))
        )
        decoder = W.FrameDecoder()
        sent = 0
        while len(answers) < 1 + asks:
            if sent < asks:  # a few at a time, within the 64 allowed outstanding
                batch = range(sent, min(asks, sent + 16))
                await tls.send_all(b"".join(W.encode_bytes(W.Request(mid, i, i)) for i in batch))
                sent += len(batch)
            decoder.feed(await tls.receive_some(65536))
            while (ev := decoder.next_event()) is not None:
                if isinstance(ev, (W.Bitfield, W.Reject)):
                    answers.append(ev)
        await tls.send_all(W.encode_bytes(W.Goodbye(b"done")))
        await tls.aclose()

    async def deliver(cid: bytes, data: bytes) -> None:
        raise AssertionError("nothing should arrive")

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
        (listener,) = await nursery.start(serve, symmetric_peer, 0)
        port = listener.socket.getsockname()[1]
        wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
        stats: dict[str, PeerStats] = {}
        with trio.fail_after(20):
            left = await SwarmNode(node(), LocalChunks()).fetch(
                manifest,  # type: ignore[arg-type]
                wanted,
                [("127.0.0.1", port)],
                deliver,
                stats,
            )
        nursery.cancel_scope.cancel()
    assert left == set(wanted)
    assert answers[0] == W.Bitfield(mid, 0, b"")
    assert answers[1:] == [W.Reject(mid, i, i, b"choked") for i in range(asks)]
    (st,) = stats.values()
    assert "outstanding" not in st.error, st.error


async def test_a_leecher_told_only_of_a_leecher_with_nothing_yet_waits_for_its_haves(
    tmp_path: Path,
) -> None:
    """B knows only A, and A has nothing when B asks (A fetches from a seed capped at
    2 MiB/s): A's empty bitfield must not send B to the CDN; A's haves bring B everything."""
    seed, manifest = await seeded(tmp_path)
    seed.upload_limiter.set_rate(2 << 20)
    wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
    a, b = SwarmNode(node(), LocalChunks()), SwarmNode(node(), LocalChunks())
    got: dict[str, set[bytes]] = {"a": set(), "b": set()}
    stats: dict[str, PeerStats] = {}

    async def fetch(name: str, me: SwarmNode, peers: list[tuple[str, int]]) -> None:
        async def deliver(cid: bytes, data: bytes) -> None:
            got[name].add(cid)
            path = tmp_path / f"{name}-{cid.hex()}"
            path.write_bytes(data)
            me.local.add(cid, path, 0, len(data))
            me.have(cid)

        left = await me.fetch(manifest, wanted, peers, deliver, stats if name == "b" else None)  # type: ignore[arg-type]
        assert left == set(), name

    async with trio.open_nursery() as nursery:
        s_port = await nursery.start(seed.serve, "127.0.0.1", 0)
        for me in (a, b):
            me.offer(manifest)  # type: ignore[arg-type]
        a_port = await nursery.start(a.serve, "127.0.0.1", 0)
        with trio.fail_after(60):
            async with trio.open_nursery() as fetches:
                fetches.start_soon(fetch, "a", a, [("127.0.0.1", s_port)])
                fetches.start_soon(fetch, "b", b, [("127.0.0.1", a_port)])
        nursery.cancel_scope.cancel()
    assert got["a"] == got["b"] == set(wanted)
    (st,) = stats.values()
    assert st.node_id == a.identity.node_id and st.chunks == len(wanted)


async def _fetch_from_two_seeds(
    tmp_path: Path, leecher: SwarmNode, seen: Callable[[], None] = lambda: None
) -> tuple[float, int, dict[str, PeerStats]]:
    """``leecher`` fetches the whole release from two uncapped seeds at once (``seen`` is
    called on every chunk): the wall time, the release's size and what each seed gave."""
    seed, manifest = await seeded(tmp_path)
    other = SwarmNode(node(), seed.local)
    other.offer(manifest)  # type: ignore[arg-type]
    wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
    stats: dict[str, PeerStats] = {}

    async def deliver(cid: bytes, data: bytes) -> None:
        assert hash_chunk(data) == cid
        seen()

    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(s.serve, "127.0.0.1", 0) for s in (seed, other)]
        t0 = trio.current_time()
        with trio.fail_after(60):
            left = await leecher.fetch(
                manifest,  # type: ignore[arg-type]
                wanted,
                [("127.0.0.1", port) for port in ports],
                deliver,
                stats,
            )
        seconds = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert left == set()
    size = sum(manifest.unique_chunks().values())  # type: ignore[attr-defined]
    assert sum(st.bytes for st in stats.values()) == size
    return seconds, size, stats


async def test_the_global_download_cap_holds_for_all_peers_together(tmp_path: Path) -> None:
    rate = 3 << 20
    leecher = SwarmNode(node(), LocalChunks(), download_limiter=RateLimiter(rate))
    seconds, size, stats = await _fetch_from_two_seeds(tmp_path, leecher)
    assert all(st.bytes > 0 for st in stats.values())  # both seeds gave, under one cap
    burst = 0.05 * rate  # ratelimit.default_burst
    assert seconds >= 0.7 * (size - burst) / rate


async def test_the_per_peer_download_cap_holds_for_each_connection(tmp_path: Path) -> None:
    rate = 2 << 20
    leecher = SwarmNode(node(), LocalChunks(), peer_download_rate=rate)
    caps: set[RateLimiter] = set()

    def seen() -> None:  # the caps of the connections open at each chunk
        caps.update(link.cap for link in leecher.links)

    seconds, _size, stats = await _fetch_from_two_seeds(tmp_path, leecher, seen)
    assert len(caps) == 2 and {cap.rate for cap in caps} == {rate}  # one cap per connection
    burst = 0.05 * rate  # ratelimit.default_burst
    for st in stats.values():
        assert st.bytes > 0
        assert st.seconds >= 0.7 * (st.bytes - burst) / rate, st  # each held to the cap
    assert seconds >= 0.7 * (max(st.bytes for st in stats.values()) - burst) / rate
    assert leecher.download_limiter.rate is None  # no global cap was set
