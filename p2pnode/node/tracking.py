"""A node's conversation with a tracker around one install: announce, peers, reports.

While a node installs and serves, discovery (``discover.py``, ``TrackerPeerSource``) announces
it and takes the peers the tracker ranks for it; after the install, it announces completion with the
bytes it got from peers and from the CDN (the tracker's offload figures) and reports the quality
of every peer it used (signed, as docs/tracker-api.md specifies). A node that does not serve
announces with port 0: it is counted (offload, completions) but never handed out as a peer.

Every attempt, failed or not, is also sent as an install outcome (``POST /v1/outcomes``): the
kind, success or a stable failure code (:func:`outcome_code`, from the error tree), how long it
took, bytes by source (peers and CDN each counting the delta patches they gave, and how many
of those bytes were patches), from-build and to-build. Like the completion report it is bounded: the
tracker's trouble costs statistics, never the install.
"""

from __future__ import annotations

import errno
import functools
import time
from pathlib import Path
from typing import Any

import trio

from ..discovery.dht.records import Topic, make_record
from ..discovery.tracker import PeerQualityReport, TrackerClient, TrackerError
from ..errors import (
    CDNError,
    ChunkHashError,
    ClientTooOldError,
    DiskSpaceError,
    DowngradeError,
    ExpiredManifestError,
    InstallError,
    InstallLockedError,
    IntegrityError,
    ManifestError,
    NoRollbackError,
    PlatformError,
    ProtocolError,
    SignatureError,
    TransportError,
    UsageError,
)
from ..identity import NodeIdentity
from ..release import manifest as M
from .result import InstallResult

__all__ = [
    "announce_completed",
    "channel_manifest",
    "node_and_build",
    "outcome_code",
    "outcome_fields",
    "own_records",
    "report_install",
    "report_outcome",
    "report_success",
    "reporter",
    "serving_host",
    "success_fields",
]


def own_records(me: NodeIdentity, manifest: M.Manifest, host: str | None, port: int) -> list[bytes]:
    """Our signed peer records for ``manifest`` and its app, attached to every announce: the
    tracker keeps only the latest announce's records, and nodes take tracker peers only with
    records that verify (``TrackerPeerSource``)."""
    if host is None:
        return []
    now = time.time()
    return [
        make_record(me.key, topic, host, port, now=now, ttl=RECORD_TTL).encoded
        for topic in (Topic.manifest(manifest.id), Topic.app(manifest.app))
    ]


RECORD_TTL = 1800.0


async def announce_completed(
    tracker: TrackerClient,
    me: NodeIdentity,
    result: InstallResult,
    port: int | None,
    host: str | None = None,
) -> None:
    """Tell the tracker where this install's bytes came from, and how each peer did.
    ``host``: the address this node serves on (``discover.announce_host``), for its records."""
    m = result.manifest
    port = port or 0
    if result.previous_id is not None:
        # Its earlier build is kept for rollback but no longer installed: leave that swarm's
        # seeders (the app-wide partial-seed answers still find this node).
        await tracker.announce(
            me.key,
            app=m.app,
            manifest_id=result.previous_id,
            port=port,
            event="stopped",
        )
    done = functools.partial(
        tracker.announce,
        me.key,
        app=m.app,
        manifest_id=m.id,
        port=port,
        size=m.total_size,
        left=0,
        from_peers=result.from_peers,
        from_cdn=result.from_cdn,
        ip=host if port else None,
        records=own_records(me, m, host, port) if port else [],
    )
    await done(event="completed")
    if tracker.owes_client_version:
        # This client's first announce (a one-off install's only one) went without the
        # p2pnode version, which the answer says the tracker takes: say it once more with it,
        # or the fleet view counts this node as an "unknown" client. The same running totals
        # again add no bytes, and a node already complete is not counted complete twice.
        await done(event="update")
    reports = [
        PeerQualityReport(
            node_id=st.node_id,
            bytes=st.bytes,
            rate=int(st.rate),
            failures=st.failures,
            corrupt=st.corrupt,
        )
        for st in result.peers.values()
        if st.node_id
    ]
    if reports:
        await tracker.report(me.key, reports)


def serving_host(listen: str | None, tracker_url: str) -> str | None:
    """The address a node serving on ``listen`` names in its records: the listen host, or for
    a wildcard the local address toward the tracker (``discover.announce_host``). Blocking
    (a UDP ``connect``): call it from a thread."""
    if not listen:
        return None
    import httpx

    from ..discovery.race import announce_host

    return announce_host(listen.rpartition(":")[0], [httpx.URL(tracker_url).host])


def node_and_build(identity_dir: Path | None, dest: Path) -> tuple[bytes, bytes | None]:
    """This node's id and the manifest id DEST runs (``None``: nothing installed, or a state
    that cannot be read): what a channel's staged rollout decides by. Blocking (reads the node
    key, creating it on first use, and DEST's state): call it from a thread."""
    from ..disk.state import StateDir
    from ..errors import P2PNodeError
    from ..identity import load_or_create

    me = load_or_create(identity_dir)
    sd = StateDir(dest)
    try:
        state = sd.load() if sd.exists else None
    except (P2PNodeError, OSError):
        state = None
    current = state.current if state is not None else None
    return me.node_id, bytes.fromhex(current) if current else None


async def channel_manifest(
    url: str,
    app: str,
    channel: str,
    *,
    node: bytes | None = None,
    have: bytes | None = None,
) -> tuple[str, bytes, str | None]:
    """The channel's signed manifest for this node, via the tracker (verified by the caller),
    where it came from, and the app's key chain the feed named (``InstallOptions.key_chain``).
    ``node``/``have`` (``node_and_build``) get the build a staged rollout offers this node;
    without them a tracker offers the rollout's previous build."""
    async with TrackerClient(url) as tracker:
        head = await tracker.latest(app, channel, node=node, have=have)
        if head is None:
            raise UsageError(
                f"nothing is published on channel {channel!r} of {app} at {url}",
                fix="publish a build first (p2pnode publish ... --tracker URL)",
            )
        data = await tracker.fetch_manifest(head.manifest_id)
    return f"{url} ({app}/{channel})", data, head.key_chain


async def reporter(
    identity_dir: Path | None, listen: str | None, tracker_url: str
) -> tuple[NodeIdentity, str | None]:
    """Who reports installs to the tracker at ``tracker_url``: this node's identity, and the
    host its records name when it serves on ``listen`` (``serving_host``)."""
    from ..identity import load_or_create

    me = await trio.to_thread.run_sync(load_or_create, identity_dir)
    host = await trio.to_thread.run_sync(serving_host, listen, tracker_url)
    return me, host


async def report_install(
    tracker: TrackerClient,
    me: NodeIdentity,
    result: InstallResult,
    port: int | None,
    host: str | None,
) -> str | None:
    """``announce_completed``, bounded: tracker trouble after an install costs statistics, not
    the install. Returns why the report failed (for a warning), or ``None``."""
    try:
        with trio.fail_after(REPORT_TIMEOUT):
            await announce_completed(tracker, me, result, result.listen_port or port, host)
    except TrackerError as exc:
        return f"could not report to the tracker: {exc.message}"
    except trio.TooSlowError:
        return f"could not report to the tracker: no answer within {REPORT_TIMEOUT:.0f}s"
    return None


REPORT_TIMEOUT = 30.0


#: The outcome kind of each install action (``InstallResult.action``).
KINDS = {
    "installed": "install",
    "reinstalled": "install",
    "updated": "update",
    "repaired": "repair",
    "repair": "repair",
    "rolled-back": "rollback",
}

#: Error classes to failure codes (``tracker_api.OUTCOME_CODES``), most specific first.
_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (DiskSpaceError, "insufficient_storage"),
    (PermissionError, "permission_denied"),
    (TimeoutError, "network_timeout"),
    (trio.TooSlowError, "network_timeout"),
    (ChunkHashError, "corrupted_download"),
    (SignatureError, "signature_invalid"),
    (ExpiredManifestError, "manifest_expired"),
    (DowngradeError, "downgrade_refused"),
    (ClientTooOldError, "client_too_old"),
    (PlatformError, "platform_unsupported"),
    (IntegrityError, "integrity_check_failed"),
    (ManifestError, "manifest_invalid"),
    (NoRollbackError, "rollback_failed"),
    (InstallLockedError, "install_locked"),
    (CDNError, "download_failed"),
    (TrackerError, "tracker_unreachable"),
    (ProtocolError, "peer_protocol_error"),
    (TransportError, "network_error"),
    (InstallError, "install_failed"),
)


def outcome_code(exc: BaseException) -> str:
    """The stable failure code of an install's error: what the error or any error behind it
    (``__cause__``/``__context__``) is, the root cause first (a full disk behind an
    ``InstallError`` is ``insufficient_storage``); ``other`` when nothing matches."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for cause in reversed(chain):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return "insufficient_storage"
        for cls, code in _CODES:
            if isinstance(cause, cls):
                return code
    return "other"


def outcome_fields(
    *,
    app: str,
    manifest_id: bytes,
    to_build: int,
    from_build: int | None,
    seconds: float,
    result: InstallResult | None = None,
    error: BaseException | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """The body of one outcome: a ``result`` (success) or an ``error`` (failure; its kind is
    ``kind``, else ``update`` when a build was installed (``from_build``), else ``install``)."""
    fields: dict[str, Any] = {
        "app": app,
        "manifest": manifest_id.hex(),
        "to_build": to_build,
        "duration_ms": max(0, round(seconds * 1000)),
    }
    if from_build is not None:
        fields["from_build"] = from_build
    if result is not None:
        fields.update(
            kind=KINDS.get(result.action, "install"),
            outcome="success",
            bytes_peers=result.from_peers,
            bytes_cdn=result.from_cdn,
            bytes_reused=result.bytes_reused + result.bytes_resumed,
            # the tracker's traffic series: patch bytes, and how many of bytes_cdn and
            # bytes_peers they are (TrackerClient sends the split to trackers that take it)
            bytes_patches=result.bytes_patches,
            bytes_patches_cdn=result.bytes_patches_cdn,
            bytes_patches_peers=result.bytes_patches_peers,
        )
    else:
        assert error is not None, "an outcome is a result or an error"
        if kind is None:
            kind = "install" if from_build is None else "update"
        fields.update(kind=kind, outcome="failure", code=outcome_code(error))
    return fields


def success_fields(result: InstallResult, seconds: float) -> dict[str, Any]:
    """The outcome of an attempt that gave ``result`` (an install, update, repair or
    rollback): its build, the one before it, and where its bytes came from."""
    m = result.manifest
    return outcome_fields(
        app=m.app,
        manifest_id=m.id,
        to_build=m.build,
        from_build=result.previous_build,
        seconds=seconds,
        result=result,
    )


async def report_outcome(
    tracker: TrackerClient, me: NodeIdentity, fields: dict[str, Any]
) -> str | None:
    """Send an outcome, bounded as ``report_install``; why it failed, or ``None``."""
    try:
        with trio.fail_after(REPORT_TIMEOUT):
            await tracker.report_outcome(me.key, fields)
    except TrackerError as exc:
        return f"could not report the outcome to the tracker: {exc.message}"
    except trio.TooSlowError:
        return (
            f"could not report the outcome to the tracker: no answer within {REPORT_TIMEOUT:.0f}s"
        )
    return None


async def report_success(
    tracker: TrackerClient,
    me: NodeIdentity,
    result: InstallResult,
    seconds: float,
    port: int | None,
    host: str | None,
) -> str | None:
    """After an install: where its bytes came from and how the peers did
    (:func:`report_install`), then its outcome; why either report failed, or ``None``."""
    trouble = await report_install(tracker, me, result, port, host)
    return await report_outcome(tracker, me, success_fields(result, seconds)) or trouble
