"""The knobs of one install: where chunks may come from, how fast, and who to tell.

``cli`` builds these from flags (and ``config`` from the TOML file), ``watch`` reuses one for
every build it follows; the install, its swarm node and its CDN fetches read them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..discovery.race import Discovery, DiscoveryOptions
from ..ratelimit import RateLimiter
from .policy import SourcePolicy

if TYPE_CHECKING:
    from ..swarm.node import SwarmNode
    from .result import InstallResult

__all__ = ["InstallOptions", "SourcePolicy"]


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
    policy: SourcePolicy = SourcePolicy.P2P_FIRST  # a CLI string is accepted and converted
    limiter: RateLimiter | None = None  # the download cap, shared (made from the rate)
    identity_dir: Path | None = None  # where the node key lives (default: user data dir)
    dht_port: int | None = None  # run a DHT node on this UDP port (0: any); None: no DHT
    dht_bootstrap: Sequence[str] = ()  # HOST:PORT of DHT nodes to join through
    lan: bool = False  # find (and, serving, be found by) peers on the LAN by multicast
    lan_port: int | None = None  # the LAN discovery group's port (None: the default)
    tracker: str | None = None  # tracker URL: announce there (port 0 unless serving), take peers
    # The app's key chain as the tracker's feed named it (ChannelHead.key_chain): when it is
    # not the one the install read last, its rotations are fetched even for a known key, so
    # a retired key's build is refused after its date (node/rotations.py).
    key_chain: str | None = None
    discovery_wait: float = 5.0  # wait at most this long for discovery's first answer
    discovery_requery: float = 30.0  # ask discovery for more peers this often while fetching
    # The client service's hooks (None for the standalone verbs): one upload cap shared by
    # every job and the daemon's serving node; the install's running figures as soon as they
    # exist (live bytes by source); and a wait before the switch (a game is running).
    upload_limiter: RateLimiter | None = None
    watch_result: Callable[[InstallResult], None] | None = None
    before_switch: Callable[[], Awaitable[None]] | None = None
    patches: bool = True  # use the manifest's delta patches where they beat chunks
    # The daemon's one node: the install fetches through it (its identity, its connections)
    # instead of opening its own, and serves what it stages from it as each chunk lands; and
    # where that node listens (HOST, PORT; None: it does not), which discovery announces.
    node: SwarmNode | None = None
    served_at: tuple[str, int] | None = None
    # The daemon's one discovery: the install looks peers up through its DHT node and LAN
    # (raced with ``tracker``) instead of starting its own; None: ``dht_port``/``lan`` decide.
    shared_discovery: Discovery | None = None

    def discovery(self) -> DiscoveryOptions:
        return DiscoveryOptions(
            dht_port=self.dht_port,
            dht_bootstrap=self.dht_bootstrap,
            lan=self.lan,
            lan_port=self.lan_port,
            tracker=self.tracker,
            identity_dir=self.identity_dir,
            first_wait=self.discovery_wait,
            requery=self.discovery_requery,
            shared=self.shared_discovery,
        )

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = RateLimiter(self.max_download_rate)
        self.policy = SourcePolicy.parse(self.policy)
