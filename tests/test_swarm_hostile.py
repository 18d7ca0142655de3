"""Hostile peers never crash a node, never get a bad byte written, never grow its memory."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import trio

from p2pnode import keys
from p2pnode.chunker import hash_chunk
from p2pnode.identity import NodeIdentity, client_context
from p2pnode.stage import LocalChunks
from p2pnode.swarm import wire as W
from p2pnode.swarm.node import Link, PeerStats, SwarmNode

from .test_swarm_node import node, seeded


async def tls_to(port: int) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(
        stream, client_context(NodeIdentity(keys.generate_key())), server_hostname="p"
    )
    await tls.do_handshake()
    return tls


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
        await trio.sleep(0.2)
        assert seed.connections <= 8 and seed.refused >= 32
        for s in flood:
            await s.aclose()
        await trio.sleep(0.1)
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


async def test_stalling_peers_are_dropped_and_their_chunks_left_for_others(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    for cls in (StallsInHeader, StopsMidChunk):
        bad = cls(node(), seed.local)
        bad.offer(manifest)  # type: ignore[arg-type]
        got: dict[bytes, bytes] = {}

        async def deliver(cid: bytes, data: bytes, got: dict[bytes, bytes] = got) -> None:
            assert hash_chunk(data) == cid
            got[cid] = data

        async with trio.open_nursery() as nursery:
            port = await nursery.start(bad.serve, "127.0.0.1", 0)
            leecher = SwarmNode(node(), LocalChunks(), request_timeout=1.0)
            stats: dict[str, PeerStats] = {}
            wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
            with trio.fail_after(15):
                left = await leecher.fetch(
                    manifest,
                    wanted,
                    [("127.0.0.1", port)],
                    deliver,  # type: ignore[arg-type]
                    stats,
                )
            nursery.cancel_scope.cancel()
        (st,) = stats.values()
        assert "no answer within" in st.error, (cls.__name__, st.error)
        assert left == set(wanted) and not got


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
    wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
    for cls in (StallsInHeader, StopsMidChunk):
        bad = cls(node(), seed.local)
        bad.offer(manifest)  # type: ignore[arg-type]
        got: dict[bytes, bytes] = {}

        async def deliver(cid: bytes, data: bytes, got: dict[bytes, bytes] = got) -> None:
            assert hash_chunk(data) == cid
            got[cid] = data

        async with trio.open_nursery() as nursery:
            bad_port = await nursery.start(bad.serve, "127.0.0.1", 0)
            good_port = await nursery.start(seed.serve, "127.0.0.1", 0)
            leecher = SwarmNode(node(), LocalChunks(), request_timeout=1.0)
            stats: dict[str, PeerStats] = {}
            with trio.fail_after(12):
                left = await leecher.fetch(
                    manifest,  # type: ignore[arg-type]
                    wanted,
                    [("127.0.0.1", bad_port), ("127.0.0.1", good_port)],
                    deliver,
                    stats,
                )
            nursery.cancel_scope.cancel()
        assert left == set() and set(got) == set(wanted), cls.__name__
        assert bad.started  # it was asked, and what it was asked came from the seed
        stalled, good = stats[f"127.0.0.1:{bad_port}"], stats[f"127.0.0.1:{good_port}"]
        assert "no answer within" in stalled.error and stalled.failures == 1, stalled
        assert stalled.chunks == 0 and stalled.node_id == bad.identity.node_id
        assert good.chunks == len(wanted) and good.failures == 0 and not good.error, good
