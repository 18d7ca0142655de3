"""The command line's flags that several verbs share, and how they become options.

Each group is added by one function (``add_swarm_flags``, ``add_fetch_flags``, ...) so the
verbs that take it spell it the same way, and read back by one (``install_options``,
``discovery_flags``) so a flag means the same in every verb: ``cli`` holds the verbs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..release import keys
from ..units import parse_rate
from .policy import SourcePolicy

if TYPE_CHECKING:
    from .options import InstallOptions

__all__ = [
    "add_dht_flags",
    "add_fetch_flags",
    "add_peer_rate_flags",
    "add_swarm_flags",
    "discovery_flags",
    "install_options",
    "rate",
    "slots",
    "trusted",
]


def trusted(values: Sequence[str] | None) -> list[bytes]:
    return [keys.parse_public_key(v) for v in values or ()]


def rate(text: str | None) -> int | None:
    return parse_rate(text) if text else None


def slots(n: int) -> int:
    if not 1 <= n <= 64:
        raise UsageError("--upload-slots must be between 1 and 64")
    return n


def add_peer_rate_flags(p: argparse.ArgumentParser, *, download: bool) -> None:
    p.add_argument(
        "--max-peer-upload-rate", metavar="RATE", help="cap on serving any one peer (5M)"
    )
    if download:
        p.add_argument(
            "--max-peer-download-rate", metavar="RATE", help="cap on fetching from any one peer"
        )
    p.add_argument(
        "--upload-slots", type=int, default=8, metavar="N", help="peers served at once (8)"
    )


def discovery_flags(args: argparse.Namespace) -> dict[str, Any]:
    """--dht-port, --dht-bootstrap and --lan over the config file's defaults."""
    from .config import load_config

    config = load_config(Path(args.config) if args.config else None)
    return {
        "dht_port": args.dht_port if args.dht_port is not None else config.dht_port,
        "dht_bootstrap": [*config.dht_bootstrap, *(args.dht_bootstrap or ())],
        "lan": args.lan or config.lan,
    }


def install_options(
    args: argparse.Namespace, *, require_installed: bool = False, origin: bool = False
) -> InstallOptions:
    from .options import InstallOptions

    if args.connections < 1 or args.connections > 64:
        raise UsageError("--connections must be between 1 and 64")
    swarm: dict[str, Any] = {}
    if hasattr(args, "peer"):
        swarm = dict(
            peers=args.peer or (),
            listen=args.listen,
            policy=args.policy,
            max_upload_rate=rate(args.max_upload_rate),
            max_peer_upload_rate=rate(args.max_peer_upload_rate),
            max_peer_download_rate=rate(args.max_peer_download_rate),
            upload_slots=slots(args.upload_slots),
            **discovery_flags(args),
            tracker=args.tracker,
        )
    return InstallOptions(
        mirrors=args.mirror or (),
        connections=args.connections,
        max_download_rate=parse_rate(args.max_download_rate) if args.max_download_rate else None,
        keep_versions=args.keep_versions,
        patches=not getattr(args, "no_patches", False),
        require_installed=require_installed,
        origin=origin,
        **swarm,
    )


def add_dht_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        help="node config (TOML; default: config.toml in the user config dir, or $P2PNODE_CONFIG)",
    )
    p.add_argument(
        "--lan",
        action="store_true",
        help="find peers on the local network by multicast (and, serving, be found)",
    )
    p.add_argument(
        "--dht-port",
        type=int,
        metavar="UDP_PORT",
        help="run a DHT node on this UDP port (0: any) to find and announce peers",
    )
    p.add_argument(
        "--dht-bootstrap",
        action="append",
        metavar="HOST:PORT",
        help="a DHT node to join through (repeatable); implies a DHT node",
    )


def add_swarm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--peer", action="append", metavar="HOST:PORT", help="a peer to fetch from (repeatable)"
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="serve verified chunks here")
    p.add_argument(
        "--policy", choices=[p.value for p in SourcePolicy], default=SourcePolicy.P2P_FIRST.value
    )
    p.add_argument("--max-upload-rate", metavar="RATE", help="cap on serving peers (40M)")
    add_peer_rate_flags(p, download=True)
    add_dht_flags(p)


def add_fetch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mirror",
        action="append",
        metavar="BASE_URL",
        help="CDN root URL (repeatable); default: where the manifest came from",
    )
    p.add_argument(
        "--max-download-rate",
        metavar="RATE",
        help="cap in bytes/s with K/M/G suffix, as in aria2 (e.g. 40M); 0 = none",
    )
    p.add_argument("--connections", type=int, default=8, help="HTTP connections (default 8)")
    p.add_argument(
        "--no-patches",
        action="store_true",
        help="fetch changed chunks whole, ignoring the release's delta patches",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        default=2,
        help="earlier versions kept for offline rollback (default 2)",
    )
