"""Install, update and roll back a release, atomically and resumably.

Theory of operation
-------------------
1. **Trust first.** The manifest is fetched (size-bounded), parsed and verified (pinned key,
   signature, expiry) and checked against the installed version (same app, no downgrade)
   before anything on disk is touched.
2. **Plan.** Every unique chunk of the new version is either already in the stage (journal),
   somewhere local (the installed version's files, the chunk store), or fetched from the CDN.
   Local copies and CDN fetches run at the same time; every chunk is verified before it is
   written into the stage.
3. **Switch.** The stage is made durable, its inode recorded in ``state.json`` as a pending
   switch, and it is exchanged with the install directory in one ``renameat2`` call. Whatever
   moment a process dies, the install directory is the complete old or the complete new tree;
   the next run reads the pending record and finishes (or forgets) the switch.
4. **Harvest.** Chunks of kept earlier versions that the new version lacks are copied from the
   old tree into the chunk store, then the old tree is deleted. Rollback rebuilds an earlier
   version from the current tree plus the store, offline.

Recovery
--------
``pending = {"op": "switch", "inode": N, ...}``: if the install directory's inode is N the
switch happened and is completed; otherwise it did not, and the stage stays for the next
install to resume. ``pending = {"op": "harvest"}``: harvest again (it is idempotent).
"""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..cdn.plan import ChunkRequest
from ..discovery.race import Discovery, DiscoveryOptions, open_discovery
from ..disk.stage import Journal, LocalChunks, Stage
from ..disk.state import InstallState, StateDir
from ..disk.store import ChunkStore
from ..disk.switch import (
    check_space,
    installed,
    local_chunks,
    recover,
    refuse_foreign_directory,
    switch,
)
from ..errors import (
    CDNError,
    DiskSpaceError,
    DowngradeError,
    InstallError,
    NoRollbackError,
    NotInstalledError,
    P2PNodeError,
    TransportError,
    UsageError,
    most_telling,
)
from ..progress import NullProgress, Progress
from ..ratelimit import RateLimiter
from ..release import keys, layout
from ..release import manifest as M

if TYPE_CHECKING:
    import httpx

    from ..cdn.fetcher import CDNOptions

__all__ = [
    "InstallOptions",
    "InstallResult",
    "Progress",
    "install",
    "read_manifest",
    "rollback",
]


@dataclass
class InstallOptions:
    mirrors: Sequence[str] = ()  # explicit mirror roots; else derived (see resolve_mirrors)
    connections: int = 8
    max_download_rate: int | None = None  # bytes/s from the CDN and peers together
    max_upload_rate: int | None = None  # bytes/s served to peers
    max_peer_upload_rate: int | None = None  # bytes/s served to any one peer
    max_peer_download_rate: int | None = None  # bytes/s taken from any one peer
    upload_slots: int = 8  # peers served at once (the choker's slots)
    origin: bool = False  # a seed box: upload each chunk once before any twice; leechers spare it
    keep_versions: int = 2  # earlier versions kept for rollback
    require_installed: bool = False  # `update` refuses to do a fresh install
    now: float | None = None  # for tests of expiry
    peers: Sequence[str] = ()  # HOST:PORT of peers to fetch from
    listen: str | None = None  # HOST:PORT to serve verified chunks on while installing
    seed: bool = False  # keep serving after the install, until cancelled
    policy: str = "p2p-first"  # p2p-first | cdn-only | p2p-only
    limiter: RateLimiter | None = None  # the download cap, shared (made from the rate)
    identity_dir: Path | None = None  # where the node key lives (default: user data dir)
    dht_port: int | None = None  # run a DHT node on this UDP port (0: any); None: no DHT
    dht_bootstrap: Sequence[str] = ()  # HOST:PORT of DHT nodes to join through
    lan: bool = False  # find (and, serving, be found by) peers on the LAN by multicast
    lan_port: int | None = None  # the LAN discovery group's port (None: the default)
    tracker: str | None = None  # tracker URL: announce there (port 0 unless serving), take peers
    discovery_wait: float = 5.0  # wait at most this long for discovery's first answer
    on_ready: Callable[[Any], None] | None = None  # with seed: called once the install is done

    def discovery(self) -> DiscoveryOptions:
        return DiscoveryOptions(
            dht_port=self.dht_port,
            dht_bootstrap=self.dht_bootstrap,
            lan=self.lan,
            lan_port=self.lan_port,
            tracker=self.tracker,
            identity_dir=self.identity_dir,
            first_wait=self.discovery_wait,
        )

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = RateLimiter(self.max_download_rate)
        if self.policy not in POLICIES:
            raise UsageError(
                f"unknown policy {self.policy!r}", fix=f"use one of {', '.join(POLICIES)}"
            )


POLICIES = ("p2p-first", "cdn-only", "p2p-only")


@dataclass
class Swarm:
    """The peer-to-peer side of one install: our node, and the peers to ask."""

    node: Any  # swarm.node.SwarmNode (imported lazily: CDN-only installs never load it)
    peers: list[tuple[str, int]]
    more_peers: trio.MemoryReceiveChannel[tuple[str, int]] | None = None  # found later
    discovery: Discovery | None = None
    result: InstallResult | None = None  # the install's running figures (tracker announces)

    def tally(self, mid: bytes) -> tuple[int, int, int, int, int]:
        """(size, left, from_peers, from_cdn, uploaded) for tracker announces."""
        r = self.result
        if r is None or r.manifest.id != mid:
            return (0, 0, 0, 0, self.node.uploaded)
        if r.action:  # finished
            left = 0
        else:
            got = r.bytes_peers + r.bytes_cdn + r.bytes_reused + r.bytes_resumed
            left = max(0, r.bytes_total - got)
        return (r.bytes_total, left, r.bytes_peers, r.bytes_cdn, self.node.uploaded)


@dataclass
class InstallResult:
    action: str  # installed | updated | unchanged | rolled-back
    manifest: M.Manifest
    previous_build: int | None
    bytes_total: int
    previous_id: bytes | None = None  # manifest id of the build this one replaced
    bytes_cdn: int = 0  # bytes read from the CDN (including any that failed verification)
    bytes_reused: int = 0  # chunk bytes copied from local files or the store
    bytes_resumed: int = 0  # chunk bytes already staged by an interrupted run
    bytes_peers: int = 0  # verified chunk bytes received from peers
    seconds: float = 0.0
    mirrors: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, Any] = field(default_factory=dict)  # address -> swarm.node.PeerStats
    listen_port: int | None = None  # where this node serves chunks, with --listen
    discovery: dict[str, Any] | None = None  # which peer source answered first, and how each did

    def as_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "action": self.action,
            "app": m.app,
            "version": m.version,
            "build": m.build,
            "manifest_id": m.id.hex(),
            "previous_build": self.previous_build,
            "files": len(m.files),
            "bytes_total": self.bytes_total,
            "bytes_cdn": self.bytes_cdn,
            "bytes_reused": self.bytes_reused,
            "bytes_resumed": self.bytes_resumed,
            "bytes_peers": self.bytes_peers,
            "listen_port": self.listen_port,
            "discovery": self.discovery,
            "seconds": round(self.seconds, 3),
            "mirrors": self.mirrors,
            "peers": {
                addr: {
                    "node_id": st.node_id.hex(),
                    "bytes": st.bytes,
                    "chunks": st.chunks,
                    "rate": round(st.rate),
                    "latency_ms": round(st.latency_ms, 1),
                    "connect_ms": round(1000 * st.connect_s, 1),
                    "first_piece_ms": None
                    if st.first_piece_s is None
                    else round(1000 * st.first_piece_s, 1),
                    "corrupt": st.corrupt,
                    "failures": st.failures,
                    "error": st.error,
                }
                for addr, st in self.peers.items()
            },
        }


async def read_manifest(location: str) -> bytes:
    """The signed manifest's bytes from a URL or a path, refusing oversized documents."""
    limit = M.MAX_MANIFEST_BYTES + 1024
    if "://" not in location:
        try:
            with open(location, "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise UsageError(
                f"cannot read manifest {location}: {exc.strerror}",
                fix="pass a manifest URL or the path of a manifest.p2pm file",
            ) from exc
    else:
        data = await _http_get(location, limit)
    if len(data) > limit:
        raise M.ManifestError(f"manifest {location} is larger than {limit} bytes")
    return data


async def _http_get(url: str, limit: int) -> bytes:
    import httpx  # not at module level: installs from peers or files never pay for it

    # A plain http:// URL has no TLS to verify (redirects are not followed); the default
    # verifying context loads the CA bundle, 0.2 s of every CDN install's start-up.
    verify = not url.lower().startswith("http://")
    try:
        with trio.fail_after(60):
            async with (
                httpx.AsyncClient(timeout=30, verify=verify) as client,
                client.stream("GET", url) as resp,
            ):
                if resp.status_code != 200:
                    raise TransportError(
                        f"GET {url} answered HTTP {resp.status_code}",
                        fix="check the manifest URL (is the release published there?)",
                    )
                buf = bytearray()
                async for part in resp.aiter_bytes():
                    buf += part
                    if len(buf) > limit:
                        break
                return bytes(buf)
    except trio.TooSlowError as exc:
        raise TransportError(f"GET {url} timed out") from exc
    except httpx.HTTPError as exc:
        raise TransportError(f"GET {url} failed: {exc!r}") from exc


def resolve_mirrors(
    explicit: Sequence[str], location: str | None, manifest: M.Manifest, state: InstallState
) -> list[str]:
    """Mirror roots in order of preference: explicit ones, or the manifest's own base (the
    root it was served from), the mirrors the signed manifest lists, and the ones used last."""
    if explicit:
        found = [m if m.endswith("/") or "://" not in m else m + "/" for m in explicit]
    else:
        found = []
        if location is not None:
            try:
                found.append(layout.mirror_root_of(location))
            except P2PNodeError:
                pass
        found += list(manifest.mirrors) + list(state.mirrors)
    seen: set[str] = set()
    return [m for m in found if not (m in seen or seen.add(m))]  # type: ignore[func-returns-value]


async def install(
    location: str,
    dest: Path,
    trusted: Sequence[bytes],
    options: InstallOptions | None = None,
    progress: Progress | None = None,
    *,
    manifest_data: bytes | None = None,
) -> InstallResult:
    """Install or update the release whose signed manifest is at ``location`` into ``dest``.

    ``manifest_data``: the signed manifest already fetched (from a tracker); ``location`` then
    only names where it came from, and mirrors come from the manifest and ``options``.
    """
    options = options or InstallOptions()
    t0 = time.monotonic()
    sd = StateDir(dest)
    data = manifest_data if manifest_data is not None else await read_manifest(location)
    signed = M.parse_signed(data, source=location)
    trust = list(trusted)
    if not trust and sd.exists:
        trust = [keys.parse_public_key(k) for k in sd.load().trusted]
    manifest = M.verify(signed, set(trust), now=options.now)
    refuse_foreign_directory(sd)
    with sd:
        state = sd.load()
        await trio.to_thread.run_sync(recover, sd, state)
        current = sd.load_manifest(state.current) if state.current else None
        if current is None and options.require_installed:
            raise NotInstalledError(f"nothing is installed in {dest} to update")
        if current is not None:
            if current.app != manifest.app:
                raise InstallError(
                    f"{dest} holds {current.app}, not {manifest.app}",
                    fix="install each app into its own directory",
                )
            if manifest.id == current.id:
                result = InstallResult(
                    "unchanged",
                    manifest,
                    current.build,
                    manifest.total_size,
                    seconds=time.monotonic() - t0,
                )
                if options.seed:
                    await _serve_unchanged(sd, state, signed, manifest, options, result)
                return result
            if manifest.build < current.build:
                raise DowngradeError(
                    f"{dest} has build {current.build}; the manifest offers older build "
                    f"{manifest.build}"
                )
            if manifest.build == current.build:
                raise DowngradeError(
                    f"build {manifest.build} is installed with different content than this "
                    "manifest describes (two manifests claim one build)",
                    fix="ask the publisher which manifest is genuine; do not install this one",
                )
        state.app = manifest.app
        state.trusted = sorted({*state.trusted, keys.format_public_key(manifest.key)})
        origin = location if manifest_data is None else None
        mirrors = resolve_mirrors(options.mirrors, origin, manifest, state)
        state.mirrors = mirrors[:8]  # for repair and rollback when chunks must be refetched
        history = [state.current] if state.current else []
        async with open_swarm(sd, state, manifest, options, signed=signed) as swarm:
            result = await _apply(
                sd,
                state,
                signed,
                manifest,
                current,
                mirrors,
                options,
                progress or NullProgress(),
                history + state.history,
                swarm,
            )
            result.action = "updated" if current else "installed"
            result.seconds = time.monotonic() - t0
            if swarm is not None:
                if options.seed:  # the tree moved into place: serve it from there
                    swarm.node.local = local_chunks(sd, sd.load())
                await _served(swarm, options, result)
        return result


async def _served(swarm: Swarm, options: InstallOptions, result: InstallResult) -> None:
    """Fill in where ``result``'s node serves and how discovery went; with ``--seed``, tell
    ``on_ready`` and serve until cancelled."""
    result.listen_port = swarm.node.listen_port if options.listen else None
    if swarm.discovery is not None:
        result.discovery = swarm.discovery.summary()
    if options.seed:
        if options.on_ready is not None:
            options.on_ready(result)
        await trio.sleep_forever()


async def _serve_unchanged(
    sd: StateDir,
    state: InstallState,
    signed: M.SignedManifest,
    manifest: M.Manifest,
    options: InstallOptions,
    result: InstallResult,
) -> None:
    """``--seed`` of the build already installed (a restarted seeder, ``watch`` starting up):
    nothing to fetch, so serve at once instead of waiting for discovery's first answer."""
    async with open_swarm(
        sd, state, manifest, replace(options, discovery_wait=0.0), signed=signed
    ) as swarm:
        if swarm is None:  # --seed without --listen or discovery: nothing to serve on
            return
        swarm.result = result
        if swarm.more_peers is not None:
            swarm.more_peers.close()  # nothing to fetch: discovery only announces from now on
        await _served(swarm, options, result)


async def rollback(
    dest: Path, options: InstallOptions | None = None, progress: Progress | None = None
) -> InstallResult:
    """Go back to the most recent kept earlier version, offline when its chunks are kept."""
    options = options or InstallOptions()
    t0 = time.monotonic()
    async with installed(dest) as (sd, state, current):
        if not state.history:
            raise NoRollbackError(f"{dest} keeps no version earlier than the installed one")
        signed = sd.load_signed(state.history[0])
        trusted = {keys.parse_public_key(k) for k in state.trusted}
        manifest = M.verify(signed, trusted, check_expiry=False)
        mirrors = resolve_mirrors(options.mirrors, None, manifest, state)
        result = await _apply(
            sd,
            state,
            signed,
            manifest,
            current,
            mirrors,
            options,
            progress or NullProgress(),
            [current.id.hex(), *state.history[1:]],
        )
        result.action = "rolled-back"
        result.seconds = time.monotonic() - t0
        return result


@asynccontextmanager
async def open_swarm(
    sd: StateDir,
    state: InstallState,
    manifest: M.Manifest,
    options: InstallOptions,
    *,
    signed: M.SignedManifest | None = None,
) -> AsyncIterator[Swarm | None]:
    """Our swarm node for this install (None without peers, --listen or discovery): it serves,
    on ``options.listen``, this build's swarm and those of every kept build of the app, and
    discovery keeps feeding it peers while it fetches."""
    discovery = options.discovery()
    if options.peers or options.policy == "cdn-only":
        # Peers in hand answer first: start with them, discovery's join later. Or nothing is
        # asked of peers at all: discovery only announces what we serve.
        discovery = replace(discovery, first_wait=0.0)
    if not options.peers and not options.listen and not discovery.enabled:
        yield None
        return
    from ..identity import load_or_create
    from ..swarm.node import SwarmNode, parse_peer

    peers = [parse_peer(p) for p in options.peers]
    identity = await trio.to_thread.run_sync(load_or_create, options.identity_dir)
    node = SwarmNode(
        identity,
        local_chunks(sd, state),
        upload_limiter=RateLimiter(options.max_upload_rate),
        download_limiter=options.limiter,
        peer_upload_rate=options.max_peer_upload_rate,
        peer_download_rate=options.max_peer_download_rate,
        upload_slots=options.upload_slots,
        frugal=options.origin,
    )
    # With the signed manifest, peers that hold only earlier builds can be shown this one.
    node.offer(manifest, signed.encode() if signed is not None else None)
    for mid in [state.current, *state.history]:
        if mid:
            node.offer(sd.load_manifest(mid))
    # The install's own error, not a group of one: what is raised inside ``yield`` comes
    # out of this nursery.
    try:
        async with trio.open_nursery() as nursery:
            listen: tuple[str, int] | None = None
            if options.listen:
                host, port = parse_peer(options.listen, listen=True)
                listen = (host, await nursery.start(node.serve, host, port))
            swarm = Swarm(node, peers)
            if not discovery.enabled:
                yield swarm
                nursery.cancel_scope.cancel()
                return
            async with open_discovery(identity, discovery, listen) as disc:
                disc.tally = swarm.tally
                swarm.discovery = disc
                nursery.start_soon(disc.announce, list(node.manifests.values()))
                send, swarm.more_peers = trio.open_memory_channel[tuple[str, int]](256)
                found = await nursery.start(disc.search, manifest, send)
                swarm.peers += [p for p in found if p not in swarm.peers]
                yield swarm
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise most_telling(group) from None


async def seed(
    dest: Path,
    listen: str,
    identity_dir: Path | None = None,
    max_upload_rate: int | None = None,
    *,
    frugal: bool = True,
    spare: bool = True,
    max_peer_upload_rate: int | None = None,
    upload_slots: int = 8,
    dht_port: int | None = None,
    dht_bootstrap: Sequence[str] = (),
    discovery: DiscoveryOptions | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the release installed in ``dest`` (and its kept earlier builds) until cancelled.

    Holds no lock: updates of ``dest`` may run meanwhile. Every chunk served is verified on
    read, and the index is rebuilt every ``RESEED_SECONDS``, so a concurrent update costs at
    most some rejected requests, never a wrong byte.

    ``discovery`` (or the ``dht_port``/``dht_bootstrap`` shorthand): where to announce what is
    served; the current build is also kept listed on the tracker.
    """
    from ..identity import load_or_create
    from ..swarm.node import SwarmNode, parse_peer

    sd = StateDir(dest)
    if not sd.exists:
        raise NotInstalledError(f"nothing is installed in {dest}")
    identity = await trio.to_thread.run_sync(load_or_create, identity_dir)
    node = SwarmNode(
        identity,
        LocalChunks(),
        upload_limiter=RateLimiter(max_upload_rate),
        peer_upload_rate=max_peer_upload_rate,
        upload_slots=upload_slots,
        frugal=frugal,
        spare=spare,
    )

    def refresh() -> str | None:
        """Rebuild the index; returns the installed build's manifest id (hex)."""
        state = sd.load()
        node.local = local_chunks(sd, state)
        for mid in [state.current, *state.history]:
            if mid:
                node.offer(sd.load_manifest(mid))
        return state.current

    current = await trio.to_thread.run_sync(refresh)
    host, port = parse_peer(listen, listen=True)
    if discovery is None:
        discovery = DiscoveryOptions(dht_port=dht_port, dht_bootstrap=dht_bootstrap)
    discovery.identity_dir = discovery.identity_dir or identity_dir
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(node.serve, host, port)
        async with AsyncExitStack() as stack:
            disc = None
            if discovery.enabled:
                disc = await stack.enter_async_context(
                    open_discovery(identity, discovery, (host, bound))
                )
                disc.tally = lambda mid: (node.manifests[mid].total_size, 0, 0, 0, node.uploaded)
            announced: set[bytes] = set()
            listed: tuple[str, trio.CancelScope] | None = None
            while True:
                if disc is not None:
                    fresh = [m for mid, m in node.manifests.items() if mid not in announced]
                    await disc.announce(fresh)
                    announced.update(m.id for m in fresh)
                    if current is not None and (listed is None or listed[0] != current):
                        if listed is not None:
                            listed[1].cancel()  # the tracker lists only what we have installed
                        listed = (current, await nursery.start(_listed, disc, node, current))
                task_status.started(bound)
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep(RESEED_SECONDS)
                current = await trio.to_thread.run_sync(refresh)


async def _listed(
    disc: Discovery,
    node: Any,
    current: str,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await disc.keep_listed(node.manifests[bytes.fromhex(current)])


RESEED_SECONDS = 30.0


async def _apply(
    sd: StateDir,
    state: InstallState,
    signed: M.SignedManifest,
    manifest: M.Manifest,
    current: M.Manifest | None,
    mirrors: list[str],
    options: InstallOptions,
    progress: Progress,
    history_after: list[str],
    swarm: Swarm | None = None,
) -> InstallResult:
    """Assemble ``manifest`` in the stage from local chunks, peers and the CDN, then switch."""
    result = InstallResult(
        "",
        manifest,
        current.build if current else None,
        manifest.total_size,
        previous_id=current.id if current else None,
    )
    if swarm is not None:
        swarm.result = result
    sd.keep_manifest(signed)  # names the stage's content (see local_chunks); harvest prunes it
    stage = Stage(sd.stage, manifest, manifest.files)
    journal = Journal(sd.journal, manifest.id)
    journal.open()
    if not journal.done and sd.stage.exists():
        stage.remove()  # a stage for another version, or with nothing verified in it
    if journal.rebooted:
        bad = await trio.to_thread.run_sync(stage.recheck, list(journal.done))
        journal.forget(bad)
    local = LocalChunks(ChunkStore(sd.store_dir))
    if current is not None:
        local.add_tree(sd.dest, current)
    on_chunk = None
    if swarm is not None:
        serving = swarm.node.local

        def on_chunk(cid: bytes) -> None:  # serve what just landed, while still installing
            for path, offset, length in stage.locations[cid]:
                serving.add(cid, stage.root / path, offset, length)
            # Runs in a writer thread: tell connected peers from the trio thread.
            trio.from_thread.run_sync(swarm.node.have, cid)

    await assemble(
        stage, journal, local, mirrors, options, progress, result, sd.root, on_chunk, swarm
    )
    await trio.to_thread.run_sync(switch, sd, state, signed, history_after, options.keep_versions)
    return result


async def assemble(
    stage: Stage,
    journal: Journal,
    local: LocalChunks,
    mirrors: list[str],
    options: InstallOptions,
    progress: Progress,
    result: InstallResult,
    space_root: Path,
    on_chunk: Callable[[bytes], None] | None = None,
    swarm: Swarm | None = None,
) -> None:
    """Fill ``stage`` with every chunk it lacks: local verified copies and CDN fetches run
    concurrently; each chunk is written, then journaled, then reported to ``on_chunk`` (which
    the swarm uses to tell peers it has it). Closes the journal."""
    manifest = stage.manifest
    unique = {cid: locs[0][2] for cid, locs in stage.locations.items()}
    check_space(space_root, stage, {c: n for c, n in unique.items() if c not in journal.done})
    lost = await trio.to_thread.run_sync(stage.prepare)
    if lost & journal.done:
        journal.forget(lost)
    needed = {cid: n for cid, n in unique.items() if cid not in journal.done}
    result.bytes_resumed = sum(n for cid, n in unique.items() if cid in journal.done)
    progress.start(sum(unique.values()), f"{manifest.app} {manifest.version}")
    progress.advance(result.bytes_resumed)

    def put(cid: bytes, data: bytes | memoryview) -> None:
        try:
            stage.write_chunk(cid, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(
                    f"the disk holding {space_root.parent} filled up while staging"
                    " (progress is kept; rerun after freeing space)"
                ) from exc
            raise
        journal.record(cid)
        if on_chunk is not None:
            on_chunk(cid)

    local_ids = [cid for cid in needed if local.has(cid)]
    remote_ids = [cid for cid in needed if not local.has(cid)]
    missing_locally: list[bytes] = []

    async def copy_local() -> None:
        def copy_one(cid: bytes) -> bool:
            data = local.read(cid)
            if data is None:
                return False
            put(cid, data)
            return True

        for cid in local_ids:
            if await trio.to_thread.run_sync(copy_one, cid):
                result.bytes_reused += unique[cid]
                progress.advance(unique[cid])
            else:
                missing_locally.append(cid)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy_local)
            if remote_ids:
                nursery.start_soon(
                    _remote, stage, remote_ids, mirrors, options, put, progress, result, swarm
                )
        if missing_locally:
            await _remote(stage, missing_locally, mirrors, options, put, progress, result, swarm)
    except BaseExceptionGroup as group:
        raise most_telling(group) from None
    finally:
        journal.close()
        stage.close_files()
    await trio.to_thread.run_sync(stage.finish)
    progress.finish()


async def _remote(
    stage: Stage,
    ids: list[bytes],
    mirrors: list[str],
    options: InstallOptions,
    put: Callable[[bytes, bytes | memoryview], None],
    progress: Progress,
    result: InstallResult,
    swarm: Swarm | None,
) -> None:
    """Chunks from peers (per policy), with the CDN in the same schedule for what peers lack
    or give too slowly (p2p-first); then what the swarm phase left, from the CDN in bulk."""
    left = ids
    if swarm is not None and swarm.peers and options.policy != "cdn-only":
        from ..swarm.node import CdnSource

        async def store(cid: bytes, data: bytes) -> None:  # (the CDN's bytes are counted
            await trio.to_thread.run_sync(put, cid, data)  # as they arrive: bytes_cdn)
            progress.advance(len(data))

        async def deliver(cid: bytes, data: bytes) -> None:  # from a peer
            await store(cid, data)
            result.bytes_peers += len(data)

        # One HTTP client for all the CDN's batches, so they reuse its connections.
        client: httpx.AsyncClient | None = None

        async def fetch_cdn(
            batch: list[bytes], take: Callable[[bytes, bytes], Awaitable[None]]
        ) -> None:
            nonlocal client
            if client is None:
                from ..cdn.fetcher import make_client

                client = make_client(_cdn_options(options))

            async def got(req: ChunkRequest, data: bytes | memoryview) -> None:
                await take(req.id, bytes(data))  # the swarm keeps immutable bytes

            await _fetch_from_cdn(stage, batch, mirrors, options, got, result, client=client)

        cdn = None
        if options.policy == "p2p-first" and mirrors:
            cdn = CdnSource(fetch_cdn, store, depth=max(4, 2 * options.connections))
        try:
            rest = await swarm.node.fetch(
                stage.manifest,
                ids,
                swarm.peers,
                deliver,
                result.peers,
                more_peers=swarm.more_peers,
                cdn=cdn,
            )
        finally:
            if client is not None:
                with trio.CancelScope(shield=True):
                    await client.aclose()
        left = [cid for cid in ids if cid in rest]
    if swarm is not None and swarm.more_peers is not None:
        swarm.more_peers.close()  # the swarm takes no more peers: discovery stops its lookups
    if not left:
        return
    if options.policy == "p2p-only":
        raise TransportError(
            f"{len(left)} chunks of {stage.manifest.app} {stage.manifest.version} could not be "
            "had from any peer (policy p2p-only)",
            fix="add peers with --peer HOST:PORT, or use --policy p2p-first",
        )

    def put_verified(req: ChunkRequest, data: bytes | memoryview) -> None:
        put(req.id, data)  # in the thread that verified it: one hop per chunk, not two

    async def delivered(req: ChunkRequest, data: bytes | memoryview) -> None:
        pass

    await _fetch_from_cdn(
        stage,
        left,
        mirrors,
        options,
        delivered,
        result,
        on_bytes=progress.advance,
        store=put_verified,
    )


async def _fetch_from_cdn(
    stage: Stage,
    ids: list[bytes],
    mirrors: list[str],
    options: InstallOptions,
    deliver: Callable[[ChunkRequest, bytes | memoryview], Awaitable[None]],
    result: InstallResult,
    on_bytes: Callable[[int], None] | None = None,
    client: httpx.AsyncClient | None = None,
    store: Callable[[ChunkRequest, bytes | memoryview], None] | None = None,
) -> None:
    """Fetch ``ids`` from the mirrors, counting what the CDN sent into ``result`` (also
    when it fails part way). ``client``: an ``httpx.AsyncClient`` to use (default: the
    fetch makes its own); ``store``: see :meth:`CDNFetcher.fetch`."""
    from ..cdn.fetcher import CDNFetcher

    manifest = stage.manifest
    if not mirrors:
        raise CDNError(
            f"{len(ids)} chunks of {manifest.app} {manifest.version} are not on this machine "
            "and no mirror is known",
            fix="pass --mirror BASE_URL",
        )
    requests = []
    for cid in ids:
        path, offset, length = stage.locations[cid][0]
        requests.append(ChunkRequest(cid, path, offset, length))
    fetcher = CDNFetcher(
        app=manifest.app,
        build=manifest.build,
        mirrors=mirrors,
        file_sizes={f.path: f.size for f in manifest.files},
        options=_cdn_options(options),
        client=client,
        on_bytes=on_bytes,
        limiter=options.limiter,
    )
    try:
        await fetcher.fetch(requests, deliver, store=store)
    finally:
        result.bytes_cdn += fetcher.stats.bytes_received
        for name, ms in fetcher.stats.per_mirror.items():
            _add_mirror_stats(result.mirrors.setdefault(name, {}), vars(ms))


def _cdn_options(options: InstallOptions) -> CDNOptions:
    from ..cdn.fetcher import CDNOptions

    return CDNOptions(connections=options.connections, max_download_rate=options.max_download_rate)


def _add_mirror_stats(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Sum one CDN fetch's per-mirror figures into an install's (the swarm phase may run
    several)."""
    for key, value in more.items():
        if isinstance(value, dict):
            _add_mirror_stats(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
