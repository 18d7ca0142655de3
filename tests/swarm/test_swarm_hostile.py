"""Hostile peers never crash a node, never get a bad byte written, never grow its memory."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pnode.disk.stage import LocalChunks
from p2pnode.identity import NodeIdentity, client_context
from p2pnode.release import keys
from p2pnode.release.chunker import hash_chunk
from p2pnode.swarm import wire as W
from p2pnode.swarm.node import MAX_BAD_CHUNKS, MAX_BANNED, Link, PeerStats, SwarmNode
from p2pnode.swarm.peer import MAX_JOINS, MAX_OUTSTANDING
from tests.support.swarm import CorruptSeed, node, seeded
from tests.support.waiting import until


async def tls_to(port: int, me: NodeIdentity | None = None) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    me = me or NodeIdentity(keys.generate_key())
    tls = trio.SSLStream(stream, client_context(me), server_hostname="p")
    await tls.do_handshake()
    return tls


async def bitfields_from(
    tls: trio.SSLStream[trio.SocketStream], dec: W.FrameDecoder, count: int
) -> list[W.Bitfield]:
    """Read the peer's frames until ``count`` bitfields have come (within 20 s)."""
    got: list[W.Bitfield] = []
    with trio.fail_after(20):
        while len(got) < count:
            data = await tls.receive_some(1 << 16)
            assert data, "the peer hung up"
            dec.feed(data)
            while (ev := dec.next_event()) is not None:
                if isinstance(ev, W.Bitfield):
                    got.append(ev)
    return got


async def hung_up(tls: trio.SSLStream[trio.SocketStream]) -> None:
    """Read until the server closes on us (cleanly or not), within 5 s."""
    with trio.fail_after(5):
        try:
            while await tls.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass


async def still_serves(seed: SwarmNode, port: int, manifest: object) -> None:
    """A well-behaved leecher still gets every chunk."""
    got: dict[bytes, bytes] = {}

    async def deliver(cid: bytes, data: bytes) -> None:
        got[cid] = data

    leecher = SwarmNode(node(), LocalChunks())
    wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
    with trio.fail_after(20):
        left = await leecher.fetch(manifest, wanted, [("127.0.0.1", port)], deliver)  # type: ignore[arg-type]
    assert left == set() and len(got) == len(wanted)


async def test_garbage_and_oversized_frames_close_only_that_connection(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        for junk in (b"\x00" * 5 + b"garbage" * 100, struct.pack(">IH", 1 << 31, 10) + b"x" * 64):
            tls = await tls_to(port)
            await tls.send_all(junk)
            await hung_up(tls)
        await still_serves(seed, port, manifest)
        nursery.cancel_scope.cancel()


async def test_a_flood_of_connections_is_capped(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    seed.max_connections = 8
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        flood = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(40)]
        await until(lambda: seed.refused >= 32)
        assert seed.connections <= 8 and seed.refused >= 32
        for s in flood:
            await s.aclose()
        await until(lambda: seed.connections == 0)  # the slots are free again
        await still_serves(seed, port, manifest)
        nursery.cancel_scope.cancel()


async def test_a_silent_peer_is_dropped_after_the_idle_timeout(tmp_path: Path) -> None:
    seed, _manifest = await seeded(tmp_path)
    seed.idle_timeout = 0.5
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        tls = await tls_to(port)
        await tls.send_all(W.encode_bytes(W.Hello(b"z" * 20, 0))[:7])  # half a frame, then nothing
        await hung_up(tls)
        assert seed.connections == 0
        nursery.cancel_scope.cancel()


class StallsMidPiece(SwarmNode):
    """Sends the first ``keep`` bytes of the first piece (its header only, or half of it),
    then nothing more, with the connection left open."""

    keep: Callable[[int], int] = staticmethod(lambda n: n)
    started = False

    async def _answer(self, link: Link, req: W.Request) -> bytes:
        if self.started:
            return b""
        self.started = True
        ids = self.offers[req.manifest]
        data = await trio.to_thread.run_sync(self.local.read, ids[req.index])
        assert data is not None
        frame = link.session.send(
            W.Piece(req.manifest, req.index, req.rid, ids[req.index], data), 0.0
        )
        return frame[: self.keep(len(frame))]


class StallsInHeader(StallsMidPiece):
    keep = staticmethod(lambda n: 100)


class StopsMidChunk(StallsMidPiece):
    keep = staticmethod(lambda n: n // 2)


async def fetch_beside_a_staller(
    cls: type[StallsMidPiece], seed: SwarmNode, manifest: Any, *, with_seed: bool, limit: float
) -> tuple[set[bytes], set[bytes], dict[str, PeerStats], StallsMidPiece, list[str]]:
    """A leecher (request timeout 1 s) fetches everything from a ``cls`` peer, and from
    ``seed`` too if ``with_seed``, within ``limit`` seconds. Returns what was left, what
    arrived (each chunk verified), the peers' stats, the stalling peer and the addresses
    (the staller's first)."""
    bad = cls(node(), seed.local)
    bad.offer(manifest)
    got: set[bytes] = set()

    async def deliver(cid: bytes, data: bytes) -> None:
        assert hash_chunk(data) == cid
        got.add(cid)

    async with trio.open_nursery() as nursery:
        peers = [("127.0.0.1", await nursery.start(bad.serve, "127.0.0.1", 0))]
        if with_seed:
            peers.append(("127.0.0.1", await nursery.start(seed.serve, "127.0.0.1", 0)))
        leecher = SwarmNode(node(), LocalChunks(), request_timeout=1.0)
        stats: dict[str, PeerStats] = {}
        with trio.fail_after(limit):
            left = await leecher.fetch(
                manifest, list(manifest.unique_chunks()), peers, deliver, stats
            )
        nursery.cancel_scope.cancel()
    return left, got, stats, bad, [f"{host}:{port}" for host, port in peers]


async def test_stalling_peers_are_dropped_and_their_chunks_left_for_others(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    wanted = set(manifest.unique_chunks())  # type: ignore[attr-defined]
    for cls in (StallsInHeader, StopsMidChunk):
        left, got, stats, _bad, _ = await fetch_beside_a_staller(
            cls, seed, manifest, with_seed=False, limit=15
        )
        (st,) = stats.values()
        assert "no answer within" in st.error, (cls.__name__, st.error)
        assert left == wanted and not got


async def tls_offering(port: int, alpn: list[str]) -> trio.SSLStream[trio.SocketStream]:
    """A client with a valid network certificate that offers ``alpn`` (none when empty)."""
    ctx = client_context(NodeIdentity(keys.generate_key()))
    ctx.set_alpn_protocols(alpn)
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="p")
    await tls.do_handshake()
    return tls


async def test_a_client_that_did_not_negotiate_p2pnode_1_is_refused(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        for alpn in (["h2"], [], ["p2pnode/2"]):
            tls = await tls_offering(port, alpn)
            assert tls.selected_alpn_protocol() is None
            received = b""
            with trio.fail_after(5):
                try:
                    while data := await tls.receive_some(65536):
                        received += data
                except trio.BrokenResourceError:
                    pass
            assert received == b"", alpn  # closed before even a hello
        tls = await tls_offering(port, ["h2", "p2pnode/1"])  # the control: it does speak
        assert tls.selected_alpn_protocol() == "p2pnode/1"
        with trio.fail_after(5):
            assert await tls.receive_some(65536)  # its hello
        await tls.aclose()
        await still_serves(seed, port, manifest)
        nursery.cancel_scope.cancel()


async def test_a_flood_of_joins_is_answered_not_kept_and_capped(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    mid = manifest.id  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        me = node()
        tls = await tls_to(port, me)
        joins = [W.Join(mid)] + [W.Join(os.urandom(32)) for _ in range(MAX_JOINS - 1)]
        await tls.send_all(b"".join(W.encode_bytes(e) for e in [W.Hello(me.node_id, 0), *joins]))
        answers = await bitfields_from(tls, W.FrameDecoder(), MAX_JOINS)
        assert [b.manifest for b in answers] == [j.manifest for j in joins]
        assert [b.count > 0 for b in answers] == [True] + [False] * (MAX_JOINS - 1)
        (link,) = seed.links
        assert link.manifests == {mid}  # unknown swarms answered, not remembered
        await tls.send_all(W.encode_bytes(W.Join(os.urandom(32))))  # one join too many
        await hung_up(tls)
        assert not seed.links
        await still_serves(seed, port, manifest)
        nursery.cancel_scope.cancel()


async def test_a_dialler_drops_a_server_that_did_not_negotiate_p2pnode_1(tmp_path: Path) -> None:
    from p2pnode.identity import server_context

    seed, manifest = await seeded(tmp_path)
    seed._server_ctx = server_context(seed.identity)
    seed._server_ctx.set_alpn_protocols(["h2"])  # otherwise a working seed
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        leecher = SwarmNode(node(), LocalChunks())
        stats: dict[str, PeerStats] = {}
        wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]

        async def deliver(cid: bytes, data: bytes) -> None:
            raise AssertionError("nothing may come from a peer that did not agree on p2pnode/1")

        with trio.fail_after(20):
            left = await leecher.fetch(manifest, wanted, [("127.0.0.1", port)], deliver, stats)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    (st,) = stats.values()
    assert left == set(wanted) and "did not negotiate ALPN 'p2pnode/1'" in st.error, st.error


async def test_a_peer_that_stops_reading_is_dropped_and_others_are_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It asks for many chunks and never reads: the seed's writes to it block (socket buffers
    full), and after ``write_timeout`` it is dropped, while a normal leecher is served."""
    caplog.set_level(logging.DEBUG, logger="p2pnode.swarm")
    seed, manifest = await seeded(tmp_path)
    seed.write_timeout = 2.0
    mid = manifest.id  # type: ignore[attr-defined]
    count = len(manifest.unique_chunks())  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        me = node()
        tls = await tls_to(port, me)
        await tls.send_all(W.encode_bytes(W.Hello(me.node_id, 0)) + W.encode_bytes(W.Join(mid)))
        seen: list[W.Event] = []
        dec = W.FrameDecoder()
        with trio.fail_after(20):  # its hello, bitfield and unchoke
            while not any(isinstance(e, W.Unchoke) for e in seen):
                dec.feed(await tls.receive_some(1 << 16))
                seen += iter(dec.next_event, None)
        requests = [W.Request(mid, r % count, r) for r in range(MAX_OUTSTANDING)]
        await tls.send_all(b"".join(W.encode_bytes(r) for r in requests))  # then never reads
        t0 = trio.current_time()
        await still_serves(seed, port, manifest)
        await until(lambda: all(link.node_id != me.node_id for link in seed.links), 30)
        assert trio.current_time() - t0 < 30
        assert "did not take" in caplog.text and "within 2s" in caplog.text
        await tls.aclose()
        nursery.cancel_scope.cancel()


async def drip(tls: trio.SSLStream[trio.SocketStream], data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time, ``every`` seconds apart, until the peer hangs up."""
    try:
        for i in range(len(data)):
            await tls.send_all(data[i : i + 1])
            await trio.sleep(every)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def test_a_slow_drip_cannot_hold_a_connection(tmp_path: Path) -> None:
    """Each byte comes well within the idle timeout, but no frame is ever completed: before
    the hello the hello timeout ends it, after it the idle timeout of the unfinished frame."""
    seed, _manifest = await seeded(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        for hello_first, idle, hello_timeout in ((True, 1.0, 60.0), (False, 60.0, 1.0)):
            seed.idle_timeout, seed.hello_timeout = idle, hello_timeout
            me = node()
            tls = await tls_to(port, me)
            long_frame = W.encode_bytes(W.Goodbye(b"x" * 200))
            if hello_first:
                await tls.send_all(W.encode_bytes(W.Hello(me.node_id, 0)))
            else:
                long_frame = W.encode_bytes(W.Hello(me.node_id, 0)) + long_frame
            async with trio.open_nursery() as dripping:
                dripping.start_soon(drip, tls, long_frame, 0.2)
                await hung_up(tls)
                dripping.cancel_scope.cancel()
        await until(lambda: seed.connections == 0)
        nursery.cancel_scope.cancel()


async def test_a_peer_silent_after_tls_is_dropped_after_the_hello_timeout(tmp_path: Path) -> None:
    seed, _manifest = await seeded(tmp_path)
    seed.hello_timeout = 1.0  # and the idle timeout stays 120 s
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        tls = await tls_to(port)
        await hung_up(tls)  # within 5 s
        await until(lambda: seed.connections == 0)
        nursery.cancel_scope.cancel()


class CountingCorruptSeed(CorruptSeed):
    requests = 0

    async def _answer(self, link: Link, req: W.Request) -> bytes:
        self.requests += 1
        return await super()._answer(link, req)


async def test_a_corrupt_peer_is_banned_by_node_id_on_every_address(tmp_path: Path) -> None:
    """Banned in one fetch, the same node listening on another port is not asked for a chunk
    in the next fetch (nor served when it connects to us)."""
    seed, manifest = await seeded(tmp_path)
    evil = CountingCorruptSeed(node(), seed.local)
    evil.offer(manifest)  # type: ignore[arg-type]
    wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]

    async def deliver(cid: bytes, data: bytes) -> None:
        assert hash_chunk(data) == cid

    async with trio.open_nursery() as nursery:
        first = await nursery.start(evil.serve, "127.0.0.1", 0)
        second = await nursery.start(evil.serve, "127.0.0.1", 0)
        leecher = SwarmNode(node(), LocalChunks())
        stats: dict[str, PeerStats] = {}
        with trio.fail_after(30):
            await leecher.fetch(manifest, wanted, [("127.0.0.1", first)], deliver, stats)  # type: ignore[arg-type]
        assert stats[f"127.0.0.1:{first}"].corrupt == MAX_BAD_CHUNKS
        assert evil.identity.node_id in leecher.banned
        asked = evil.requests
        stats = {}
        with trio.fail_after(30):
            left = await leecher.fetch(manifest, wanted, [("127.0.0.1", second)], deliver, stats)  # type: ignore[arg-type]
        (st,) = stats.values()
        assert "banned" in st.error and st.corrupt == 0 and st.chunks == 0
        assert evil.requests == asked and left == set(wanted)

        leecher_port = await nursery.start(leecher.serve, "127.0.0.1", 0)
        tls = await tls_to(leecher_port, evil.identity)  # the banned node dials us
        try:
            await tls.send_all(W.encode_bytes(W.Hello(evil.identity.node_id, 0)))
        except trio.BrokenResourceError:
            pass  # refused already
        await hung_up(tls)
        assert not leecher.links
        nursery.cancel_scope.cancel()


def test_bans_are_bounded_oldest_forgotten_first() -> None:
    me = SwarmNode(node(), LocalChunks())
    ids = [i.to_bytes(20, "big") for i in range(MAX_BANNED + 10)]
    for nid in ids:
        me.ban(nid)
    me.ban(ids[20])  # banned again: now the newest
    me.ban(b"x" * 20)
    assert len(me.banned) == MAX_BANNED
    assert ids[10] not in me.banned and ids[11] in me.banned and ids[20] in me.banned


async def test_a_stalling_peer_beside_a_good_seed_is_dropped_and_the_seed_finishes(
    tmp_path: Path,
) -> None:
    """The stalling peer's requests are reissued to the good seed, which is capped at 4 MiB/s
    so the stall is noticed (request timeout 1 s) while the fetch still runs. Each fetch takes
    about 2.5 s; the 12 s bound is there because endgame alone would duplicate the stalled
    requests only much later (2 s per unmeasured request queued there, times a slack of 2:
    16 s for a first pipeline of four)."""
    seed, manifest = await seeded(tmp_path)
    seed.upload_limiter.set_rate(4 << 20)
    wanted = set(manifest.unique_chunks())  # type: ignore[attr-defined]
    for cls in (StallsInHeader, StopsMidChunk):
        left, got, stats, bad, (bad_addr, good_addr) = await fetch_beside_a_staller(
            cls, seed, manifest, with_seed=True, limit=12
        )
        assert left == set() and got == wanted, cls.__name__
        assert bad.started  # it was asked, and what it was asked came from the seed
        stalled, good = stats[bad_addr], stats[good_addr]
        assert "no answer within" in stalled.error and stalled.failures == 1, stalled
        assert stalled.chunks == 0 and stalled.node_id == bad.identity.node_id
        assert good.chunks == len(wanted) and good.failures == 0 and not good.error, good
