"""Two PeerSessions joined in memory: handshake, choking, requests and pieces, limits, timers."""

from __future__ import annotations

import os

import pytest

from p2pnode.errors import LocalProtocolError, RemoteProtocolError
from p2pnode.release.chunker import hash_chunk
from p2pnode.swarm import wire as W
from p2pnode.swarm.peer import (
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    KEEPALIVE_AFTER,
    MAX_JOINS,
    MAX_OUTSTANDING,
    PeerSession,
    SessionState,
)

MID = bytes(32)
A_ID, B_ID = b"a" * 20, b"b" * 20


def events(s: PeerSession, data: bytes, now: float = 0.0) -> list[W.Event]:
    s.receive_data(data, now)
    out = []
    while (ev := s.next_event()) is not None:
        out.append(ev)
    return out


def pair() -> tuple[PeerSession, PeerSession]:
    a = PeerSession(A_ID, 6881, now=0.0, expected_id=B_ID)
    b = PeerSession(B_ID, 6882, now=0.0)
    assert [e.node_id for e in events(b, a.hello(0.0))] == [A_ID]  # type: ignore[attr-defined]
    assert [e.node_id for e in events(a, b.hello(0.0))] == [B_ID]  # type: ignore[attr-defined]
    return a, b


def test_a_chunk_changes_hands() -> None:
    a, b = pair()
    data = os.urandom(10_000)
    cid = hash_chunk(data)
    with pytest.raises(LocalProtocolError, match="chokes us"):
        a.request(MID, 0, 0.0)
    assert events(a, b.send(W.Unchoke(), 0.0)) == [W.Unchoke()]
    rid, wire_bytes = a.request(MID, 0, 0.0)
    (req,) = events(b, wire_bytes)
    assert req == W.Request(MID, 0, rid)
    (piece,) = events(a, b.send(W.Piece(MID, 0, rid, cid, data), 0.1))
    assert isinstance(piece, W.Piece) and bytes(piece.data) == data and not a.ours


def test_first_message_must_be_hello_and_only_once() -> None:
    b = PeerSession(B_ID, 1, now=0.0)
    with pytest.raises(RemoteProtocolError, match="first message"):
        events(b, W.encode_bytes(W.Keepalive()))
    _a, b = pair()
    with pytest.raises(RemoteProtocolError, match="second hello"):
        events(b, W.encode_bytes(W.Hello(A_ID, 1)))


@pytest.mark.parametrize("version", [2, 999])
def test_a_hello_of_another_protocol_version_is_refused(version: int) -> None:
    b = PeerSession(B_ID, 1, now=0.0)
    with pytest.raises(RemoteProtocolError, match=f"version {version} is not supported"):
        events(b, W.encode_bytes(W.Hello(A_ID, 1, version=version)))
    assert b.state is SessionState.CLOSED and b.peer is None


def test_hello_must_name_the_node_we_dialled() -> None:
    a = PeerSession(A_ID, 1, now=0.0, expected_id=B_ID)
    with pytest.raises(RemoteProtocolError, match="another node"):
        events(a, W.encode_bytes(W.Hello(b"x" * 20, 1)))


def test_request_flood_is_refused() -> None:
    _a, b = pair()
    flood = b"".join(W.encode_bytes(W.Request(MID, i, i)) for i in range(MAX_OUTSTANDING + 1))
    with pytest.raises(RemoteProtocolError, match="outstanding"):
        events(b, flood)


def test_unrequested_pieces_are_dropped_then_fatal() -> None:
    a, _b = pair()
    junk = W.encode_bytes(W.Piece(MID, 0, 7, bytes(32), b"x" * 100))
    for _ in range(8):
        assert events(a, junk) == []
    with pytest.raises(RemoteProtocolError, match="nobody asked"):
        events(a, junk)


def test_answers_to_cancelled_requests_are_dropped_without_blame() -> None:
    """Endgame cancels many requests whose answers are already on the wire."""
    a, b = pair()
    events(a, b.send(W.Unchoke(), 0.0))
    for _ in range(3 * MAX_OUTSTANDING):
        rid, wire_bytes = a.request(MID, 1, 0.0)
        events(b, wire_bytes)
        a.send(W.Cancel(MID, 1, rid), 0.0)
        answer = b.send(W.Piece(MID, 1, rid, bytes(32), b"x"), 0.0)  # crossed the cancel
        assert events(a, answer) == []
    assert a.unsolicited == 0 and not a.cancelled


@pytest.mark.parametrize("caps", [(), (b"zstd",)])
def test_pieces_are_compressed_only_for_a_peer_that_lists_zstd(caps: tuple[bytes, ...]) -> None:
    b = PeerSession(B_ID, 1, now=0.0)
    events(
        b,
        W.encode_bytes(W.Hello(A_ID, 1, capabilities=caps)) + W.encode_bytes(W.Request(MID, 0, 7)),
    )
    data = b"\0" * 100_000  # compresses very well
    frame = b.send(W.Piece(MID, 0, 7, hash_chunk(data), data), 0.0)
    assert (len(frame) < len(data)) == (caps == (b"zstd",))
    decoder = W.FrameDecoder()
    decoder.feed(frame)
    piece = decoder.next_event()
    assert isinstance(piece, W.Piece) and bytes(piece.data) == data


def test_manifest_pushes_are_bounded_per_connection() -> None:
    _a, b = pair()
    push = W.encode_bytes(W.ManifestPush(MID, b"x" * 1000))
    assert len(events(b, push + push)) == 2
    with pytest.raises(RemoteProtocolError, match="manifests pushed"):
        events(b, push)


def test_joins_are_bounded_per_connection() -> None:
    _a, b = pair()
    join = W.encode_bytes(W.Join(MID))
    assert len(events(b, join * MAX_JOINS)) == MAX_JOINS
    with pytest.raises(RemoteProtocolError, match="joins"):
        events(b, join)


def test_answers_only_what_was_asked() -> None:
    _a, b = pair()
    with pytest.raises(LocalProtocolError):
        b.send(W.Reject(MID, 0, 1, b"no"), 0.0)


def test_keepalive_and_idle_timeout() -> None:
    a, b = pair()
    assert a.get_timer() == KEEPALIVE_AFTER
    ka = a.handle_timer(KEEPALIVE_AFTER)
    assert events(b, ka, KEEPALIVE_AFTER) == [W.Keepalive()]
    with pytest.raises(RemoteProtocolError, match="silent"):
        a.handle_timer(IDLE_TIMEOUT + 1)


def test_overdue_requests_are_listed_for_reissue() -> None:
    a, b = pair()
    events(a, b.send(W.Unchoke(), 0.0))
    rid, _ = a.request(MID, 5, 1.0)
    assert a.overdue(2.0, deadline=5.0) == []
    assert [r for r, _ in a.overdue(7.0, deadline=5.0)] == [rid]


def test_a_peer_that_sends_no_hello_is_dropped_after_the_hello_timeout() -> None:
    b = PeerSession(B_ID, 6882, now=100.0)
    assert b.get_timer() == 100.0 + HELLO_TIMEOUT < 100.0 + KEEPALIVE_AFTER
    assert b.handle_timer(100.0 + HELLO_TIMEOUT - 0.1) == b""
    with pytest.raises(RemoteProtocolError, match="no hello"):
        b.handle_timer(100.0 + HELLO_TIMEOUT)
    # Bytes do not extend it: a hello dripped a byte at a time is as late as no hello.
    c = PeerSession(B_ID, 6882, now=0.0)
    hello = PeerSession(A_ID, 6881, now=0.0).hello(0.0)
    for t in range(int(HELLO_TIMEOUT) + 1):
        assert events(c, hello[t : t + 1], float(t)) == []
    with pytest.raises(RemoteProtocolError, match="no hello"):
        c.handle_timer(c.get_timer())


def test_a_frame_dripped_a_byte_at_a_time_must_still_arrive_within_the_idle_timeout() -> None:
    a, b = pair()
    b.idle_timeout = 10.0
    frame = a.send(W.Goodbye(b"x" * 100), 0.0)
    t = 0.0
    for byte in range(len(frame) - 1):  # every byte well within the idle timeout of the last
        t += 1.0
        if t >= 10.0:
            break
        assert events(b, frame[byte : byte + 1], t) == []
        assert b.get_timer() == 1.0 + 10.0  # the frame's first byte came at t = 1
    with pytest.raises(RemoteProtocolError, match="frame took more than"):
        b.handle_timer(11.0)


def test_whole_frames_reset_the_drip_clock() -> None:
    a, b = pair()
    b.idle_timeout = 10.0
    ka = a.send(W.Keepalive(), 0.0)
    for t in range(1, 40):  # a keepalive every 9 s, each in two halves 4.5 s apart: alive
        assert events(b, ka[:3], 9.0 * t - 4.5) == []
        assert events(b, ka[3:], 9.0 * t) == [W.Keepalive()]
        b.handle_timer(9.0 * t + 1)  # (a keepalive of ours, maybe; no error)


def test_a_side_that_does_not_serve_declines_joins_pushes_and_requests_at_once() -> None:
    a, _b = pair()
    join, req = events(a, W.encode_bytes(W.Join(MID)) + W.encode_bytes(W.Request(MID, 3, 7)))
    assert isinstance(join, W.Join) and isinstance(req, W.Request)
    decoder = W.FrameDecoder()
    decoder.feed(a.decline(join, 0.0) + a.decline(req, 0.0))
    assert decoder.next_event() == W.Bitfield(MID, 0, b"")
    assert decoder.next_event() == W.Reject(MID, 3, 7, b"choked")
    assert not a.theirs  # the request is answered: nothing owed


def test_cancel_finds_the_request_by_chunk_and_its_answer_is_not_blamed() -> None:
    a, b = pair()
    events(a, b.send(W.Unchoke(), 0.0))
    rid, data = a.request(MID, 7, 0.0)
    events(b, data)
    assert a.cancel(MID, 8, 0.1) == b""  # nothing outstanding for chunk 8
    cancel = a.cancel(MID, 7, 0.1)
    assert events(b, cancel) == [W.Cancel(MID, 7, rid)] and not a.ours
    assert a.cancel(MID, 7, 0.2) == b""  # once


def test_an_answer_says_which_request_it_answered_and_when_it_was_asked() -> None:
    a, b = pair()
    events(a, b.send(W.Unchoke(), 0.0))
    data = os.urandom(5000)
    rid, req = a.request(MID, 3, 1.5)
    events(b, req)
    (piece,) = events(a, b.send(W.Piece(MID, 3, rid, hash_chunk(data), data), 2.0))
    assert isinstance(piece, W.Piece) and a.answered is not None
    assert (a.answered.manifest, a.answered.index, a.answered.sent_at) == (MID, 3, 1.5)
    rid, req = a.request(MID, 4, 2.5)
    events(b, req)
    (reject,) = events(a, b.send(W.Reject(MID, 4, rid, b"choked"), 3.0))
    assert isinstance(reject, W.Reject) and a.answered.index == 4 and not a.ours


def test_a_bitfield_for_a_joined_manifest_must_have_its_size_or_zero() -> None:
    a, b = pair()
    assert events(b, a.join(MID, 10, 0.0)) == [W.Join(MID)]
    other = bytes([1]) * 32
    assert events(a, b.send(W.Bitfield(MID, 0, b""), 0.0)) == [W.Bitfield(MID, 0, b"")]
    assert len(events(a, b.send(W.Bitfield(MID, 10, b"\xff\xc0"), 0.0))) == 1
    assert len(events(a, b.send(W.Bitfield(other, 3, b"\xe0"), 0.0))) == 1  # not joined
    with pytest.raises(RemoteProtocolError, match="bitfield size"):
        events(a, b.send(W.Bitfield(MID, 9, b"\xff\x80"), 0.0))
    assert a.state is SessionState.CLOSED


def test_a_manifest_is_shown_once_and_only_to_a_peer_that_takes_pushes() -> None:
    a, b = pair()  # b's hello lists the manifest capability
    push = a.show(MID, b"signed", 0.0)
    assert events(b, push) == [W.ManifestPush(MID, b"signed")] and MID in a.shown
    assert a.show(MID, b"signed", 0.1) == b""  # once per manifest and connection
    c = PeerSession(A_ID, 1, now=0.0)
    events(c, W.encode_bytes(W.Hello(B_ID, 2, capabilities=(b"zstd",))))
    assert c.show(MID, b"signed", 0.0) == b"" and not c.shown


def test_a_served_piece_is_framed_around_the_callers_buffer_not_a_copy() -> None:
    a, b = pair()
    events(a, b.send(W.Unchoke(), 0.0))
    data = os.urandom(1 << 20)  # incompressible: sent as is even to a zstd peer
    rid, req = a.request(MID, 0, 0.0)
    events(b, req)
    frame = b.send_frame(W.Piece(MID, 0, rid, hash_chunk(data), data), 0.1)
    assert frame[-1] is data
    (piece,) = events(a, b"".join(frame))
    assert isinstance(piece, W.Piece) and bytes(piece.data) == data
