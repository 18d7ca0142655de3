"""The peer wire codec, fed whole, byte at a time, with trailing data, and fuzzed."""

from __future__ import annotations

import os
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import LocalProtocolError, RemoteProtocolError
from p2pnode.swarm import wire as W

MID = bytes(range(32))
NID = bytes(range(20))

SAMPLES: list[W.Event] = [
    W.Hello(NID, 6881, capabilities=(b"zstd",)),
    W.Join(MID),
    W.Bitfield(MID, 10, bytes([0b1010_0000, 0b0100_0000])),
    W.Have(MID, 7),
    W.Request(MID, 3, 99),
    W.Cancel(MID, 3, 99),
    W.Reject(MID, 3, 99, b"choked"),
    W.Piece(MID, 3, 99, bytes(32), os.urandom(5000)),
    W.Piece(MID, 4, 100, bytes(32), b"A" * 100_000),  # compresses
    W.ManifestPush(MID, b"d8:manifest...e"),
    W.Choke(),
    W.Unchoke(),
    W.Keepalive(),
    W.Goodbye(b"shutting down"),
]


def decode_all(data: bytes, step: int | None = None) -> list[W.Event]:
    dec = W.FrameDecoder()
    out: list[W.Event] = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in chunks:
        dec.feed(piece)
        while (ev := dec.next_event()) is not None:
            out.append(ev)
    return out


def same(a: W.Event, b: W.Event) -> bool:
    if isinstance(a, W.Piece) and isinstance(b, W.Piece):
        return (a.manifest, a.index, a.rid, a.chunk_id, bytes(a.data)) == (
            b.manifest,
            b.index,
            b.rid,
            b.chunk_id,
            bytes(b.data),
        )
    if isinstance(a, W.ManifestPush) and isinstance(b, W.ManifestPush):
        return (a.manifest, bytes(a.signed)) == (b.manifest, bytes(b.signed))
    if isinstance(a, W.Bitfield) and isinstance(b, W.Bitfield):
        return (a.manifest, a.count, bytes(a.bits)) == (b.manifest, b.count, bytes(b.bits))
    return a == b


def test_golden_bytes_of_a_request() -> None:
    frame = W.encode_bytes(W.Request(MID, 3, 99))
    head = b"d1:i" + b"i3e" + b"1:m32:" + MID + b"1:ri99e1:t3:reqe"
    assert frame == struct.pack(">IH", 2 + len(head), len(head)) + head


@pytest.mark.parametrize("step", [None, 1, 7, 4096])
def test_round_trip_whole_byte_at_a_time_and_in_pieces(step: int | None) -> None:
    data = b"".join(W.encode_bytes(e) for e in SAMPLES)
    got = decode_all(data, step)
    assert len(got) == len(SAMPLES)
    assert all(same(a, b) for a, b in zip(SAMPLES, got, strict=True))


def test_trailing_partial_frame_waits_then_eof_is_an_error() -> None:
    data = W.encode_bytes(W.Have(MID, 1)) + W.encode_bytes(W.Have(MID, 2))[:-3]
    dec = W.FrameDecoder()
    dec.feed(data)
    assert dec.next_event() == W.Have(MID, 1)
    assert dec.next_event() is None
    dec.feed(b"")
    with pytest.raises(RemoteProtocolError, match="ended inside a frame"):
        dec.next_event()


def test_compression_only_when_it_pays() -> None:
    raw = os.urandom(100_000)
    assert len(W.encode_bytes(W.Piece(MID, 0, 0, bytes(32), raw))) > len(raw)
    packed = W.encode_bytes(W.Piece(MID, 0, 0, bytes(32), b"\0" * 100_000))
    assert len(packed) < 1000


def test_unknown_types_are_reported_not_fatal() -> None:
    from p2pnode.release import canonical

    head = canonical.encode({b"t": b"gossip", b"x": 1})
    frame = struct.pack(">IH", 2 + len(head), len(head)) + head
    assert decode_all(frame + W.encode_bytes(W.Keepalive())) == [
        W.Unknown(b"gossip"),
        W.Keepalive(),
    ]


def frame_of(header: dict[bytes, object], payload: bytes = b"") -> bytes:
    from p2pnode.release import canonical

    head = canonical.encode(header)
    return struct.pack(">IH", 2 + len(head) + len(payload), len(head)) + head + payload


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">IH", W.MAX_FRAME_BYTES + 1, 10),  # oversized frame, refused before data
        struct.pack(">IH", 100, W.MAX_HEADER_BYTES + 1),  # oversized header
        struct.pack(">IH", 3, 5) + b"abc",  # header longer than the frame
        frame_of({b"t": b"have", b"m": MID}),  # missing index
        frame_of({b"t": b"have", b"m": b"short", b"i": 1}),  # bad id
        frame_of({b"t": b"have", b"m": MID, b"i": -1}),  # negative index
        frame_of({b"t": b"bitfield", b"m": MID, b"n": 9}, b"\xff\xff"),  # spare bits set
        frame_of({b"t": b"bitfield", b"m": MID, b"n": 100}, b"\xff"),  # short bitfield
        frame_of({b"t": b"piece", b"m": MID, b"i": 0, b"r": 0, b"c": MID, b"n": 5}, b"abc"),
        frame_of(
            {b"t": b"piece", b"m": MID, b"i": 0, b"r": 0, b"c": MID, b"n": 5, b"z": 1}, b"not zstd"
        ),
        frame_of({b"t": b"piece", b"m": MID, b"i": 0, b"r": 0, b"c": MID, b"n": 2**30}, b"x"),
        frame_of({b"t": b"choke"}, b"payload"),  # payload where none belongs
        frame_of({b"t": 5}),  # type not a string
        struct.pack(">IH", 6, 4) + b"d1:t",  # truncated bencode
        struct.pack(">IH", 16, 14) + b"d1:ti1e1:ai1ee",  # keys out of order (not canonical)
    ],
)
def test_malformed_frames_are_remote_protocol_errors(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_all(frame)


@pytest.mark.parametrize(
    "head",
    [
        b"d1:ti1e1:ai1ee",  # keys out of order
        b"d1:t2:ka1:ai1ee",  # a valid keepalive but for the key order
        b"d1:t2:ka1:t2:kae",  # duplicate key
    ],
)
def test_a_header_that_is_not_canonical_bencode_is_refused(head: bytes) -> None:
    frame = struct.pack(">IH", 2 + len(head), len(head)) + head
    with pytest.raises(RemoteProtocolError, match="canonical"):
        decode_all(frame)


def test_optional_fields_take_their_defaults() -> None:
    """protocol.md marks hello's caps and piece's z optional: absent, they mean no
    capabilities and a raw chunk."""
    (hello,) = decode_all(frame_of({b"t": b"hello", b"v": 1, b"id": NID, b"port": 0}))
    assert hello == W.Hello(NID, 0, 1, ())
    data = b"chunk bytes"
    header = {b"t": b"piece", b"m": MID, b"i": 2, b"r": 5, b"c": bytes(32), b"n": len(data)}
    (piece,) = decode_all(frame_of(header, data))
    assert same(piece, W.Piece(MID, 2, 5, bytes(32), data))


def zstd_piece(payload: bytes, n: int) -> bytes:
    return frame_of(
        {b"t": b"piece", b"m": MID, b"i": 0, b"r": 0, b"c": MID, b"n": n, b"z": 1}, payload
    )


# Decodes hostile compressed pieces in a fresh process and prints its peak RSS growth in KiB:
# a bomb's cost must show there, whether Python or libzstd allocates it (tracemalloc would
# see only the former; this process's own high-water mark may already be above the bomb's).
_BOMB_PROBE = """
import resource, sys, zstandard
from p2pnode.errors import RemoteProtocolError
from tests.swarm.test_wire import zstd_piece, decode_all

def declaring(size):  # 256 MiB of zeros, in ~8 KiB, the header declaring its size
    c = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    return b"".join([c.compress(bytes(1 << 20)) for _ in range(size >> 20)] + [c.flush()])

hostile = [
    zstd_piece(declaring(256 << 20), 4096),  # declares 256 MiB for a 4 KiB piece
    zstd_piece(zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4096)), 4096),
]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = []
for frame in hostile:
    try:
        decode_all(frame)
    except RemoteProtocolError as exc:
        errors.append(str(exc))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
print(*errors, sep="\\n")
"""


def test_a_zstd_bomb_costs_no_more_memory_than_the_declared_size() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _BOMB_PROBE],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    grown_kib, errors = int(out[0]), out[1:]
    assert grown_kib < 64 * 1024, f"decoding the bombs grew RSS by {grown_kib} KiB"
    assert len(errors) == 2 and all("must declare its size n = 4096" in e for e in errors)
    assert f"it declares {256 << 20} bytes" in errors[0] and "it declares no size" in errors[1]


@pytest.mark.parametrize(
    "payload",
    [
        zstandard.ZstdCompressor().compress(b"\0" * (8 << 20)),  # declares 8 MiB, n is 1024
        zstandard.ZstdCompressor().compress(b"\0" * 512),  # declares less than n
        zstandard.ZstdCompressor().compress(b"\0" * 1024) + b"x",  # trailing bytes
        zstandard.ZstdCompressor().compress(b"\0" * 1024)
        + zstandard.ZstdCompressor().compress(b"\0" * 1024),  # a second frame
        zstandard.ZstdCompressor().compress(b"\0" * 1024)[:-3],  # cut short
        b"",
    ],
)
def test_compressed_pieces_must_be_one_frame_declaring_their_size(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_all(zstd_piece(payload, 1024))
    good = zstandard.ZstdCompressor().compress(b"\0" * 1024)
    (piece,) = decode_all(zstd_piece(good, 1024))
    assert isinstance(piece, W.Piece) and bytes(piece.data) == b"\0" * 1024


def test_building_invalid_messages_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        W.Have(b"short", 1)
    with pytest.raises(LocalProtocolError):
        W.Piece(MID, 0, 0, MID, b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_events_or_remote_protocol_errors(data: bytes) -> None:
    for step in (None, 1):
        try:
            decode_all(data, step)
        except RemoteProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(SAMPLES) - 1), st.integers(0, 10_000), st.integers(0, 255))
def test_mutated_frames_never_crash(which: int, pos: int, byte: int) -> None:
    frame = bytearray(W.encode_bytes(SAMPLES[which], compress=False))
    frame[pos % len(frame)] = byte
    try:
        decode_all(bytes(frame))
    except RemoteProtocolError:
        pass
