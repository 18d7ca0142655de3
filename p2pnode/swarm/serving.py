"""The serving half of the swarm's trio shell: answer the peers that dial us.

Theory of operation
-------------------
Every manifest this node ``offer``s is answered with its availability bitfield (from
:class:`~p2pnode.disk.stage.LocalChunks`, so an unfinished install and the kept earlier builds
of an app serve too); peers the choker (choker.py) unchokes are served from verified local
reads, others are rejected with ``choked``. Upload is capped globally and per peer, and pieces
are written in the order sendorder.py gives (first pieces first). A peer that fetches what we
are fetching is dialled back (``_dial_back``), so one side knowing the other is enough.

This node serves only on connections it accepted; on those it dials, the fetching half
(fetching.py) declines joins and requests. Every network wait is bounded by a cancel scope.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..errors import P2PNodeError, UnknownKeyError
from ..identity import peer_node_id
from ..ratelimit import RateLimiter
from . import wire as W
from .links import CONNECTION_ENDED, Link, accept
from .peer import PeerSession, SessionState
from .shell import Shell

#: Longest a pushed manifest waits for its app's key rotations to be fetched (seconds).
LEARN_TIMEOUT = 15.0

__all__ = ["Serving"]

log = logging.getLogger(__name__)


class Serving(Shell):
    """Accepting peers and answering their joins, pushes and requests (see the module)."""

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept peers on ``host:port`` until cancelled; reports the bound port."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        self.listen_port = self.listen_port or bound
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._rechoke)
            task_status.started(bound)
            await trio.serve_listeners(self._serve_one, listeners)

    async def _rechoke(self) -> None:
        """Apply the choker's periodic decisions (regular slots, optimistic unchoke)."""
        while True:
            await trio.sleep_until(max(self.choker.next_tick(), trio.current_time() + 0.1))
            self._apply(self.choker.tick(trio.current_time()))

    def _apply(self, decisions: list[tuple[bytes, bool]]) -> None:
        now = trio.current_time()
        for node_id, unchoke in decisions:
            for link in list(self.links):
                s = link.session
                if link.node_id != node_id or not link.manifests:
                    continue
                if s.state is not SessionState.OPEN:
                    continue
                if s.am_choking == unchoke:  # a change for this link
                    msg: W.Event = W.Unchoke() if unchoke else W.Choke()
                    try:
                        link.control.send_nowait(s.send(msg, now))
                    except (trio.WouldBlock, trio.ClosedResourceError):
                        pass

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.max_connections:
            self.refused += 1
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        link: Link | None = None
        try:
            tls = await accept(stream, self._server_ctx)
            if tls is None:
                return
            node_id = peer_node_id(tls)
            if node_id in self.banned:
                log.debug("refused a banned peer")
                return
            session = PeerSession(
                self.identity.node_id,
                self.listen_port,
                now=trio.current_time(),
                expected_id=node_id,
                idle_timeout=self.idle_timeout,
                hello_timeout=self.hello_timeout,
            )
            link = Link(
                tls, session, node_id, RateLimiter(self.peer_upload_rate), self.write_timeout
            )
            try:
                link.host = str(stream.socket.getpeername()[0])
            except OSError:
                pass
            await link.send(session.hello(trio.current_time(), self._caps))  # (writer: first)
            self.links.add(link)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.writer)
                await self._serve_loop(link)
                nursery.cancel_scope.cancel()
        except* CONNECTION_ENDED as group:  # (a writer task's failure arrives grouped)
            log.debug("peer connection ended: %r", group.exceptions[0])
        finally:
            self.connections -= 1
            if link is not None:
                self.links.discard(link)
                if not any(other.node_id == link.node_id for other in self.links):
                    self._apply(self.choker.gone(link.node_id, trio.current_time()))
            await trio.aclose_forcefully(stream)

    async def _serve_loop(self, link: Link) -> None:
        tls, s = link.tls, link.session
        while True:
            with trio.move_on_at(s.get_timer()):
                data = await tls.receive_some(1 << 20)
                s.receive_data(data, trio.current_time())
                if not data:
                    return
            out = s.handle_timer(trio.current_time())
            while (ev := s.next_event()) is not None:
                now = trio.current_time()
                if isinstance(ev, W.Hello):
                    link.listen_port = ev.listen_port
                elif isinstance(ev, W.Join):
                    self._dial_back(link, ev.manifest)
                    out += s.send(self._bitfield(ev.manifest), now)
                    if ev.manifest in self.offers:
                        # Only swarms we serve are kept: a joined id is otherwise answered
                        # (n = 0) and forgotten, so a peer cannot grow what ``have`` walks.
                        link.manifests.add(ev.manifest)
                        await link.send(out)
                        out = b""
                        self._apply(self.choker.interested(link.node_id, now))
                elif isinstance(ev, W.ManifestPush):
                    await link.send(out)
                    out = b""
                    if await self._accept_push(ev):
                        link.manifests.add(ev.manifest)
                        self._apply(self.choker.interested(link.node_id, now))
                    out += s.send(self._bitfield(ev.manifest), trio.current_time())
                elif isinstance(ev, W.Request):
                    await link.send(out)
                    out = await self._answer(link, ev)
                elif isinstance(ev, W.Goodbye):
                    return
            await link.send(out)

    def _dial_back(self, link: Link, manifest: bytes) -> None:
        """A peer that fetches what we are fetching too serves it as well: connect back to
        where it listens, so one side knowing the other is enough for both to trade (and a
        peer we gave up on while it was starting is tried again)."""
        add = self._fetching.get(manifest)
        if add is not None and link.host is not None and link.listen_port:
            add(link.host, link.listen_port)

    async def _accept_push(self, push: W.ManifestPush) -> bool:
        """Take part in the swarm of a manifest a peer showed us, when the trust rule
        (offers.py) accepts it: our chunks of the app's earlier builds then serve its newer
        build (a cross-version partial seed). Anything else is refused."""
        if push.manifest in self.manifests:
            return True
        async with self._verifying:
            try:
                try:
                    manifest = await trio.to_thread.run_sync(self.swarms.verify_push, push)
                except UnknownKeyError as exc:
                    if not await self._learn_keys(exc.app, exc.key):
                        raise
                    manifest = await trio.to_thread.run_sync(self.swarms.verify_push, push)
            except P2PNodeError as exc:
                log.info("refused a pushed manifest: %s", exc)
                return False
        self.swarms.take_pushed(manifest)
        return True

    async def _learn_keys(self, app: str, key: bytes) -> bool:
        """A push signed by a key this node does not know: ask for the app's key rotations
        (from where the node learns them: its tracker, its mirrors), within LEARN_TIMEOUT and
        at most once a minute per app; whether ``key`` is the app's now."""
        known = self.swarms.may_learn(app, trio.current_time())
        if known is None:
            return False
        with trio.move_on_after(LEARN_TIMEOUT):
            try:
                return key in await known.learn(key)
            except (P2PNodeError, OSError) as exc:
                log.info("could not learn the key rotations of %s: %s", app, exc)
        return False

    def _bitfield(self, mid: bytes) -> W.Bitfield:
        return self.swarms.bitfield(mid, self.local.availability)

    async def _answer(self, link: Link, req: W.Request) -> bytes:
        s = link.session
        now = trio.current_time()
        ids = self.offers.get(req.manifest)
        if ids is None or req.index >= len(ids):
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"unavailable"), now)
        self._apply(self.choker.interested(link.node_id, now))  # asking keeps the interest
        if s.am_choking:
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"choked"), now)
        if self.choker.frugal_refuses(req.manifest, req.index, len(ids)):
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"frugal"), now)
        async with self._reads:
            data = await trio.to_thread.run_sync(self.local.read, ids[req.index])
        now = trio.current_time()
        if data is None:
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"unavailable"), now)
        async with self._turn((link.node_id, req.manifest), len(data)) as first:

            async def before_slice(size: int) -> None:
                if not first:
                    await self._first_pieces_pass()
                await link.cap.acquire(size)
                await self.upload_limiter.acquire(size)

            now = trio.current_time()
            self.uploaded += len(data)
            self.choker.uploaded(link.node_id, len(data), now)
            self.choker.sent(req.manifest, req.index, len(ids))
            piece = W.Piece(req.manifest, req.index, req.rid, ids[req.index], data)
            await link.write(s.send_frame(piece, now), before_slice)
        return b""

    @asynccontextmanager
    async def _turn(self, peer: tuple[bytes, bytes], size: int) -> AsyncIterator[bool]:
        """Wait until this piece may be written (sendorder.py: first pieces first); yields
        whether it is a first piece holding the turn, which ends with the block, or earlier
        by the order's turn limit."""
        order = self.send_order
        ticket = order.want(peer, trio.current_time(), size)
        try:
            await self._order_allows(lambda: ticket in self._granted)
            yield order.holds_turn(ticket)
        finally:
            self._granted.discard(ticket)
            order.done(ticket, trio.current_time())
            self._order_update(changed=True)  # (a turn may have ended)

    async def _first_pieces_pass(self) -> None:
        """Wait while a first piece holds the uplink (a later piece's pause between slices)."""
        await self._order_allows(lambda: not self.send_order.turn_held)

    async def _order_allows(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``, looking again whenever the write order changes or may
        (a turn's limit, a piece's wait; ``SendOrder.next_change``)."""
        while True:
            self._order_update()
            if ready():
                return
            with trio.move_on_at(self.send_order.next_change()):
                await self._order_changed.wait()

    def _order_update(self, *, changed: bool = False) -> None:
        """Take the order's grants; if there were any, or ``changed``, wake every waiter to
        look again (only then: waiters that woke each other for nothing would spin)."""
        granted = self.send_order.grants(trio.current_time())
        if granted or changed:
            self._granted.update(granted)
            self._order_changed.set()
            self._order_changed = trio.Event()
