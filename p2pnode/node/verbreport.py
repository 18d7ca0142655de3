"""What the node's one-off verbs tell a tracker about their attempt (issue 18's install
outcomes): ``install``/``update --tracker`` report their announce, peers and outcome (or the
failure and its code), ``rollback`` and ``verify --repair`` given ``--tracker`` report theirs
(kinds ``rollback``, ``repair``). ``watch`` and the client daemon report the same fields
(``tracking.py``). Tracker trouble is a warning on stderr, never the verb's failure.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..errors import P2PNodeError
from .options import InstallOptions
from .result import InstallResult

if TYPE_CHECKING:
    from ..discovery.tracker import TrackerClient

__all__ = ["listen_port", "report_attempt", "report_done", "report_failure"]


def listen_port(options: InstallOptions) -> int | None:
    """The port ``--listen`` names (``None``: not serving, or a port the OS picks)."""
    if not options.listen:
        return None
    port = int(options.listen.rpartition(":")[2] or 0)
    return port or None


async def report_done(
    tracker: TrackerClient, options: InstallOptions, result: InstallResult
) -> None:
    """After ``install``/``update`` through a tracker: the completed announce and the peers'
    quality, and the install outcome unless nothing changed, as the daemon reports them."""
    from .tracking import report_install, report_success, reporter

    me, host = await reporter(options.identity_dir, options.listen, tracker.base_url)
    port = listen_port(options)
    if result.action == "unchanged":
        trouble = await report_install(tracker, me, result, port, host)
    else:
        trouble = await report_success(tracker, me, result, result.seconds, port, host)
    if trouble is not None:
        print(f"p2pnode: warning: {trouble}", file=sys.stderr)


async def report_failure(
    tracker: TrackerClient,
    options: InstallOptions,
    data: bytes,
    error: P2PNodeError,
    seconds: float,
    kind: str,
) -> None:
    """A failed ``install``/``update`` of the build the tracker named (``data``: its signed
    manifest), with its failure code, as ``watch`` reports one; a downgrade the node refused
    on purpose is no failure."""
    from ..errors import DowngradeError
    from ..release.manifest import parse_signed
    from .tracking import outcome_fields, report_outcome, reporter

    if isinstance(error, DowngradeError):
        return
    signed = parse_signed(data)
    m = signed.manifest
    fields = outcome_fields(
        app=m.app,
        manifest_id=signed.id,
        to_build=m.build,
        from_build=None,
        seconds=seconds,
        error=error,
        kind=kind,
    )
    me, _ = await reporter(options.identity_dir, None, tracker.base_url)
    trouble = await report_outcome(tracker, me, fields)
    if trouble is not None:
        print(f"p2pnode: warning: {trouble}", file=sys.stderr)


async def report_attempt(url: str, options: InstallOptions, result: InstallResult) -> None:
    """``rollback``/``verify --repair`` with ``--tracker``: the attempt as an install outcome
    (kind ``rollback`` or ``repair``), so that the tracker's rollbacks and repairs per build
    count this node; tracker trouble is a warning, never the command's failure."""
    from ..discovery.tracker import TrackerClient
    from .tracking import report_outcome, reporter, success_fields

    async with TrackerClient(url) as tracker:
        me, _ = await reporter(options.identity_dir, None, tracker.base_url)
        trouble = await report_outcome(tracker, me, success_fields(result, result.seconds))
    if trouble is not None:
        print(f"p2pnode: warning: {trouble}", file=sys.stderr)
