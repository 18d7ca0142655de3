"""Where a running node's peers come from: the tracker, the DHT and the LAN, all at once.

Theory of operation
-------------------
A node that installs or seeds opens one ``Discovery`` for its lifetime. It starts every source
that is configured (a DHT node with ``--dht-port``/``--dht-bootstrap``, LAN multicast with
``--lan``, the tracker with ``--tracker``; a node that does not serve announces port 0 there,
which counts it and gets it peers but never lists it) and announces what the node serves
through each: the DHT stores signed records (re-announced by ``serve_dht``), the LAN
responder answers queries, and the tracker is re-announced every ``requery`` seconds so the
node never expires from its peer lists while it seeds.

``search`` asks every source at the same time. The first non-empty answer (plus whatever else
arrives within ``grace``) is the install's starting peer list, so a dead tracker or an empty DHT
costs nothing when the other answers; when every source has answered that it knows nobody, or
none answers within ``first_wait``, the install starts with no peers and the CDN covers it (per
policy). Sources keep being asked every ``requery``
seconds, and every answer that names a peer not seen before is sent to the running fetch
(``SwarmNode.fetch(more_peers=...)``): late answers are not lost, they join the swarm.

A process holding many installs (the client daemon) runs one DHT node and one LAN responder
for all of them: each install's discovery borrows their lookups (``DiscoveryOptions.shared``)
beside its own tracker, and the owner announces everything the process serves.

A source that fails is retried with backoff and its last error kept in ``errors`` (shown by
``install --json`` as ``discovery``); discovery failing never fails an install.

Addresses to announce: a node listening on a concrete address announces it; one listening on
the wildcard announces the local address its kernel would use toward the tracker or the first
DHT bootstrap node (a UDP ``connect``, no packet sent), which is right on a LAN and behind NAT
is the best a node can know without STUN (design.md section 8; not done).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..errors import P2PNodeError
from ..release import manifest as M
from .dht.records import Topic

if TYPE_CHECKING:  # the DHT and the tracker client load only when configured
    from .dht.discovery import PeerSource

__all__ = ["Discovery", "DiscoveryOptions", "announce_host", "open_discovery"]

Address = tuple[str, int]
#: (size, left, from_peers, from_cdn, uploaded) of a manifest id, for tracker announces.
Tally = Callable[[bytes], tuple[int, int, int, int, int]]


@dataclass
class DiscoveryOptions:
    """Which sources a node uses, and how long an install waits for them."""

    dht_port: int | None = None  # run a DHT node on this UDP port (0: any); None: no DHT
    dht_bootstrap: Sequence[str] = ()  # HOST:PORT of DHT nodes to join through
    lan: bool = False  # announce on and ask the local network (UDP multicast)
    lan_port: int | None = None  # the LAN group's port (None: lan.LAN_PORT); tests change it
    tracker: str | None = None  # tracker base URL: announce there and take its peers
    identity_dir: Path | None = None  # where the DHT routing table is kept (the node key's dir)
    first_wait: float = 5.0  # an install waits at most this long for a first answer
    grace: float = 0.5  # after the first answer, also wait this long for the others
    requery: float = 30.0  # ask (and re-announce to) every source this often
    #: A running discovery (the client daemon's) whose DHT node and LAN are asked in place of
    #: starting our own: one DHT node per process. Only lookups are borrowed; what its owner
    #: serves, its owner announces.
    shared: Discovery | None = None

    @property
    def use_dht(self) -> bool:
        return self.dht_port is not None or bool(self.dht_bootstrap)

    @property
    def enabled(self) -> bool:
        borrowed = self.shared is not None and bool(_borrowed(self.shared))
        return self.use_dht or self.lan or self.tracker is not None or borrowed


def announce_host(listen_host: str | None, toward: Sequence[str]) -> str | None:
    """The address to put in our records: the listen address if it is concrete, else the local
    address the kernel picks toward the first of ``toward`` that resolves (no packet is sent)."""
    if listen_host:
        try:
            if not ipaddress.ip_address(listen_host).is_unspecified:
                return listen_host
        except ValueError:
            return None
    for host in toward:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, 9))
                local = str(s.getsockname()[0])
        except OSError:
            continue
        if not ipaddress.ip_address(local).is_unspecified:
            return local
    return None


@dataclass
class _SourceState:
    source: PeerSource
    answers: int = 0
    failures: int = 0
    error: str | None = None
    first_answer_s: float | None = None


@dataclass
class Discovery:
    """The running sources of one node, and what they said (see the module docstring)."""

    node_id: bytes
    options: DiscoveryOptions
    listen: Address | None
    host: str | None
    sources: list[PeerSource] = field(default_factory=list)
    tally: Tally | None = None
    winner: str | None = None
    dht: Any = None  # the DHT node, when running
    lan: Any = None  # the LAN responder, when running
    _state: dict[str, _SourceState] = field(default_factory=dict)
    _announce: list[Callable[[M.Manifest], Any]] = field(default_factory=list)

    def add_source(self, source: PeerSource) -> None:
        self.sources.append(source)
        self._state[source.name] = _SourceState(source)

    @property
    def errors(self) -> dict[str, str]:
        return {n: s.error for n, s in self._state.items() if s.error is not None}

    def summary(self) -> dict[str, Any]:
        """What each source did, for ``install --json``."""
        return {
            "winner": self.winner,
            "sources": {
                name: {
                    "answers": s.answers,
                    "failures": s.failures,
                    "first_answer_ms": None
                    if s.first_answer_s is None
                    else round(1000 * s.first_answer_s, 1),
                    "error": s.error,
                }
                for name, s in self._state.items()
            },
        }

    def _usable(self, records: Sequence[Any]) -> list[Address]:
        out: list[Address] = []
        for rec in records:
            addr = rec.address
            if rec.node_id == self.node_id or addr == self.listen or addr in out:
                continue
            out.append(addr)
        return out

    async def announce(self, manifests: Sequence[M.Manifest]) -> None:
        """Announce ``manifests`` (and their apps, for partial seeds of other builds) through
        the DHT and the LAN; the DHT node re-announces them by itself from then on."""
        if self.host is None or self.listen is None:
            return
        async with trio.open_nursery() as nursery:
            for m in manifests:
                for announce in self._announce:
                    nursery.start_soon(announce, m)

    async def keep_listed(self, manifest: M.Manifest) -> None:
        """Announce ``manifest`` to the tracker every ``requery`` seconds, until cancelled, so
        a seeding node does not expire from its peer lists (``search`` does this itself)."""
        tracker = self._state.get("tracker")
        if tracker is not None:
            await self._ask_forever(tracker, manifest, None, lambda: False, lambda: False)

    async def search(
        self,
        manifest: M.Manifest,
        send: trio.MemorySendChannel[Address],
        *,
        task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Ask every source until cancelled. Reports (``task_status.started``) the first
        answer's peers, merged with what came within ``grace``, or ``[]`` after
        ``first_wait``; later news goes to ``send`` (dropped once its reader is gone)."""
        if not self._state:
            task_status.started([])
            return
        found: list[Address] = []
        seen: set[Address] = set()
        started = False

        def fetch_over() -> bool:  # its reader closed the channel: only announces still matter
            return send.statistics().open_receive_channels == 0

        first_answer, all_heard = trio.Event(), trio.Event()
        decided = trio.Event()  # either of them: a peer, or every source's answer
        heard: set[str] = set()

        def take(name: str, addrs: list[Address]) -> None:
            if started and fetch_over():
                return  # nobody reads news any more (and ``found`` must not grow for days)
            heard.add(name)
            if len(heard) == len(self._state):
                # No point waiting out the grace for nobody; and when every source says nobody
                # holds it, waiting only delays the CDN (whoever appears later joins anyway).
                all_heard.set()
                decided.set()
            new = [a for a in dict.fromkeys(addrs) if a not in seen]
            seen.update(new)
            found.extend(new)
            if not started:
                if new and not first_answer.is_set():
                    self.winner = name
                    first_answer.set()
                    decided.set()
                return
            for addr in new:
                try:
                    send.send_nowait(addr)
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the fetch is over (or swamped): the swarm has what it needs

        async with trio.open_nursery() as nursery:
            for state in self._state.values():
                nursery.start_soon(
                    self._ask_forever, state, manifest, take, lambda: not started, fetch_over
                )
            with trio.move_on_after(self.options.first_wait):
                await decided.wait()
                if first_answer.is_set():
                    with trio.move_on_after(self.options.grace):
                        await all_heard.wait()
            started = True
            task_status.started(list(found))

    async def _ask_forever(
        self,
        state: _SourceState,
        manifest: M.Manifest,
        take: Callable[[str, list[Address]], None] | None,
        eager: Callable[[], bool],
        over: Callable[[], bool],
    ) -> None:
        """Ask one source every ``requery`` seconds: sooner, with backoff, after a failure, and
        every second while ``eager()`` says an install is still waiting for a first peer (a
        seed's announce may land just after our first lookup). Once ``over()``, only the
        tracker is still asked (its asks are this node's announces); lookups stop."""
        t0 = trio.current_time()
        backoff = 1.0
        while not (over() and state.source.name != "tracker"):
            try:
                with trio.fail_after(max(self.options.first_wait, 10.0)):
                    records = await state.source.find_peers(manifest.id, manifest.app)
            except (P2PNodeError, trio.TooSlowError) as exc:
                state.failures += 1
                if state.error is None:  # say so once per outage, not on every retry
                    why = getattr(exc, "message", None) or "no answer in time"
                    _warn(f"peer discovery via {state.source.name} is failing: {why}")
                state.error = getattr(exc, "message", None) or "no answer in time"
                await trio.sleep(min(backoff, self.options.requery) * (0.75 + random.random() / 2))
                backoff *= 2
                continue
            backoff = 1.0
            state.answers += 1
            if state.error is not None:
                _warn(f"peer discovery via {state.source.name} works again")
            state.error = None
            if state.first_answer_s is None:
                state.first_answer_s = trio.current_time() - t0
            usable = self._usable(records)
            if take is not None:
                take(state.source.name, usable)
            again = self.options.requery
            if not usable and eager():
                again = min(again, 1.0)
            await trio.sleep(again * (0.9 + random.random() / 5))


@asynccontextmanager
async def open_discovery(
    identity: Any, options: DiscoveryOptions, listen: Address | None
) -> AsyncIterator[Discovery]:
    """Start the configured sources for a node serving at ``listen`` (None: it does not serve,
    so it only asks and announces nothing), beside those borrowed from ``options.shared``: a
    DHT node or LAN borrowed is not started a second time."""
    from .dht.node import parse_hostport

    borrowed = _borrowed(options.shared) if options.shared is not None else []
    names = {source.name for source in borrowed}
    use_dht = options.use_dht and "dht" not in names
    use_lan = options.lan and "lan" not in names
    texts = list(options.dht_bootstrap) if use_dht else []
    if options.tracker and use_dht:
        texts += await _tracker_bootstrap(options.tracker)
    bootstrap = list(dict.fromkeys(parse_hostport(b) for b in texts))
    toward = []
    if options.tracker:
        import httpx

        toward.append(httpx.URL(options.tracker).host)
    toward += [h for h, _ in bootstrap]
    host = None
    if listen is not None:
        host = await trio.to_thread.run_sync(announce_host, listen[0], toward)
    disc = Discovery(identity.node_id, options, listen, host)
    for source in borrowed:
        disc.add_source(source)
    async with AsyncExitStack() as stack:
        bridge = None
        if use_dht:
            from .dht.node import open_bridge

            bridge = await stack.enter_async_context(open_bridge())
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        if bridge is not None:
            await _start_dht(disc, identity, options, bootstrap, bridge, nursery)
        if use_lan:
            await _start_lan(disc, identity, options, nursery)
        if options.tracker:
            await _start_tracker(disc, identity, options, stack)
        yield disc


def _borrowed(shared: Discovery) -> list[PeerSource]:
    """The sources another node's discovery lends: its DHT node and LAN, not its tracker (each
    tracker client announces its own node's builds)."""
    return [source for source in shared.sources if source.name != "tracker"]


async def _start_dht(
    disc: Discovery,
    identity: Any,
    options: DiscoveryOptions,
    bootstrap: list[Address],
    bridge: Any,
    nursery: trio.Nursery,
) -> None:
    from ..identity import default_identity_dir
    from .dht.discovery import DHTPeerSource
    from .dht.node import DHTConfig, serve_dht

    state_dir = options.identity_dir or default_identity_dir()
    config = DHTConfig(
        port=options.dht_port or 0,
        interface=disc.host if disc.host and disc.listen else "0.0.0.0",
        bootstrap=bootstrap,
        state_path=state_dir / "dht-routing.json",
    )
    dht = disc.dht = await nursery.start(serve_dht, identity.key, config, bridge)
    disc.add_source(DHTPeerSource(dht))

    async def announce(m: M.Manifest) -> None:
        assert disc.host is not None and disc.listen is not None
        for topic in (Topic.manifest(m.id), Topic.app(m.app)):
            try:
                await dht.announce(topic, disc.host, disc.listen[1])
            except P2PNodeError as exc:  # serve_dht re-announces what it was given later
                _warn(f"DHT announce of {m.app} failed for now: {exc}")

    disc._announce.append(announce)


async def _start_lan(
    disc: Discovery, identity: Any, options: DiscoveryOptions, nursery: trio.Nursery
) -> None:
    from .dht.lan import LAN_PORT, LANDiscovery

    interface = "0.0.0.0"
    if disc.host and ipaddress.ip_address(disc.host).version == 4:
        interface = disc.host
    port = options.lan_port or LAN_PORT
    lan = disc.lan = LANDiscovery(identity.key, interface=interface, port=port)
    disc.add_source(lan)
    if disc.listen is None or disc.host is None:
        return  # asks only
    try:
        await nursery.start(lan.serve)
    except P2PNodeError as exc:
        _warn(f"LAN discovery cannot answer neighbours: {exc}")
        return

    async def announce(m: M.Manifest) -> None:
        assert disc.host is not None and disc.listen is not None
        lan.announce(Topic.manifest(m.id), disc.host, disc.listen[1])
        lan.announce(Topic.app(m.app), disc.host, disc.listen[1])

    disc._announce.append(announce)


async def _start_tracker(
    disc: Discovery, identity: Any, options: DiscoveryOptions, stack: AsyncExitStack
) -> None:
    from .tracker import TrackerClient, TrackerPeerSource

    assert options.tracker is not None
    client = TrackerClient(options.tracker)

    async def close() -> None:  # shielded: discovery usually ends by cancellation
        with trio.CancelScope(shield=True):
            await client.aclose()

    stack.push_async_callback(close)
    # A node that does not serve announces port 0: counted, never handed out, and it still
    # gets peers (records are attached only by a node that serves).
    port = disc.listen[1] if disc.listen is not None else 0
    host = disc.host if port else None

    def tally(mid: bytes) -> tuple[int, int, int, int, int]:
        return disc.tally(mid) if disc.tally is not None else (0, 0, 0, 0, 0)

    disc.add_source(TrackerPeerSource(client, identity.key, host, port, progress=tally))


async def _tracker_bootstrap(url: str) -> list[str]:
    """The tracker's DHT bootstrap nodes; none (and a warning) if it does not answer quickly:
    the DHT is what keeps working when the tracker does not."""
    from .tracker import TrackerClient

    with trio.move_on_after(BOOTSTRAP_WAIT):
        try:
            async with TrackerClient(url) as client:
                return await client.dht_bootstrap()
        except P2PNodeError as exc:
            _warn(f"no DHT bootstrap nodes from the tracker: {exc}")
            return []
    _warn(f"no DHT bootstrap nodes from the tracker: no answer in {BOOTSTRAP_WAIT:g} s")
    return []


BOOTSTRAP_WAIT = 3.0


def _warn(text: str) -> None:
    print(f"p2pnode: warning: {text}", file=sys.stderr)
