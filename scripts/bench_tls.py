#!/usr/bin/env python3
"""What encryption costs the swarm on loopback: chunk transfer with TLS 1.3 on vs off.

One node serves chunks of 1 MiB as wire ``piece`` frames (the same codec, uncompressed random
data) to one reader over loopback, once over trio's SSLStream with the nodes' mutual-auth
contexts and once over plain TCP, in the same run. Prints a table and, last, one JSON line:
``tls_mb_s``, ``plain_mb_s``, ``cost`` (1 - tls/plain).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pnode.identity import NodeIdentity, client_context, server_context
from p2pnode.release import keys
from p2pnode.swarm import wire as W

CHUNK = 1 << 20
TOTAL = 512 << 20


async def run(tls: bool) -> float:
    a, b = NodeIdentity(keys.generate_key()), NodeIdentity(keys.generate_key())
    data = os.urandom(CHUNK)
    mid = bytes(32)
    frame = W.encode(W.Piece(mid, 0, 0, bytes(32), data), compress=False)
    done = trio.Event()
    elapsed = 0.0

    async def serve(stream: trio.SocketStream) -> None:
        s: trio.abc.Stream = stream
        if tls:
            s = trio.SSLStream(stream, server_context(a), server_side=True)
            await s.do_handshake()
        for _ in range(TOTAL // CHUNK):
            for part in frame:
                await s.send_all(part)
        await done.wait()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        s: trio.abc.Stream = stream
        if tls:
            s = trio.SSLStream(stream, client_context(b), server_hostname="peer")
            await s.do_handshake()
        decoder = W.FrameDecoder()
        got = 0
        t = time.perf_counter()
        while got < TOTAL // CHUNK:
            decoder.feed(await s.receive_some(1 << 20))
            while (ev := decoder.next_event()) is not None:
                assert isinstance(ev, W.Piece)
                got += 1
        elapsed = time.perf_counter() - t
        done.set()
        nursery.cancel_scope.cancel()
    return TOTAL / elapsed / 1e6


def measure(rounds: int = 3) -> dict[str, float]:
    """Best of ``rounds`` runs each way, alternating, so that whatever else the machine does
    weighs on both alike (single runs vary 2x and more here; scripts/bench_swarm.py reports
    this too)."""
    plain = enc = 0.0
    for _ in range(rounds):
        plain = max(plain, trio.run(run, False))
        enc = max(enc, trio.run(run, True))
    return {"plain_mb_s": round(plain), "tls_mb_s": round(enc), "cost": round(1 - enc / plain, 3)}


def main() -> None:
    out = measure()
    print(f"plain TCP, wire frames   {out['plain_mb_s']:7.0f} MB/s")
    print(f"TLS 1.3 (mutual auth)    {out['tls_mb_s']:7.0f} MB/s")
    print(f"cost of encryption       {out['cost']:7.0%}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
