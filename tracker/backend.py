"""What the app needs of its stores: one swarm-store interface, one registry interface.

Theory of operation
-------------------
The app (:mod:`tracker.app`) holds one :class:`SwarmStore` and one :class:`RegistryStore` and
never asks which kind it has; :func:`tracker.stores.open_tracker` picks them from the command line.

Swarm stores (state that changes on every announce and may be lost):

* :class:`tracker.swarm_sqlite.SQLiteSwarm`: one process; memory, written behind to a file.
* :class:`tracker.swarm_redis.RedisSwarm`: replicas share a redis-server; a Lua script per
  announce, sent in pipelined group commits from a worker thread.
* :class:`tracker.swarm_log.LogSwarm`: replicas keep the state in memory and apply the same
  changes in the order of a Redis stream.

Their interface is async because what a call waits on differs (nothing, a worker thread, the
log coming back), and only the store knows. A verified announce or report reaches the store as
one value (:class:`AnnounceCommit`, :class:`ReportCommit`) carrying everything its apply needs,
including the tracker's clock reading, so that replicas applying the same value agree.

Operations stores (install outcomes, staged rollouts, the audit log: durable, shared by the
replicas, kept where the registry is): :class:`tracker.ops_sqlite.SQLiteOps` (``DIR/ops.db``,
a file of its own so that outcomes do not move the registry's ``data_version``, which wakes
every long-poll), :class:`tracker.ops_pg.PGOps` (the registry's PostgreSQL) and
:class:`tracker.ops_redis.RedisOps` (the registry's Redis). Synchronous, with ``blocking`` as
the registry's.

Registry stores (apps, manifests, channels: small and precious) keep a synchronous interface:
:class:`tracker.registry_sqlite.SQLiteRegistry` (SQLite in DIR), and for replicas on separate
hosts :class:`tracker.registry_pg.PGRegistry` (PostgreSQL) and
:class:`tracker.registry_redis.RedisRegistry`. Their ``blocking``
attribute says whether a call may wait on the network, so the app runs it in a worker thread;
``get_app`` and ``manifest_info`` always run inline (the remote ones serve them from a cache
and bound a miss by a short timeout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from p2pnode.discovery.tracker_api import ChannelHead

from .core import Announce, Report
from .outcomes import Outcome
from .quality import PeerQuality
from .rollout import NodeWas, Rollout

__all__ = [
    "AnnounceAnswer",
    "AnnounceCommit",
    "AppRow",
    "AuditEntry",
    "OpsStore",
    "Publication",
    "RegistryStore",
    "ReportCommit",
    "SwarmStore",
]


@dataclass(frozen=True, slots=True)
class AnnounceCommit:
    """A verified announce as a swarm store applies it.

    ``ip`` is the address peers should dial (``core.plausible_ip``), ``record`` the verified
    DHT peer records it carries as one bundle, ``ttl`` how long the member lives without
    re-announcing, and ``digest`` the replay guard's key, remembered for ``window`` seconds.
    """

    announce: Announce
    ip: str
    record: bytes | None
    now: float
    ttl: float
    digest: bytes
    window: float


@dataclass(frozen=True, slots=True)
class ReportCommit:
    """A verified peer-quality report as a swarm store applies it (replay guard as above)."""

    report: Report
    now: float
    digest: bytes
    window: float


@dataclass
class AnnounceAnswer:
    """What the announce answer needs: ranked peers (JSON fragments) and the swarm's counts."""

    peers: list[bytes]
    seeders: int
    leechers: int


class SwarmStore(Protocol):
    """Shared swarm state: members, counters, peer quality and the replay guard."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's background duties (write-behind, following a log), until cancelled;
        ``task_status.started()`` once it may serve requests."""
        ...

    async def announce(self, c: AnnounceCommit) -> AnnounceAnswer | None:
        """Apply the announce; return the answer (peers ranked as ``quality.rank_peers``
        specifies and serialised, and the swarm's seeder and leecher counts); ``None`` if
        ``c.digest`` was already seen (a replay) and nothing changed."""
        ...

    async def report(self, c: ReportCommit) -> bool:
        """Fold a report into peer quality; False if it is a replay (nothing changed)."""
        ...

    async def quality(self, node_id: bytes) -> PeerQuality: ...

    async def clear_peer(self, node_id: bytes) -> bool:
        """Forget what reports said of a peer (an operator's decision); whether it had any."""
        ...

    async def gc(self, now: float) -> int:
        """Drop expired state; how many members went (0 where that is decided elsewhere)."""
        ...

    async def stats(self, now: float) -> dict[str, Any]:
        """Per-release counters and the quality summary, as ``/v1/stats`` shows them."""
        ...

    async def check(self) -> None:
        """Raise :class:`tracker.errors.Unavailable` unless the store works (``/healthz``, and
        the CLI before it serves)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Publication:
    """A verified manifest to store and make the head of ``channel`` (a publish): its id and
    signed bytes, what the registry keeps of it, when, and who (``admin`` or ``publisher``)."""

    app: str
    channel: str
    manifest_id: bytes
    build: int
    version: str
    size: int
    signed: bytes
    now: float
    actor: str


@dataclass(frozen=True, slots=True)
class AppRow:
    name: str
    key: bytes
    token_hash: bytes
    created: float


class RegistryStore(Protocol):
    """Apps, manifests and channels. Methods are synchronous; see the module docstring for
    ``blocking``. Failures to reach a remote store raise
    :class:`tracker.errors.RegistryUnavailable`."""

    #: Calls may wait on the network: the app runs them in a worker thread.
    blocking: bool

    def close(self) -> None: ...

    def data_version(self) -> int:
        """A number that changes when another replica changed the registry."""
        ...

    def add_app(self, name: str, key: bytes, token_hash: bytes, now: float) -> AppRow: ...

    def get_app(self, name: str) -> AppRow | None: ...

    def rotate_token(self, name: str, token_hash: bytes) -> AppRow | None:
        """Replace the app's publisher token hash (the old token stops working); ``None`` if
        the app is not registered."""
        ...

    def add_rotation(self, name: str, old: bytes, signed: bytes, now: float) -> bool:
        """Keep the app's publisher key rotation ``signed`` (release/rotation.py, checked by
        the caller) by key ``old``; False, and nothing kept, if ``old`` already has one."""
        ...

    def rotations(self, name: str) -> list[bytes]:
        """The app's kept key rotations, oldest first."""
        ...

    def list_apps(self) -> list[AppRow]: ...

    def get_manifest(self, manifest_id: bytes) -> bytes | None: ...

    def manifest_info(self, manifest_id: bytes) -> tuple[str, int, str, int] | None:
        """(app, build, version, size) of a stored manifest."""
        ...

    def head(self, app: str, channel: str) -> ChannelHead | None: ...

    def channels(self, app: str) -> list[ChannelHead]: ...

    def publish(self, p: Publication) -> int:
        """Store a verified manifest and make it the channel's head; returns the event seq.

        Raises:
            Conflict: the build is not newer than every build ever published to the channel
                (so a rolled-back build number can never come back with other contents).
        """
        ...

    def move(
        self, *, app: str, channel: str, manifest_id: bytes, action: str, now: float, actor: str
    ) -> int:
        """Point a channel at an already stored manifest of the app (promote or rollback)."""
        ...

    def history(self, app: str, channel: str, limit: int = 100) -> list[dict[str, Any]]: ...

    def previous_head(self, app: str, channel: str) -> bytes | None:
        """The manifest the channel pointed at before its current head (for rollback)."""
        ...

    def releases(self) -> dict[bytes, tuple[str, int, str]]:
        """manifest id -> (app, build, version), for labelling stats."""
        ...


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit log: a change, or a refused authentication.

    ``token_id`` names the token that acted (``admin``, ``publisher:<app>:<8 hex of its
    hash>``, or for a refused one the hash prefix of what was presented), never the token;
    ``address`` is the client's; ``target`` what was acted on (``app/channel``, a node id).
    """

    at: float
    action: str
    actor: str
    token_id: str
    address: str
    target: str
    detail: dict[str, Any]


class OpsStore(Protocol):
    """Install outcomes, rollouts and the audit log (see the module docstring)."""

    blocking: bool

    def close(self) -> None: ...

    def add_outcome(self, o: Outcome, digest: bytes, now: float, window: float) -> bool:
        """Add ``o`` to its build's tally (``outcomes.counts_of``); False, and nothing
        counted, if ``digest`` was seen within ``window`` seconds (a replay)."""
        ...

    def outcome_stats(self, app: str | None) -> list[dict[str, Any]]:
        """Per build, newest report first: ``outcomes.summary`` of its counters."""
        ...

    def outcome_series(
        self, app: str | None, since: int
    ) -> dict[bytes, list[tuple[int, str, int]]]:
        """Per build (of ``app``, or all): its hourly series rows ``(hour, name, n)`` from
        hour ``since`` on (``outcomes.series_counts``; hours older than
        ``outcomes.SERIES_HOURS`` are dropped as outcomes arrive)."""
        ...

    def rollout(self, app: str, channel: str) -> Rollout | None: ...

    def rollout_node(self, key: str, app: str, channel: str, node: bytes, failed: bool) -> NodeWas:
        """Note ``node``'s latest outcome (``failed`` or not) in the rollout node set ``key``
        (``rollout.nodes_key``, of ``app``/``channel``) and say what it was before, atomically
        across replicas; ``full`` (nothing noted) when the set holds ``rollout.MAX_NODES``."""
        ...

    def drop_rollout_nodes(self, app: str, channel: str, keep: str | None) -> None:
        """Forget the channel's rollout node sets but ``keep`` (a rollout ended, resumed or
        was replaced)."""
        ...

    def rollouts(self) -> list[Rollout]: ...

    def put_rollout(self, r: Rollout) -> None:
        """Store ``r`` as the channel's rollout (replacing any earlier one)."""
        ...

    def update_rollout(
        self, app: str, channel: str, fn: Callable[[Rollout], Rollout]
    ) -> tuple[Rollout, Rollout] | None:
        """Replace the channel's rollout by ``fn`` of it, atomically across replicas;
        (before, after), or ``None`` if the channel has none. ``fn`` may raise to change
        nothing."""
        ...

    def audit(self, e: AuditEntry) -> int:
        """Append ``e`` to the audit log; its sequence number."""
        ...

    def audit_page(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        """Entries newest first, with ``seq`` below ``before`` (all when ``None``)."""
        ...
