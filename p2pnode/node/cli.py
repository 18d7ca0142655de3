"""The ``p2pnode`` command line.

Contract (scripts rely on it): every verb exits 0 on success; on failure it exits non-zero and
prints one line on stderr naming the cause and the fix. ``--json`` prints exactly one JSON object
on stdout (on failure too: ``{"ok": false, "error": ..., "fix": ...}``). Long operations draw a
rich progress bar on stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .. import __version__
from ..errors import P2PNodeError, UsageError, most_telling
from ..release import keys
from .flags import (
    add_dht_flags,
    add_fetch_flags,
    add_peer_rate_flags,
    add_swarm_flags,
    discovery_flags,
    install_options,
    rate,
    slots,
    trusted,
)
from .render import (
    install_json,
    print_install,
    print_published,
    print_status,
    print_verify,
    print_watch_event,
)

if TYPE_CHECKING:
    from ..progress import Progress
    from ..release.publish import PublishResult
    from .options import InstallOptions
    from .result import InstallResult

__all__ = ["main"]


def _progress(args: argparse.Namespace) -> Progress | None:
    from ..progress import RichProgress

    if args.json or args.quiet or not sys.stderr.isatty():
        return None
    return RichProgress()


def cmd_keygen(args: argparse.Namespace) -> dict[str, Any]:
    key = keys.generate_key()
    keys.save_private_key(key, Path(args.keyfile))
    public = keys.format_public_key(keys.public_key_bytes(key))
    if not args.json:
        print(public)
    return {"key": public, "keyfile": str(args.keyfile)}


def cmd_publish(args: argparse.Namespace) -> dict[str, Any]:
    from ..release.publish import publish, read_notes, release_info

    if args.rollout is not None and not args.tracker:
        raise UsageError("--rollout needs --tracker", fix="pass the tracker's URL")
    if args.rollout is not None and not 0.01 <= args.rollout <= 100:
        raise UsageError(f"--rollout {args.rollout:g} is not a percentage", fix="e.g. --rollout 10")
    info = release_info(
        update_type=args.type,
        notes=read_notes(Path(args.notes)) if args.notes else None,
        min_client=args.min_client,
        platforms=args.platform or (),
    )
    key = keys.load_private_key(Path(args.key))
    result = publish(
        Path(args.src),
        app=args.app,
        version=args.version,
        build=args.build,
        key=key,
        out=Path(args.out),
        channel=args.channel,
        mirrors=args.mirror or (),
        nokeep=args.never_keep or (),
        info=info,
        lifetime=int(args.expires_days * 86400),
        progress=_progress(args),
        patch_from_builds=0 if args.no_patches else args.patch_from_builds,
        patch_level=args.patch_level,
    )
    out = result.as_json()
    if args.tracker:
        out["tracker"] = trio.run(_publish_to_tracker, args, result)
    if not args.json:
        print_published(out, result, Path(args.out))
    return out


async def _publish_to_tracker(args: argparse.Namespace, result: PublishResult) -> dict[str, Any]:
    from ..discovery.tracker import TrackerClient

    if not args.token:
        raise UsageError("--tracker needs --token", fix="pass the publisher or admin token")
    m = result.manifest
    async with TrackerClient(args.tracker, token=args.token) as tracker:
        answer: dict[str, Any] = await tracker.publish(
            m.app, m.channel, result.signed.encode(), rollout=args.rollout
        )
    return answer


async def _install_verb(args: argparse.Namespace, options: InstallOptions) -> InstallResult | None:
    """``install``/``update``: the install, reported to the tracker when one resolved it, and
    with ``--seed`` served until SIGINT/SIGTERM (``None``: stopped before it was installed).

    Through a tracker, peers come from the tracker (raced with the DHT and the LAN when those
    are on) and the node reports back when done; tracker trouble after the manifest is in hand
    costs peers and statistics, not the install.
    """
    from ..discovery.tracker import TrackerClient
    from .install import install, install_and_seed
    from .tracking import channel_manifest, node_and_build
    from .verbreport import report_done, report_failure

    location, data, have = args.manifest, None, None
    if args.tracker:  # named, so that a staged rollout counts this node in or out
        node, have = await trio.to_thread.run_sync(
            node_and_build, options.identity_dir, Path(args.dest)
        )
        location, data, options.key_chain = await channel_manifest(
            args.tracker, args.manifest, args.channel, node=node, have=have
        )
    run = (location, Path(args.dest), trusted(args.trust), options, _progress(args))
    async with AsyncExitStack() as stack:
        tracker = None
        if args.tracker:
            tracker = await stack.enter_async_context(TrackerClient(args.tracker))
        if not args.seed:
            started = trio.current_time()
            try:
                result = await install(*run, manifest_data=data)
            except P2PNodeError as exc:
                if tracker is not None and data is not None:
                    seconds = trio.current_time() - started
                    kind = "update" if have is not None else "install"
                    await report_failure(tracker, options, data, exc, seconds, kind)
                raise
            if tracker is not None:
                await report_done(tracker, options, result)
            return result

        async def ready(result: InstallResult) -> None:
            _print_seeding(args, result)
            if tracker is not None:
                await report_done(tracker, options, result)

        seeding = partial(install_and_seed, *run, manifest_data=data)
        seeded: InstallResult | None = await _serve_until_signalled(seeding, ready)
        return seeded


def _print_seeding(args: argparse.Namespace, result: InstallResult) -> None:
    """``--seed``: the install is done and served; say so before serving on."""
    if args.json:
        print(json.dumps({"event": "installed", **install_json(result)}), flush=True)
    else:
        print_install(install_json(result))
        print(f"seeding on {args.listen} (Ctrl-C to stop)", flush=True)


async def _serve_until_signalled(
    start: Callable[..., Awaitable[object]], ready: Callable[[Any], Awaitable[None]]
) -> Any:
    """Start a long-running task (``nursery.start(start)``: an installing seeder, a seed box),
    await ``ready`` with what it started with, then keep it running until SIGINT/SIGTERM.
    Returns what it started with, or ``None`` if stopped before it started."""
    started = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
        started = await nursery.start(start)
        await ready(started)
        await trio.sleep_forever()
    return started


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def _refuse_managed(args: argparse.Namespace) -> None:
    """A DEST in the daemon's library is the daemon's: a standalone verb would switch or repair
    it under the daemon's feet (``service/client.py``, one of cli's arrows up the layers)."""
    from ..service.client import refuse_managed_dest

    refuse_managed_dest(args.dest, args.verb)


def cmd_install(args: argparse.Namespace, *, update: bool = False) -> dict[str, Any]:
    _refuse_managed(args)
    options = install_options(args, require_installed=update)
    if args.seed and not options.listen:
        raise UsageError("--seed needs --listen HOST:PORT", fix="add --listen 0.0.0.0:6881")
    result = trio.run(_install_verb, args, options)
    if result is None:
        raise UsageError("stopped before the install finished", fix="run it again to resume")
    if args.seed:
        return {"event": "stopped", "build": result.manifest.build}
    if not args.json:
        print_install(install_json(result))
    return dict(install_json(result))


def cmd_watch(args: argparse.Namespace) -> dict[str, Any]:
    """Follow a channel: install each new build the moment the tracker announces it, and with
    ``--listen`` serve what is installed in between (``p2pnode/node/watch.py``).

    With ``--json`` this verb streams: one JSON line per event, then the summary.
    """
    from .watch import WatchOptions, watch

    _refuse_managed(args)
    if args.max_updates is not None and args.max_updates < 1:
        raise UsageError("--max-updates must be at least 1")
    if args.origin and not args.listen:
        raise UsageError(
            "--origin is a seed box: it needs --listen", fix="add --listen 0.0.0.0:6881"
        )
    options = install_options(args, origin=args.origin)
    opts = WatchOptions(
        app=args.app,
        channel=args.channel,
        tracker=args.tracker,
        dest=Path(args.dest),
        trusted=trusted(args.trust),
        install=options,
        max_updates=args.max_updates,
    )

    installed: list[int] = []

    def emit(event: dict[str, Any]) -> None:
        if event["event"] == "installed":
            installed.append(event["build"])
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            print_watch_event(event)

    async def run() -> None:
        with trio.move_on_after(args.timeout or math.inf):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
                await watch(opts, emit, _progress(args))
                nursery.cancel_scope.cancel()

    trio.run(run)
    return {"updates": len(installed), "builds": installed}


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    await _until_signalled()
    scope.cancel()


def cmd_seed(args: argparse.Namespace) -> dict[str, Any]:
    """Serve until SIGINT/SIGTERM; then exit 0."""
    from ..discovery.race import DiscoveryOptions
    from .seed import seed

    async def ready(port: int) -> None:
        if args.json:
            print(json.dumps({"event": "listening", "port": port}), flush=True)
        else:
            print(f"seeding {args.dest} on port {port} (Ctrl-C to stop)", flush=True)

    serve = partial(
        seed,
        Path(args.dest),
        args.listen,
        None,
        rate(args.max_upload_rate),
        frugal=args.frugal,
        spare=args.spare,
        max_peer_upload_rate=rate(args.max_peer_upload_rate),
        upload_slots=slots(args.upload_slots),
        discovery=DiscoveryOptions(**discovery_flags(args), tracker=args.tracker),
    )
    trio.run(_serve_until_signalled, serve, ready)
    return {"stopped": True}


def cmd_update(args: argparse.Namespace) -> dict[str, Any]:
    return cmd_install(args, update=True)


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from .install import rollback
    from .verbreport import report_attempt

    _refuse_managed(args)
    options = install_options(args)

    async def run() -> InstallResult:
        result = await rollback(Path(args.dest), options, _progress(args), args.to)
        if args.tracker:
            await report_attempt(args.tracker, options, result)
        return result

    result = trio.run(run)
    if not args.json:
        print_install(install_json(result))
    return dict(install_json(result))


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from ..disk.scan import VerifyReport
    from .verbreport import report_attempt
    from .verify import repaired, verify

    _refuse_managed(args)
    options = install_options(args)

    async def run() -> VerifyReport:
        report = await verify(
            Path(args.dest), repair=args.repair, options=options, progress=_progress(args)
        )
        if args.tracker and report.repaired:
            await report_attempt(args.tracker, options, repaired(report))
        return report

    report = trio.run(run)
    out = report.as_json()
    if not args.json:
        print_verify(report)
    if not report.ok:
        problems = len(report.missing) + len(report.corrupt) + len(report.extra)
        raise _Failed(
            out,
            f"{problems} files are missing, corrupt or extra in {args.dest}",
            "run `p2pnode verify --dest DIR --repair`",
        )
    return out


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    from ..disk.snapshot import check
    from ..disk.state import StateDir
    from ..disk.switch import kept_offline

    sd = StateDir(Path(args.dest))
    if not sd.exists:
        raise UsageError(f"nothing is installed in {args.dest}", fix="install a release first")
    state = sd.load()
    versions = []
    for mid in [state.current, *state.history]:
        if not mid:
            continue
        m = sd.load_manifest(mid)
        offline = mid != state.current and kept_offline(sd, state, mid)
        versions.append({"manifest_id": mid, "version": m.version, "build": m.build})
        versions[-1].update({"offline": offline} if mid != state.current else {})
    health = check(sd, sd.load_manifest(state.current), update=False) if state.current else None
    out: dict[str, Any] = {
        "app": state.app,
        "current": versions[0] if versions else None,
        **(health.as_json() if health else {}),
        "kept": versions[1:],
        "mirrors": state.mirrors,
        "trusted": state.trusted,
    }
    if not args.json:
        print_status(out, args.dest, health)
    return out


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from ..demo.network import run_demo

    return run_demo(
        Path(args.workdir) if args.workdir else None, json_mode=args.json, keep=args.keep
    )


def cmd_daemon(args: argparse.Namespace) -> dict[str, Any]:
    """The client service in the foreground until SIGINT/SIGTERM (``p2pnode/service/``: this
    verb is the one arrow from ``node`` up to ``service``, see docs/architecture.md).

    With ``--json`` it streams one JSON line per event, then the summary."""
    from ..service.client import state_dir_from
    from ..service.daemon import DEFAULT_API, DaemonOptions, run_daemon
    from .config import default_config_path, load_config

    config_path = Path(args.config) if args.config else None
    config = load_config(config_path)
    opts = DaemonOptions(
        state=state_dir_from(args.state),  # the same rule as the client verbs
        table=config.service,
        where=str(config_path or default_config_path()),
        listen=args.listen,
        api=DEFAULT_API if args.api is None else None if args.api == "off" else args.api,
        **discovery_flags(args),
    )

    def emit(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif not args.quiet:
            name = event.pop("event")
            print(f"{name}: " + " ".join(f"{k}={v}" for k, v in event.items()), flush=True)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            await run_daemon(opts, emit)
            nursery.cancel_scope.cancel()

    trio.run(run)
    return {"stopped": True}


class _Failed(P2PNodeError):
    """A verb that ran but whose outcome is a failure (verify found damage): ``main`` prints
    its payload with the error."""

    def __init__(self, payload: dict[str, Any], message: str, fix: str) -> None:
        super().__init__(message, fix=fix)
        self.payload = payload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pnode", description="Peer-to-peer distribution of signed software releases."
    )
    parser.add_argument("--version", action="version", version=f"p2pnode {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("keygen", parents=[common], help="make a publisher key")
    p.add_argument("keyfile")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("publish", parents=[common], help="publish a directory as a release")
    p.add_argument("src")
    p.add_argument("--app", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--build", required=True, type=int)
    p.add_argument("--key", required=True, metavar="KEYFILE")
    p.add_argument("--out", required=True, metavar="CDN_DIR")
    p.add_argument("--channel", default="stable")
    p.add_argument(
        "--mirror",
        action="append",
        metavar="BASE_URL",
        help="CDN root URL to record in the signed manifest (repeatable)",
    )
    p.add_argument(
        "--never-keep",
        action="append",
        metavar="PATTERN",
        help="the user's files at these release paths (glob, e.g. 'cache/*') are not kept "
        "across an update to this build but moved to the install's quarantine (repeatable)",
    )
    p.add_argument("--expires-days", type=float, default=365.0)
    p.add_argument(
        "--type",
        metavar="TYPE",
        help="update type: critical (queued first, outside update windows), major, minor, "
        "hotfix or beta",
    )
    p.add_argument("--notes", metavar="FILE", help="release notes: a UTF-8 text file, <= 16 KiB")
    p.add_argument(
        "--min-client",
        metavar="VERSION",
        help="oldest p2pnode (PEP 440 version) that may install this build",
    )
    p.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH",
        help="a platform the build is for, e.g. linux/x86_64, windows/x86_64, macos/arm64 or "
        "any (repeatable or comma-separated; default any)",
    )
    p.add_argument(
        "--patch-from-builds",
        type=int,
        default=2,
        metavar="N",
        help="make binary delta patches from the newest N earlier builds in CDN_DIR (default 2)",
    )
    p.add_argument("--no-patches", action="store_true", help="publish without delta patches")
    p.add_argument(
        "--patch-level",
        type=int,
        default=19,
        choices=range(1, 23),
        metavar="1-22",
        help="zstd level of the patches: 19 (default) makes the smallest; 12 is ~10x faster "
        "for patches ~15%% larger",
    )
    p.add_argument("--tracker", metavar="URL", help="also publish to this tracker's channel")
    p.add_argument("--token", help="publisher or admin token for --tracker")
    p.add_argument(
        "--rollout",
        type=float,
        metavar="PERCENT",
        help="with --tracker: offer the build to this share of the channel's nodes only (a "
        "staged rollout; the others keep the previous build); raise it with `tracker rollout`",
    )
    p.set_defaults(func=cmd_publish)

    for verb, func, helptext in (
        ("install", cmd_install, "install a release (or update an installed one)"),
        ("update", cmd_update, "update an installed release, fetching only new chunks"),
    ):
        p = sub.add_parser(verb, parents=[common], help=helptext)
        p.add_argument("manifest", help="manifest URL or path; with --tracker, the app's name")
        p.add_argument("--dest", required=True, metavar="DIR")
        p.add_argument("--tracker", metavar="URL", help="resolve APP's channel through a tracker")
        p.add_argument("--channel", default="stable", help="with --tracker (default stable)")
        add_swarm_flags(p)
        p.add_argument(
            "--seed",
            action="store_true",
            help="with --listen: keep serving after the install until stopped",
        )
        p.add_argument(
            "--trust",
            action="append",
            metavar="ed25519:HEX",
            help="publisher key to trust (repeatable; update defaults to the pinned)",
        )
        add_fetch_flags(p)
        p.set_defaults(func=func)

    p = sub.add_parser("watch", parents=[common], help="install each new build of a channel")
    p.add_argument("app")
    p.add_argument("--tracker", required=True, metavar="URL")
    p.add_argument("--channel", default="stable")
    p.add_argument("--dest", required=True, metavar="DIR")
    p.add_argument("--trust", action="append", metavar="ed25519:HEX")
    p.add_argument("--max-updates", type=int, help="stop after this many installs")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    add_swarm_flags(p)  # with --listen: serve what is installed between builds
    p.add_argument(
        "--origin",
        action="store_true",
        help="a CDN-origin seed box: upload each chunk once before any twice, and leechers "
        "spare its upload (as `seed` does); use with --policy cdn-only",
    )
    add_fetch_flags(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("seed", parents=[common], help="serve an installed release to peers")
    p.add_argument("--dest", required=True, metavar="DIR")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--max-upload-rate", metavar="RATE", help="cap in bytes/s (K/M/G)")
    add_peer_rate_flags(p, download=False)
    p.add_argument(
        "--no-frugal",
        dest="frugal",
        action="store_false",
        help="upload chunks again even while some were never uploaded",
    )
    p.add_argument(
        "--no-spare",
        dest="spare",
        action="store_false",
        help="do not ask leechers to spare this box's upload: faster swarms, more egress",
    )
    p.add_argument("--tracker", metavar="URL", help="keep the installed build listed here")
    add_dht_flags(p)
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("rollback", parents=[common], help="go back to a kept version")
    p.add_argument("--dest", required=True, metavar="DIR")
    p.add_argument(
        "--to",
        type=int,
        metavar="BUILD",
        help="the kept build to go to (default: the newest kept build older than the installed)",
    )
    p.add_argument(
        "--tracker", metavar="URL", help="report the rollback to this tracker (install outcomes)"
    )
    add_fetch_flags(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("verify", parents=[common], help="check (and --repair) an install")
    p.add_argument("--dest", required=True, metavar="DIR")
    p.add_argument("--repair", action="store_true")
    p.add_argument(
        "--tracker", metavar="URL", help="report a repair to this tracker (install outcomes)"
    )
    add_fetch_flags(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("status", parents=[common], help="what is installed and kept")
    p.add_argument("--dest", required=True, metavar="DIR")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("daemon", parents=[common], help="run the client service (foreground)")
    p.add_argument(
        "--state",
        metavar="DIR",
        help="the state dir: library, queue, settings, node key (default: $P2PNODE_STATE, "
        "else the user data dir)",
    )
    p.add_argument(
        "--api",
        metavar="HOST:PORT",
        help="serve the local API and web page here: loopback HOST:PORT, unix:PATH, or off "
        "(default: 127.0.0.1 on a free port, written to STATE/api.json for the client verbs)",
    )
    p.add_argument(
        "--listen", metavar="HOST:PORT", help="serve every installed build to peers on this port"
    )
    add_dht_flags(p)  # --config (its [service] and [discovery] tables), --dht-port, --lan
    p.set_defaults(func=cmd_daemon)

    from ..service.client import add_client_verbs  # one command line for the daemon's clients

    add_client_verbs(sub, common)

    p = sub.add_parser("demo", parents=[common], help="run the local demo network")
    p.add_argument("--workdir", help="where to keep the demo's files (default: a temp dir)")
    p.add_argument(
        "--keep", action="store_true", help="keep the tracker and the daemons up until Ctrl-C"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def _emit_error(
    args: argparse.Namespace | None, message: str, fix: str, payload: dict[str, Any] | None = None
) -> None:
    print(f"p2pnode: error: {message} (fix: {fix})", file=sys.stderr)
    if args is not None and getattr(args, "json", False):
        out = {"ok": False, "error": message, "fix": fix}
        if payload:
            out.update({k: v for k, v in payload.items() if k != "ok"})
        print(json.dumps(out))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], dict[str, Any]] = args.func
    try:
        out = func(args)
    except _Failed as exc:
        _emit_error(args, exc.message, exc.fix, exc.payload)
        return 1
    except P2PNodeError as exc:
        _emit_error(args, exc.message, exc.fix)
        return exc.exit_code
    except BaseExceptionGroup as group:  # concurrent tasks failed: report the root cause
        cause = most_telling(group)
        if isinstance(cause, P2PNodeError):
            _emit_error(args, cause.message, cause.fix)
            return cause.exit_code
        if isinstance(cause, KeyboardInterrupt):
            _emit_error(args, "interrupted", "run the same command again to resume")
            return 130
        raise
    except KeyboardInterrupt:
        _emit_error(args, "interrupted", "run the same command again to resume")
        return 130
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _emit_error(args, f"{exc.strerror or exc}{where}", "check the path and permissions")
        return 1
    if args.json:
        print(json.dumps({"ok": True, **out}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
