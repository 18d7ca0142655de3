"""``tracker``: run the tracker service, and administer a running one.

    tracker serve --listen HOST:PORT --data DIR --admin-token TOKEN [--redis URL [--redis-mode log]]
                  [--registry URL] [--announce-listen HOST:PORT]
    tracker app add APP --key ed25519:<hex> --url URL --admin-token TOKEN [--json]
    tracker app rotate-token APP --url URL --admin-token TOKEN [--json]
    tracker app rotate-key APP --old-key OLD.pem --new-key ed25519:<hex> --old-until WHEN
                           --url URL [--token T] [--out ROTATIONS] [--json]
    tracker registry copy --data DIR --registry URL [--redis-prefix P] [--fleet-from URL] [--json]
                    (also: --from DIR|DIR/registry.db --to postgresql://...|redis://...;
                    --fleet-from redis://... without --data copies only the fleet)
    tracker rollout APP CHANNEL show|raise PERCENT|halt|resume|complete --url URL [--token T]
                    [--threshold SHARE] [--min-outcomes N] [--json]
    tracker audit --url URL [--admin-token TOKEN] [--limit N] [--before SEQ] [--json]
    tracker forecast show APP BUILD --url URL [--json]
    tracker forecast dry-run APP CHANNEL MANIFEST --url URL [--token T] [--rollout P] [--json]
    tracker fleet APP --url URL [--json]           (tracker/cli_fleet.py)
    tracker fleet node NODE_ID --url URL [--json]
    tracker outcomes [APP] --url URL [--json]

Errors print one line on stderr (what went wrong, then the fix) and exit non-zero; ``--json``
prints machine-readable output on stdout. The admin token may also come from the environment
(``TRACKER_ADMIN_TOKEN``), which keeps it out of ``ps`` output.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.errors import P2PNodeError, TrackerError, UsageError
from p2pnode.release import keys

from . import cli_fleet, cli_load
from .app import TrackerConfig
from .config import is_postgres_url
from .errors import Unavailable
from .rollout import ACTIONS
from .server import serve_tracker
from .stores import open_tracker

__all__ = ["main"]


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT", fix="e.g. --listen 0.0.0.0:7070")
    return host.strip("[]") or "0.0.0.0", int(port)


def _dht_nodes(texts: Sequence[str]) -> list[str]:
    """Validated ``--dht-bootstrap`` values, normalised to HOST:PORT."""
    from p2pnode.discovery.dht.node import parse_hostport

    out = []
    for text in texts:
        host, port = parse_hostport(text)
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


def _admin_token(args: argparse.Namespace) -> str:
    token = args.admin_token or os.environ.get("TRACKER_ADMIN_TOKEN", "")
    if len(token) < 16:
        raise UsageError(
            "the admin token is missing or shorter than 16 characters",
            fix="pass --admin-token (or TRACKER_ADMIN_TOKEN) with a long random value",
        )
    return token


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tracker", description="p2pnode tracker")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the tracker")
    s.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT (default %(default)s)")
    s.add_argument("--data", required=True, type=Path, help="directory for the SQLite files")
    s.add_argument("--admin-token", help="admin token (or env TRACKER_ADMIN_TOKEN)")
    s.add_argument("--redis", help="redis://HOST:PORT/DB to share swarm state between replicas")
    s.add_argument(
        "--announce-listen",
        help="HOST:PORT for the fast announce listener (POST /v1/announce only; default: off)",
    )
    s.add_argument(
        "--registry",
        help="postgresql://USER@HOST:PORT/DB (recommended) or redis://HOST:PORT/DB to keep the "
        "registry (apps, manifests, channels) and the operations data (outcomes, rollouts, "
        "audit log) there, shared by replicas on separate hosts (default: SQLite in --data)",
    )
    s.add_argument(
        "--redis-prefix", default="trk:", help="key prefix in redis (swarm state and registry)"
    )
    s.add_argument(
        "--redis-mode",
        choices=("script", "log"),
        default="script",
        help="script: swarm state in redis, one Lua script per announce (default); log: state "
        "in each replica's memory, changes ordered by a redis stream (docs/operations.md)",
    )
    s.add_argument("--interval", type=int, default=60, help="announce interval, seconds")
    s.add_argument(
        "--client-rate", type=float, default=50.0, help="requests/s per client address (0: off)"
    )
    s.add_argument("--client-burst", type=float, default=200.0)
    s.add_argument(
        "--dht-bootstrap",
        action="append",
        metavar="HOST:PORT",
        help="a DHT node to hand to nodes joining the DHT (repeatable)",
    )
    s.add_argument("--json", action="store_true", help="print the bound address as JSON")
    a = sub.add_parser("app", help="manage apps on a running tracker")
    asub = a.add_subparsers(dest="app_command", required=True)
    add = asub.add_parser("add", help="register an app and its publisher key")
    add.add_argument("app")
    add.add_argument("--key", required=True, help="publisher key, ed25519:<hex>")
    add.add_argument("--url", required=True, help="tracker URL, e.g. http://127.0.0.1:7070")
    add.add_argument("--admin-token", help="admin token (or env TRACKER_ADMIN_TOKEN)")
    add.add_argument("--json", action="store_true")
    rot = asub.add_parser("rotate-token", help="give an app a new publisher token")
    rot.add_argument("app")
    rot.add_argument("--url", required=True, help="tracker URL, e.g. http://127.0.0.1:7070")
    rot.add_argument("--admin-token", help="admin token (or env TRACKER_ADMIN_TOKEN)")
    rot.add_argument("--json", action="store_true")
    rk = asub.add_parser(
        "rotate-key",
        help="move an app to a new signing key: the old key signs the rotation, its builds "
        "stay installable until --old-until",
    )
    rk.add_argument("app")
    rk.add_argument("--old-key", required=True, type=Path, help="the old key's PEM file")
    rk.add_argument("--new-key", required=True, help="the new public key, ed25519:<hex>")
    rk.add_argument(
        "--old-until",
        required=True,
        help="when builds signed by the old key stop being accepted: YYYY-MM-DD[THH:MM[:SS]] "
        "(UTC), or Unix seconds",
    )
    rk.add_argument("--url", required=True, help="tracker URL, e.g. http://127.0.0.1:7070")
    rk.add_argument("--token", help="publisher or admin token (or env TRACKER_ADMIN_TOKEN)")
    rk.add_argument(
        "--out", type=Path, help="also write the app's rotations here, to put beside releases"
    )
    rk.add_argument("--json", action="store_true")
    r = sub.add_parser("registry", help="move the registry")
    rsub = r.add_subparsers(dest="registry_command", required=True)
    cp = rsub.add_parser(
        "copy",
        help="copy DIR/registry.db and DIR/ops.db (SQLite) into an empty registry in "
        "PostgreSQL or redis (and DIR/traffic.db into PostgreSQL)",
    )
    cp.add_argument(
        "--data",
        "--from",
        dest="data",
        type=Path,
        help="the tracker's --data directory (or its registry.db); may be left out with "
        "--fleet-from, to copy only the fleet",
    )
    cp.add_argument(
        "--registry",
        "--to",
        dest="registry",
        required=True,
        help="postgresql://USER@HOST:PORT/DB or redis://HOST:PORT/DB",
    )
    cp.add_argument("--redis-prefix", default="trk:", help="key prefix in redis")
    cp.add_argument(
        "--fleet-from",
        metavar="URL",
        help="redis://HOST:PORT/DB: also copy the fleet view the trackers kept in their --redis "
        "(into PostgreSQL only, under --redis-prefix)",
    )
    cp.add_argument("--json", action="store_true")
    ro = sub.add_parser("rollout", help="show or change a channel's staged rollout")
    ro.add_argument("app")
    ro.add_argument("channel")
    ro.add_argument("action", choices=("show", *ACTIONS))
    ro.add_argument("percent", nargs="?", type=float, help="for raise: the new percentage")
    ro.add_argument("--url", required=True, help="tracker URL, e.g. http://127.0.0.1:7070")
    ro.add_argument("--token", help="publisher or admin token (or env TRACKER_ADMIN_TOKEN)")
    ro.add_argument("--threshold", type=float, help="failure share that halts it, e.g. 0.05")
    ro.add_argument("--min-outcomes", type=int, help="nodes with outcomes needed to halt")
    ro.add_argument("--json", action="store_true")
    au = sub.add_parser("audit", help="read the audit log, newest first")
    au.add_argument("--url", required=True, help="tracker URL, e.g. http://127.0.0.1:7070")
    au.add_argument("--admin-token", help="admin token (or env TRACKER_ADMIN_TOKEN)")
    au.add_argument("--limit", type=int, default=50)
    au.add_argument("--before", type=int, help="only entries older than this seq")
    au.add_argument("--json", action="store_true")
    cli_load.add_parser(sub)
    cli_fleet.add_parser(sub)
    return p


def _registry_copy(args: argparse.Namespace) -> dict[str, Any]:
    if args.fleet_from and not is_postgres_url(args.registry):
        raise UsageError(
            "--fleet-from copies into PostgreSQL only", fix="give --registry postgresql://..."
        )
    counts: dict[str, Any] = {}
    if args.data is not None:
        counts |= _copy_sqlite(args)
    elif not args.fleet_from:
        raise UsageError("nothing to copy", fix="give --data DIR (and/or --fleet-from URL)")
    if args.fleet_from:
        from .fleet_pg import PGFleet
        from .fleet_redis import RedisFleet
        from .pg import PGDatabase

        src, db = RedisFleet(args.fleet_from, prefix=args.redis_prefix), PGDatabase(args.registry)
        try:
            counts |= PGFleet(db).copy_from_redis(src)
        finally:
            src.close()
            db.close()
    return counts


def _copy_sqlite(args: argparse.Namespace) -> dict[str, Any]:
    data: Path = args.data
    path = data if data.is_file() else data / "registry.db"
    if not path.is_file():
        raise UsageError(f"{path} does not exist", fix="pass the --data DIR the tracker used")
    ops = path.with_name("ops.db")  # outcomes, rollouts, audit log (absent before they were)
    traffic = path.with_name("traffic.db")  # bytes per minute, forecasts (PostgreSQL only)
    if is_postgres_url(args.registry):
        from .pg import PGDatabase
        from .registry_pg import PGRegistry

        pg = PGRegistry(PGDatabase(args.registry))
        try:
            return pg.copy_from_sqlite(
                path, ops if ops.is_file() else None, traffic if traffic.is_file() else None
            )
        finally:
            pg.close()
    from .registry_redis import RedisRegistry

    reg = RedisRegistry(args.registry, prefix=args.redis_prefix)
    try:
        counts = reg.copy_from_sqlite(path)
        if ops.is_file():
            from .ops_redis import RedisOps

            counts |= RedisOps(reg).copy_from_sqlite(ops)
        return counts
    finally:
        reg.close()


async def _serve(args: argparse.Namespace) -> None:
    host, port = _hostport(args.listen)
    if args.interval < 5:
        raise UsageError("--interval must be at least 5 seconds")
    config = TrackerConfig(
        admin_token=_admin_token(args),
        interval=args.interval,
        client_rate=args.client_rate,
        client_burst=args.client_burst,
        dht_bootstrap=tuple(_dht_nodes(args.dht_bootstrap or ())),
    )
    if args.redis_mode != "script" and not args.redis:
        raise UsageError("--redis-mode needs --redis", fix="add --redis redis://HOST:PORT/DB")
    tracker = open_tracker(
        config,
        args.data,
        args.redis,
        args.redis_prefix,
        args.redis_mode,
        registry_url=args.registry,
    )
    if args.registry:
        try:
            await trio.to_thread.run_sync(tracker.registry.data_version)
        except P2PNodeError as exc:  # RegistryUnavailable: names the server and the cause
            raise UsageError(
                f"cannot reach the registry: {exc.message}",
                fix="start its server (PostgreSQL or redis-server) or fix --registry",
            ) from exc
    if args.redis:
        try:
            await tracker.swarm.check()
        except Unavailable as exc:
            raise UsageError(
                f"cannot reach redis at {args.redis}: {exc.message}",
                fix="start redis-server or fix --redis",
            ) from exc
    announce_port = None
    if args.announce_listen:
        fast_host, announce_port = _hostport(args.announce_listen)
        if fast_host != host:
            raise UsageError(
                "--announce-listen must use the same host as --listen",
                fix=f"e.g. --announce-listen {args.listen.rpartition(':')[0]}:{port + 1}",
            )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            functools.partial(
                serve_tracker, tracker, host, port, shutdown=stop, announce_port=announce_port
            )
        )

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for _ in received:
                    stop.set()
                    return

        nursery.start_soon(signals)
        url = f"http://{bound[0]}:{bound[1]}"
        info = {"url": url, "dashboard": url + "/dashboard"}
        if tracker.fast_port:
            info["announce_url"] = f"http://{bound[0]}:{tracker.fast_port}/v1/announce"
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            fast = f", fast announces on port {tracker.fast_port}" if tracker.fast_port else ""
            print(f"tracker listening on {url} (dashboard {url}/dashboard{fast})", flush=True)
        await stop.wait()
        nursery.cancel_scope.cancel()


async def _app_add(args: argparse.Namespace) -> dict[str, Any]:
    if args.app_command == "rotate-key":
        return await _rotate_key(args)
    async with TrackerClient(args.url, token=_admin_token(args)) as client:
        if args.app_command == "rotate-token":
            return {"app": args.app, "publisher_token": await client.rotate_token(args.app)}
        return await client.add_app(args.app, keys.parse_public_key(args.key))


def _when(text: str) -> int:
    """Unix seconds from ``1767225600`` or ``2026-01-01[T12:00[:00]]`` (UTC)."""
    import datetime as dt

    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.removesuffix("Z"))
    except ValueError as exc:
        raise UsageError(
            f"{text!r} is not a date", fix="write YYYY-MM-DD[THH:MM[:SS]] (UTC) or Unix seconds"
        ) from exc
    return int(when.replace(tzinfo=when.tzinfo or dt.UTC).timestamp())


async def _rotate_key(args: argparse.Namespace) -> dict[str, Any]:
    """Sign the rotation here, with the old key (the tracker never holds a signing key)."""
    from p2pnode.release import rotation as R

    old = keys.load_private_key(args.old_key)
    statement = R.Rotation(
        args.app,
        keys.public_key_bytes(old),
        keys.parse_public_key(args.new_key),
        _when(args.old_until),
        int(time.time()),
    )
    try:
        signed = R.sign_rotation(statement, old)
    except P2PNodeError as exc:
        raise UsageError(f"cannot sign this rotation: {exc.message}") from exc
    token = args.token or os.environ.get("TRACKER_ADMIN_TOKEN")
    async with TrackerClient(args.url, token=token) as client:
        answer = await client.rotate_key(args.app, signed.encode())
        if args.out is not None:
            args.out.write_bytes(await client.rotations(args.app))
            answer["out"] = str(args.out)
    return answer


async def _rollout(args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "raise" and args.percent is None:
        raise UsageError(
            "raise needs the new percentage", fix="e.g. `tracker rollout A CH raise 50`"
        )
    token = args.token or os.environ.get("TRACKER_ADMIN_TOKEN")
    async with TrackerClient(args.url, token=token) as client:
        if args.action == "show":
            path = f"/v1/apps/{args.app}/channels/{args.channel}/rollout"
            return dict((await client._request("GET", path)).json())
        fields: dict[str, float | int] = {}
        for name, value in (
            ("percent", args.percent),
            ("threshold", args.threshold),
            ("min_outcomes", args.min_outcomes),
        ):
            if value is not None:
                fields[name] = value
        return await client.change_rollout(args.app, args.channel, args.action, **fields)


async def _audit(args: argparse.Namespace) -> dict[str, Any]:
    params = {"limit": args.limit} | ({} if args.before is None else {"before": args.before})
    async with TrackerClient(args.url, token=_admin_token(args)) as client:
        resp = await client._request("GET", "/v1/audit", params=params, auth=True)
        return dict(resp.json())


def _print_rollout(r: dict[str, Any]) -> None:
    rate = r.get("failure_rate")
    failed = "no node reported yet" if rate is None else f"{100 * rate:.1f}% of nodes failed"
    print(
        f"{r['app']}/{r['channel']} build {r['build']}: {r['state']} at {r['percent']:g}% "
        f"({r['success']} nodes ok, {r['failure']} failed: {failed}; halts at "
        f"{100 * r['threshold']:g}% of at least {r['min_outcomes']} nodes)"
        + (f" - {r['reason']}" if r.get("reason") else "")
    )


def _print_audit(page: dict[str, Any]) -> None:
    for e in page["entries"]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        who = f"{e['actor']} ({e['token_id'] or 'no token'}) from {e['address'] or '-'}"
        print(f"{e['seq']:>6} {at}Z {e['action']:<16} {e['target']:<24} {who}")
    if page.get("next_before"):
        print(f"older: --before {page['next_before']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            trio.run(_serve, args)
            return 0
        if args.command == "registry":
            counts = _registry_copy(args)
            if args.json:
                print(json.dumps(counts))
            else:
                print("copied " + ", ".join(f"{n} {what}" for what, n in counts.items()))
            return 0
        if args.command == "forecast":
            out = trio.run(cli_load.forecast_verb, args)
            if args.json:
                print(json.dumps(out))
            else:
                cli_load.print_forecast(out)
            return 0
        if args.command in ("fleet", "outcomes"):
            out = trio.run(cli_fleet.run, args)
            if args.json:
                print(json.dumps(out))
            elif args.command == "outcomes":
                cli_fleet.print_outcomes(out)
            elif "node_id" in out:
                cli_fleet.print_node(out)
            else:
                cli_fleet.print_fleet(out)
            return 0
        if args.command in ("rollout", "audit"):
            out = trio.run(_rollout if args.command == "rollout" else _audit, args)
            if args.json:
                print(json.dumps(out))
            elif args.command == "rollout":
                _print_rollout(out)
            else:
                _print_audit(out)
            return 0
        result = trio.run(_app_add, args)
    except P2PNodeError as exc:
        print(f"tracker: {_unreachable(exc, args)}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result))
    elif args.app_command == "rotate-key":
        until = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(result["old_until"]))
        print(f"{result['app']} is now signed by {result['key']}; builds signed by "
              f"{result['old']} are accepted until {until}")  # fmt: skip
        if "out" in result:
            print(f"rotations written to {result['out']}: put it beside the releases")
    elif args.app_command == "rotate-token":
        print(f"new publisher token of {result['app']} (shown once; the old one no longer works):")
        print(result["publisher_token"])
    else:
        print(f"registered {result['app']} with key {result['key']}")
        print(f"publisher token (shown once): {result['publisher_token']}")
    return 0


def _unreachable(exc: P2PNodeError, args: argparse.Namespace) -> P2PNodeError:
    """A tracker the verb could not reach, told with this CLI's fix (``--url``; the client's
    own says ``--tracker``, the node's option); any other error as it is."""
    cause = exc.__cause__
    if not isinstance(exc, TrackerError) or not isinstance(cause, httpx.HTTPError):
        return exc  # (a refusal or a 5xx came with an answer, and its own fix)
    url = getattr(args, "url", None) or "the --url given"
    return TrackerError(
        f"cannot reach the tracker at {url} ({type(cause).__name__}: {cause})",
        fix="start it (`tracker serve`) or fix --url",
    )
