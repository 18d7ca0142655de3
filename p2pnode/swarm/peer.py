"""One peer connection's protocol state, sans-IO (docs/protocol.md section 5).

Theory of operation
-------------------
:class:`PeerSession` sits between the wire codec and the node. Bytes from the peer go in
(``receive_data``); checked events come out (``next_event``). Messages to the peer go in
(``send``); bytes come out. It enforces the session rules that do not need the node's knowledge:
``hello`` first, version, the bound on requests outstanding each way, that every piece answers
a request of ours (``ours``, by request id: the dialler's in-flight map), that a bitfield
answering our ``join`` has the manifest's size, at most one manifest pushed per swarm joined,
and the keepalive and idle deadlines (``get_timer``/``handle_timer`` with
``now`` passed in, as aioquic does). What to request, whom to unchoke and what to serve are the
scheduler's and choker's decisions, made outside.

Errors: a peer that breaks a rule raises ``RemoteProtocolError`` from ``next_event`` or
``receive_data``, and the session is ``CLOSED`` from then on; sending something the rules forbid
raises ``LocalProtocolError``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..errors import LocalProtocolError, RemoteProtocolError
from . import wire as W
from .recent import RecentSet

__all__ = ["HELLO_TIMEOUT", "MAX_JOINS", "MAX_OUTSTANDING", "PeerSession", "SessionState"]

#: Requests one side may have outstanding with the other (the pipeline depth bound).
MAX_OUTSTANDING = 64
KEEPALIVE_AFTER = 30.0
IDLE_TIMEOUT = 120.0
#: The peer's hello must arrive this soon after the session starts (the TLS handshake is
#: done): a peer that connects and says nothing would otherwise hold one of a node's
#: connection slots for the whole idle timeout.
HELLO_TIMEOUT = 5.0
#: A peer may send at most this many unrequested or late pieces before it is dropped.
MAX_UNSOLICITED = 8
#: Manifests a peer may push on one connection (each costs a parse and a signature check).
MAX_PUSHES = 2
#: Joins a peer may send on one connection: a node takes part in a few swarms, and each join
#: costs a bitfield answer (and a swarm kept per connection), so a flood of joins is an error.
MAX_JOINS = 64
CAPABILITIES = (b"zstd", b"manifest")


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"  # waiting for the peer's hello
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Outstanding:
    manifest: bytes
    index: int
    sent_at: float


@dataclass
class PeerSession:
    """Args:
    node_id, listen_port: what our ``hello`` says.
    now: the clock reading at creation.
    expected_id: the node id this connection must reach (outbound), or None (inbound).
    """

    node_id: bytes
    listen_port: int
    now: float
    expected_id: bytes | None = None
    idle_timeout: float = IDLE_TIMEOUT
    hello_timeout: float = HELLO_TIMEOUT
    state: SessionState = SessionState.HANDSHAKE
    peer: W.Hello | None = None
    am_choking: bool = True  # we reject their requests
    peer_choking: bool = True  # they reject ours
    ours: dict[int, Outstanding] = field(default_factory=dict)  # our requests, by rid
    theirs: set[tuple[bytes, int, int]] = field(default_factory=set)  # (m, i, rid) to answer
    unsolicited: int = 0
    pushes: int = 0
    joins: int = 0
    #: Manifests we joined, with their number of unique chunks (what their bitfields must say).
    joined: dict[bytes, int] = field(default_factory=dict)
    #: Manifests we pushed (``show``): once each per connection.
    shown: set[bytes] = field(default_factory=set)
    #: The request of ours that the last ``piece`` or ``reject`` from ``next_event`` answered.
    answered: Outstanding | None = None
    #: Our last cancelled request ids: their answers may cross the cancel, and are not blamed.
    cancelled: RecentSet[int] = field(default_factory=lambda: RecentSet(MAX_OUTSTANDING))
    _decoder: W.FrameDecoder = field(default_factory=W.FrameDecoder)
    _next_rid: int = 0
    _last_sent: float = 0.0
    _last_received: float = 0.0
    _partial_since: float | None = None  # when the frame now half-received began to arrive

    def __post_init__(self) -> None:
        self._last_sent = self._last_received = self.now

    # -- outgoing ---------------------------------------------------------------------------

    def hello(self, now: float, extra: tuple[bytes, ...] = ()) -> bytes:
        """Our first frame; ``extra`` capabilities describe the node (``origin``: a seed box
        whose upload the swarm should spare)."""
        caps = CAPABILITIES + extra
        return self.send(W.Hello(self.node_id, self.listen_port, capabilities=caps), now)

    def peer_can(self, capability: bytes) -> bool:
        return self.peer is not None and capability in self.peer.capabilities

    def request(self, manifest: bytes, index: int, now: float) -> tuple[int, bytes]:
        """Ask for chunk ``index``; returns the request id and the bytes to send."""
        rid = self._next_rid
        self._next_rid = (self._next_rid + 1) % (1 << 32)
        return rid, self.send(W.Request(manifest, index, rid), now)

    def join(self, manifest: bytes, count: int, now: float) -> bytes:
        """Join ``manifest``'s swarm, which has ``count`` unique chunks: the peer's bitfield
        for it must then say ``count`` or 0 (protocol.md section 5, roles)."""
        self.joined[manifest] = count
        return self.send(W.Join(manifest), now)

    def cancel(self, manifest: bytes, index: int, now: float) -> bytes:
        """Cancel our request for chunk ``index``, if one is outstanding (b"" if not)."""
        for rid, o in self.ours.items():
            if (o.manifest, o.index) == (manifest, index):
                return self.send(W.Cancel(manifest, index, rid), now)
        return b""

    def show(self, manifest: bytes, signed: bytes, now: float) -> bytes:
        """Push the signed ``manifest`` to a peer that said it does not know it, so that it
        may serve what its earlier builds share with it: once per manifest and connection,
        and only to a peer that takes pushes (b"" when not allowed)."""
        if manifest in self.shown or not self.peer_can(b"manifest"):
            return b""
        self.shown.add(manifest)
        return self.send(W.ManifestPush(manifest, signed), now)

    def decline(self, event: W.Join | W.ManifestPush | W.Request, now: float) -> bytes:
        """The answer to a ``join``, ``manifest`` or ``req`` on a connection that does not
        serve (one we dialled: protocol.md section 5, roles): ``n`` = 0 for the first two,
        a ``choked`` reject for a request, so the peer is told at once instead of waiting."""
        if isinstance(event, W.Request):
            return self.send(W.Reject(event.manifest, event.index, event.rid, b"choked"), now)
        return self.send(W.Bitfield(event.manifest, 0, b""), now)

    def send(self, event: W.Event, now: float) -> bytes:
        return b"".join(self.send_frame(event, now))

    def send_frame(self, event: W.Event, now: float) -> list[bytes | memoryview]:
        """As :meth:`send`, but the frame as buffers to write in order: a piece's bytes are
        the caller's buffer, not a copy (h11's data passthrough)."""
        if self.state is SessionState.CLOSED:
            raise LocalProtocolError("the session is closed")
        if isinstance(event, W.Request):
            if self.peer_choking:
                raise LocalProtocolError("requesting from a peer that chokes us")
            if len(self.ours) >= MAX_OUTSTANDING:
                raise LocalProtocolError(f"more than {MAX_OUTSTANDING} requests outstanding")
            self.ours[event.rid] = Outstanding(event.manifest, event.index, now)
        elif isinstance(event, W.Cancel):
            if self.ours.pop(event.rid, None) is not None:
                # Its answer may already be on the way: expected, so not held against the peer.
                self.cancelled.add(event.rid)
        elif isinstance(event, (W.Piece, W.Reject)):
            key = (event.manifest, event.index, event.rid)
            if key not in self.theirs:
                raise LocalProtocolError("answering a request the peer did not make")
            self.theirs.discard(key)
        elif isinstance(event, W.Choke):
            self.am_choking = True
        elif isinstance(event, W.Unchoke):
            self.am_choking = False
        elif isinstance(event, W.Goodbye):
            self.state = SessionState.CLOSED
        self._last_sent = now
        # zstd only to a peer that said it decodes it (protocol.md: the zstd capability).
        return W.encode(event, compress=self.peer_can(b"zstd"))

    # -- incoming ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray, now: float) -> None:
        """Bytes from the peer; ``b""`` when it closed the stream."""
        self._last_received = now
        try:
            self._decoder.feed(data)
        except RemoteProtocolError:
            self.state = SessionState.CLOSED
            raise

    def next_event(self) -> W.Event | None:
        """The next checked message from the peer, or None when more bytes are needed."""
        while True:
            try:
                event = self._decoder.next_event()
            except RemoteProtocolError:
                self.state = SessionState.CLOSED
                raise
            if event is None:
                # Any byte resets the idle clock, so a peer dripping a frame a byte at a time
                # would never be idle: a frame must also arrive whole within the idle timeout.
                if not self._decoder.buffered:
                    self._partial_since = None
                elif self._partial_since is None:
                    self._partial_since = self._last_received
                return None
            self._partial_since = None
            checked = self._check(event)
            if checked is not None:
                return checked

    def _fail(self, why: str) -> RemoteProtocolError:
        self.state = SessionState.CLOSED
        return RemoteProtocolError(why)

    def _check(self, event: W.Event) -> W.Event | None:
        if self.state is SessionState.CLOSED:
            raise self._fail("message after the session closed")
        if self.state is SessionState.HANDSHAKE:
            if not isinstance(event, W.Hello):
                raise self._fail("the first message must be hello")
            if event.version != W.PROTOCOL_VERSION:
                raise self._fail(f"protocol version {event.version} is not supported")
            if self.expected_id is not None and event.node_id != self.expected_id:
                raise self._fail("the peer's hello names another node than its certificate")
            self.peer = event
            self.state = SessionState.OPEN
            return event
        if isinstance(event, W.Hello):
            raise self._fail("a second hello")
        if isinstance(event, W.Unknown):
            return None  # forward compatibility: ignore
        if isinstance(event, W.Request):
            if len(self.theirs) >= MAX_OUTSTANDING:
                raise self._fail(f"more than {MAX_OUTSTANDING} requests outstanding")
            self.theirs.add((event.manifest, event.index, event.rid))
        elif isinstance(event, W.Cancel):
            self.theirs.discard((event.manifest, event.index, event.rid))
        elif isinstance(event, (W.Piece, W.Reject)):
            mine = self.ours.get(event.rid)
            if mine is None and event.rid in self.cancelled:
                self.cancelled.discard(event.rid)
                return None  # the answer to a request we cancelled: dropped, not counted
            if mine is None or (mine.manifest, mine.index) != (event.manifest, event.index):
                self.unsolicited += 1
                if self.unsolicited > MAX_UNSOLICITED:
                    raise self._fail("too many pieces nobody asked for")
                return None  # late (cancelled) or unrequested: dropped, counted
            del self.ours[event.rid]
            self.answered = mine
        elif isinstance(event, W.Bitfield):
            count = self.joined.get(event.manifest)
            if count is not None and event.count not in (0, count):
                raise self._fail("bitfield size does not match the manifest")
        elif isinstance(event, W.Join):
            self.joins += 1
            if self.joins > MAX_JOINS:
                raise self._fail(f"more than {MAX_JOINS} joins")
        elif isinstance(event, W.ManifestPush):
            self.pushes += 1
            if self.pushes > MAX_PUSHES:
                raise self._fail(f"more than {MAX_PUSHES} manifests pushed")
        elif isinstance(event, W.Choke):
            self.peer_choking = True
            # Requests pending at a choke will be rejected by the peer; nothing to do here.
        elif isinstance(event, W.Unchoke):
            self.peer_choking = False
        elif isinstance(event, W.Goodbye):
            self.state = SessionState.CLOSED
        return event

    # -- time -------------------------------------------------------------------------------

    def get_timer(self) -> float:
        """When :meth:`handle_timer` must next run."""
        timer = min(self._last_sent + KEEPALIVE_AFTER, self._last_received + self.idle_timeout)
        if self.state is SessionState.HANDSHAKE:
            timer = min(timer, self.now + self.hello_timeout)
        if self._partial_since is not None:
            timer = min(timer, self._partial_since + self.idle_timeout)
        return timer

    def handle_timer(self, now: float) -> bytes:
        """Bytes to send now (a keepalive, or nothing). Raises if the peer went silent, sent
        no hello in time, or is dripping a frame too slowly to finish it in time."""
        if self.state is SessionState.CLOSED:
            return b""
        if self.state is SessionState.HANDSHAKE and now >= self.now + self.hello_timeout:
            raise self._fail(f"no hello within {self.hello_timeout:g}s")
        if now >= self._last_received + self.idle_timeout:
            raise self._fail(f"the peer was silent for {self.idle_timeout:g}s")
        if self._partial_since is not None and now >= self._partial_since + self.idle_timeout:
            raise self._fail(f"a frame took more than {self.idle_timeout:g}s to arrive")
        if now >= self._last_sent + KEEPALIVE_AFTER and self.state is SessionState.OPEN:
            return self.send(W.Keepalive(), now)
        return b""

    def overdue(self, now: float, deadline: float) -> list[tuple[int, Outstanding]]:
        """Our requests older than ``deadline`` seconds (to cancel and reissue elsewhere)."""
        return [(rid, o) for rid, o in self.ours.items() if now - o.sent_at > deadline]
