"""Where an install's missing chunks come from: peers and the CDN, as the source policy
(``policy.SourcePolicy``) allows.

Peers are asked first, with the CDN in the same schedule for what no peer has or gives too
slowly (``p2p-first``); whatever the swarm phase leaves comes from the CDN in bulk, unless the
policy forbids it (``p2p-only``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ..cdn.ranges import ChunkRequest
from ..disk.stage import Stage
from ..errors import CDNError, TransportError
from ..progress import Progress
from .policy import SourcePolicy
from .result import InstallResult, add_mirror_stats

if TYPE_CHECKING:
    import httpx

    from ..cdn.fetcher import CDNOptions
    from .options import InstallOptions
    from .peers import Swarm

__all__ = ["fetch_from_cdn", "fetch_missing"]


async def fetch_missing(
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
    if swarm is not None and swarm.peers and options.policy.asks_peers:
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

                client = make_client(cdn_options(options))

            async def got(req: ChunkRequest, data: bytes | memoryview) -> None:
                await take(req.id, bytes(data))  # the swarm keeps immutable bytes

            await fetch_from_cdn(stage, batch, mirrors, options, got, result, client=client)

        cdn = None
        if options.policy is SourcePolicy.P2P_FIRST and mirrors:
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
    if not options.policy.uses_cdn:
        from ..swarm.node import why_no_peer

        raise TransportError(
            f"{len(left)} chunks of {stage.manifest.app} {stage.manifest.version} could not be "
            f"had from any peer (policy p2p-only): {why_no_peer(result.peers)}",
            fix="add peers with --peer HOST:PORT, or use --policy p2p-first",
        )

    def put_verified(req: ChunkRequest, data: bytes | memoryview) -> None:
        put(req.id, data)  # in the thread that verified it: one hop per chunk, not two

    await fetch_from_cdn(
        stage,
        left,
        mirrors,
        options,
        None,
        result,
        on_bytes=progress.advance,
        store=put_verified,
    )


async def fetch_from_cdn(
    stage: Stage,
    ids: list[bytes],
    mirrors: list[str],
    options: InstallOptions,
    deliver: Callable[[ChunkRequest, bytes | memoryview], Awaitable[None]] | None,
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
        options=cdn_options(options),
        client=client,
        on_bytes=on_bytes,
        limiter=options.limiter,
    )
    try:
        await fetcher.fetch(requests, deliver, store=store)
    finally:
        result.bytes_cdn += fetcher.stats.bytes_received
        for name, ms in fetcher.stats.per_mirror.items():
            add_mirror_stats(result.mirrors.setdefault(name, {}), vars(ms))


def cdn_options(options: InstallOptions) -> CDNOptions:
    """The CDN fetcher's knobs an install sets; the rest keep the fetcher's defaults."""
    from ..cdn.fetcher import CDNOptions

    return CDNOptions(connections=options.connections, max_download_rate=options.max_download_rate)
