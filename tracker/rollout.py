"""Staged rollouts: which build each node of a channel is offered, and when a rollout halts.

Theory of operation
-------------------
A publish may be staged (``publish --rollout PERCENT``): the channel's head becomes the new
build, but only the nodes *in* the rollout are offered it; every other node is offered the
build the channel pointed at before (``previous``). A node is in when a stable hash of the
build's manifest id and its node id falls below the percentage (:func:`member`): the hash
never changes, so raising the percentage only adds nodes, and a node's answer never flips
back and forth. Hashing the build too means a new build is tried first by other nodes, not
always by the same unlucky ones.

Nodes name themselves in the feed request (``?node=ID``, the id their announces and outcomes
are signed with; a node that lies only picks its own build) and may say which build they
run (``?have=MANIFEST``): a node already on the rollout's build keeps it, even after a halt
(halting stops the spread; taking a build back is a rollback, the operator's call).

The automatic halt counts **nodes, not attempts** (:func:`with_outcome`): a node that
retries a broken install reports every attempt, and one broken machine must not halt a
rollout for everyone. The stores keep, per rollout, which nodes reported on its build and
whether each one's *latest* outcome failed (:data:`MAX_NODES` node ids at most; the node set is
keyed by :func:`nodes_key`); ``success`` and ``failure`` are the nodes whose latest outcome
succeeded or failed. A node that failed and then succeeded counts as a success (it recovered;
the retries are in the outcome tally and its failure codes), one that succeeded and then failed
counts as a failure. When at least ``min_outcomes`` nodes have reported and the failed share
reaches ``threshold``, the rollout halts by itself and no further node is offered the build.
``resume`` (the operator's call) starts the count afresh, with an empty node set (``epoch``
moves on). ``complete`` offers the build to every node.

Everything here is pure: the stores keep :class:`Rollout` values (:meth:`Rollout.to_json`)
and apply these functions inside their transactions.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = [
    "ACTIONS",
    "DEFAULT_MIN_OUTCOMES",
    "DEFAULT_THRESHOLD",
    "MAX_NODES",
    "STATES",
    "NodeWas",
    "Rollout",
    "RolloutError",
    "change",
    "member",
    "nodes_key",
    "offered",
    "superseded",
    "with_outcome",
]

#: Share of failed outcomes (0..1) at which a rollout halts itself, unless the channel says.
DEFAULT_THRESHOLD = 0.05
#: Outcomes needed before the failure share may halt a rollout (a few early failures are noise).
DEFAULT_MIN_OUTCOMES = 20
#: Nodes a rollout's node set keeps at most (a later new node's outcomes are not counted
#: towards the halt; the share of the first million is a fair sample of the rest).
MAX_NODES = 1_000_000
#: What a store says of a node's earlier outcome for a rollout (``rollout_node``): none yet,
#: its latest succeeded or failed, or the node set is full (the node is not counted).
NodeWas = Literal["new", "ok", "failed", "full"]
#: Resolution of the percentage: 1/100 of a percent.
BUCKETS = 10_000
#: ``ended``: another build became the channel's head (a publish, promote or rollback).
STATES = ("active", "halted", "complete", "ended")
#: What an operator may do to a rollout (``POST .../rollout``).
ACTIONS = ("raise", "halt", "resume", "complete")


class RolloutError(ValueError):
    """An operator's change that does not apply to the rollout as it is (HTTP 409); ``fix``
    says what the operator can do instead (the generic 409 fix is about build numbers)."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True, slots=True)
class Rollout:
    """A staged rollout of ``manifest`` on one channel; ``previous``: what the others get."""

    app: str
    channel: str
    manifest: bytes
    build: int
    previous: bytes
    percent: float
    state: str = "active"
    threshold: float = DEFAULT_THRESHOLD
    min_outcomes: int = DEFAULT_MIN_OUTCOMES
    #: nodes whose latest outcome of the build since the rollout started (or last resumed)
    #: succeeded / failed
    success: int = 0
    failure: int = 0
    started: float = 0.0
    changed: float = 0.0
    #: why it halted (``auto: ...`` or ``operator``); empty otherwise
    reason: str = ""
    #: resumes so far: each starts a new node set (:func:`nodes_key`)
    epoch: int = 0

    @property
    def failure_rate(self) -> float | None:
        total = self.success + self.failure
        return self.failure / total if total else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["manifest"] = self.manifest.hex()
        d["previous"] = self.previous.hex()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rollout:
        return cls(
            **{
                **d,
                "manifest": bytes.fromhex(d["manifest"]),
                "previous": bytes.fromhex(d["previous"]),
            }
        )

    def view(self) -> dict[str, Any]:
        """What the API shows: the stored fields, ids in hex, and the failure rate."""
        return {**self.to_json(), "failure_rate": self.failure_rate}


def bucket(manifest: bytes, node_id: bytes) -> int:
    """The node's place in ``[0, BUCKETS)`` for this build: fixed for the pair."""
    h = hashlib.blake2b(manifest + node_id, digest_size=8, person=b"p2pnode-rollout").digest()
    return int.from_bytes(h, "big") % BUCKETS


def member(manifest: bytes, node_id: bytes, percent: float) -> bool:
    """Whether the node is in a rollout of ``manifest`` at ``percent``: monotonic in
    ``percent`` (a node in at 10% is in at every higher percentage)."""
    return bucket(manifest, node_id) < round(percent * BUCKETS / 100)


def offered(r: Rollout | None, node_id: bytes | None, have: bytes | None) -> bytes | None:
    """The build ``node_id`` is offered while ``r`` stands; ``None``: the channel's head.

    A node that did not name itself is out (offered ``previous``) while the rollout is not
    complete: an old client must not take a staged build it cannot be counted in.
    """
    if r is None or r.state in ("complete", "ended"):
        return None
    if have == r.manifest:
        return r.manifest  # it runs the build already: halting does not take it back
    if r.state == "active" and node_id is not None and member(r.manifest, node_id, r.percent):
        return r.manifest
    return r.previous


def nodes_key(r: Rollout) -> str:
    """The name of the rollout's node set in the stores: one per build and resume, so a
    resumed rollout counts afresh and an old set is never mixed into a new one."""
    return f"{r.app}/{r.channel}/{r.manifest.hex()}/{r.epoch}"


def with_outcome(
    r: Rollout, failed: bool, now: float, was: NodeWas = "new", epoch: int | None = None
) -> Rollout:
    """``r`` after a node's outcome of its build, given what the node's latest outcome was
    before (``was``, from the store's node set of epoch ``epoch``); halted when the failed
    nodes reach the threshold over at least ``min_outcomes`` nodes (only an active rollout
    counts, and only for the node set it is on)."""
    if r.state != "active" or was == "full" or (epoch is not None and epoch != r.epoch):
        return r
    s = r.success + (not failed) - (was == "ok")
    f = r.failure + failed - (was == "failed")
    r = replace(r, success=s, failure=f)
    if s + f >= r.min_outcomes and f >= r.threshold * (s + f):
        share = 100 * f / (s + f)
        reason = f"auto: {f} of {s + f} nodes failed ({share:.1f}% >= {100 * r.threshold:g}%)"
        r = replace(r, state="halted", changed=now, reason=reason)
    return r


def change(r: Rollout, action: str, now: float, percent: float | None = None) -> Rollout:
    """An operator's change: ``raise`` (to ``percent``, never lower), ``halt``, ``resume``
    (counting outcomes afresh), ``complete`` (every node).

    Raises:
        RolloutError: the change does not apply (a completed rollout, a lower percentage...).
    """
    if r.state in ("complete", "ended"):
        raise RolloutError(
            f"the rollout is {r.state} already",
            fix="to stage another build, publish it with --rollout PERCENT",
        )
    if action == "raise":
        if percent is None or not r.percent <= percent <= 100:
            raise RolloutError(
                f"raise needs a percentage from {r.percent:g} to 100 (it is at {r.percent:g}%)",
                fix="a rollout never shrinks: to take the build back, halt it and roll back",
            )
        return replace(r, percent=percent, changed=now)
    if action == "halt":
        if r.state == "halted":
            raise RolloutError(
                "the rollout is halted already", fix="resume it, or roll the channel back"
            )
        return replace(r, state="halted", changed=now, reason="operator")
    if action == "resume":
        if r.state != "halted":
            raise RolloutError(
                f"only a halted rollout can be resumed (this one is {r.state})",
                fix="nothing to resume: raise, halt or complete it",
            )
        return replace(
            r, state="active", changed=now, reason="", success=0, failure=0, epoch=r.epoch + 1
        )
    if action == "complete":
        return replace(r, state="complete", percent=100.0, changed=now, reason="")
    raise RolloutError(
        f"action must be one of {', '.join(ACTIONS)}", fix="send one of those actions"
    )


def superseded(r: Rollout, head: bytes, action: str, now: float) -> Rollout:
    """``r`` once the channel moved to ``head`` by ``action``: ended unless it is still the
    rollout's build (a rollout applies only while its build is the head)."""
    if r.manifest == head or r.state in ("complete", "ended"):
        return r
    return replace(r, state="ended", changed=now, reason=f"ended by a {action}")
