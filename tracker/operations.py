"""The operator's side of a release: staged rollouts, install outcomes, the audit log.

Theory of operation
-------------------
:class:`Operations` sits between the routes and the operations store
(:class:`tracker.backend.OpsStore`); the decisions are :mod:`tracker.rollout`'s (pure).

* **Rollouts.** ``publish?rollout=P`` stores the rollout *before* the manifest becomes the
  channel's head, so no node is ever offered a staged build unstaged. A rollout applies while
  its build is the channel's head; a later publish, promote or rollback ends it. Every change
  (raise, halt, resume, complete, and a halt the outcomes caused) is also a channel move to the
  same head (action ``rollout-<change>``): it is in the channel's history, and it moves the
  channel's ``seq``, so long-polling nodes on every replica ask again and learn whether they
  are in now (:meth:`Operations.personal`).
* **Outcomes.** Each accepted outcome goes to the store (shared tally, shared replay guard);
  one of a rollout's build counts towards its halt.
* **Audit.** Changes and refused authentications are appended with the acting token's id
  (:func:`tracker.auth.token_id`) and the client's address; ``GET /v1/audit`` pages them for
  the admin.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from p2pnode.discovery.tracker_api import ChannelHead

from . import core, rollout
from .auth import require_admin, require_publisher, token_id
from .backend import AuditEntry, OpsStore, RegistryStore
from .config import TrackerConfig
from .errors import BadRequest, Conflict, NotFound
from .feed import Feed
from .metrics import TrackerMetrics
from .outcomes import Outcome
from .rollout import Rollout, RolloutError
from .web import query_int, read_body

__all__ = [
    "MAX_AUDIT_PAGE",
    "MAX_MIN_OUTCOMES",
    "PERCENT_RANGE",
    "THRESHOLD_RANGE",
    "Operations",
]

#: Entries one ``GET /v1/audit`` answers at most.
MAX_AUDIT_PAGE = 500
MAX_ROLLOUT_BODY = 1024
#: A rollout's percentage (``publish?rollout=``, ``raise``): 1/100 of a percent up to all.
PERCENT_RANGE = (0.01, 100.0)
#: The failure share at which a rollout halts itself.
THRESHOLD_RANGE = (0.001, 1.0)
MAX_MIN_OUTCOMES = 1_000_000

log = logging.getLogger(__name__)


def client_address(request: Request) -> str:
    return (request.client.host if request.client else "") or ""


class Operations:
    """Rollouts, outcomes and the audit log over the stores (see the module docstring)."""

    def __init__(
        self,
        config: TrackerConfig,
        registry: RegistryStore,
        ops: OpsStore,
        registry_call: Callable[..., Awaitable[Any]],
        feed: Feed,
        metrics: TrackerMetrics,
    ) -> None:
        self.config, self.registry, self.ops = config, registry, ops
        self.registry_call, self.feed, self.metrics = registry_call, feed, metrics
        #: called after a rollout is raised or completed as ``(app, channel, manifest,
        #: "rollout-raise" | "rollout-complete", percent before, percent after)``: its load
        #: forecast is recorded (tracker.app sets it to ``LoadRoutes.moved``), or None
        self.on_move: Callable[..., Awaitable[None]] | None = None

    async def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """An operations-store call (in a worker thread when the store may block): the
        registry's runner, which looks at the registry's ``blocking``; both stores share it."""
        return await self.registry_call(fn, *args, **kw)

    # ---------------------------------------------------------------- audit

    async def record(
        self, request: Request, action: str, actor: str, target: str, **detail: Any
    ) -> None:
        """Append a change to the audit log."""
        entry = AuditEntry(
            self.config.clock(),
            action,
            actor,
            token_id(request, self.config.admin_token),
            client_address(request),
            target,
            detail,
        )
        await self.call(self.ops.audit, entry)

    async def refused(self, request: Request, message: str) -> None:
        """Append a refused authentication (never fails the answer: the refusal stands)."""
        try:
            await self.record(
                request, "auth-refused", "unknown", request.url.path, method=request.method,
                why=message,
            )  # fmt: skip
        except Exception:  # the audit store is down: the 401 still goes out
            log.exception("could not append a refused authentication to the audit log")

    async def audit(self, request: Request) -> Response:
        """``GET /v1/audit?before=SEQ&limit=N``: newest first, for the admin."""
        require_admin(request, self.config.admin_token)
        before = query_int(request, "before", 1, 1 << 62)
        limit = query_int(request, "limit", 1, MAX_AUDIT_PAGE) or 100
        entries = await self.call(self.ops.audit_page, before, limit)
        more = len(entries) == limit
        return JSONResponse(
            {"entries": entries, "next_before": entries[-1]["seq"] if more else None}
        )

    # ---------------------------------------------------------------- rollouts

    async def stage(
        self, app: str, channel: str, manifest: bytes, build: int, percent: float
    ) -> tuple[Rollout, Rollout | None]:
        """Store a rollout of ``manifest`` at ``percent`` before it is published (see the
        module docstring); the previous build is the channel's current head. Returns it and
        the rollout it replaced, for :meth:`unstage`."""
        head = await self.registry_call(self.registry.head, app, channel)
        if head is None:
            raise Conflict(
                f"channel {channel} of {app} has no build yet for the others to keep",
                fix="publish the first build without --rollout",
            )
        now = self.config.clock()
        old = await self.call(self.ops.rollout, app, channel)
        base = head.manifest_id
        if old is not None and old.manifest == base and old.state in ("active", "halted"):
            base = old.previous  # most nodes still run the build before the unfinished one
        r = Rollout(app, channel, manifest, build, base, percent, started=now,
                    changed=now)  # fmt: skip
        if old is not None:  # the channel's own threshold stays
            r = replace(r, threshold=old.threshold, min_outcomes=old.min_outcomes)
        await self.call(self.ops.put_rollout, r)
        return r, old

    async def tidy(self, app: str, channel: str) -> None:
        """Forget the channel's rollout node sets but the one its rollout counts on (after
        a rollout was staged, resumed, replaced or ended; they are large)."""
        r: Rollout | None = await self.call(self.ops.rollout, app, channel)
        keep = rollout.nodes_key(r) if r is not None and r.state == "active" else None
        await self.call(self.ops.drop_rollout_nodes, app, channel, keep)

    async def unstage(self, staged: Rollout, old: Rollout | None) -> None:
        """The publish of a staged build was refused: the channel's rollout is what it was."""
        now = self.config.clock()
        why = "its publish was refused"
        back = old or replace(staged, state="ended", changed=now, reason=why)
        await self.call(self.ops.put_rollout, back)
        await self.tidy(staged.app, staged.channel)

    async def current(self, app: str, channel: str, head: ChannelHead) -> Rollout | None:
        """The channel's rollout if it still applies (its build is the head, not ended)."""
        r: Rollout | None = await self.call(self.ops.rollout, app, channel)
        if r is None or r.manifest != head.manifest_id or r.state == "ended":
            return None
        return r

    async def moved(self, app: str, channel: str, head: bytes, action: str) -> None:
        """The channel now points at ``head``: a rollout of another build ends (it must not
        count outcomes, halt, or move the channel back to its build)."""
        now = self.config.clock()
        await self.call(
            self.ops.update_rollout,
            app,
            channel,
            lambda r: rollout.superseded(r, head, action, now),
        )
        await self.tidy(app, channel)

    async def personal(
        self, head: ChannelHead, node: bytes | None, have: bytes | None
    ) -> tuple[ChannelHead, dict[str, Any] | None]:
        """The feed's answer for one node: the head, or the build it keeps while the
        channel's rollout leaves it out (same ``seq``); and the rollout's state for the
        answer's ``rollout`` field when there is one."""
        r = await self.current(head.app, head.channel, head)
        if r is None:
            return head, None
        mid = rollout.offered(r, node, have)
        answer = head
        if mid is not None and mid != head.manifest_id:
            info = self.registry.manifest_info(mid)
            if info is not None:
                answer = replace(head, manifest_id=mid, build=info[1], version=info[2])
        state = {"build": r.build, "percent": r.percent, "state": r.state,
                 "member": mid == r.manifest}  # fmt: skip
        return answer, state

    async def _move(self, r: Rollout, action: str, actor: str) -> None:
        """A rollout change as a channel move to the same head (history, seq, feed); none
        if the channel moved on meanwhile."""
        head = await self.registry_call(self.registry.head, r.app, r.channel)
        if head is None or head.manifest_id != r.manifest:
            return
        await self.registry_call(
            self.registry.move,
            app=r.app,
            channel=r.channel,
            manifest_id=r.manifest,
            action=f"rollout-{action}",
            now=self.config.clock(),
            actor=actor,
        )
        self.metrics.moves.labels(f"rollout-{action}").inc()
        self.feed.notify()

    async def rollout_route(self, request: Request, row_name: str, channel: str) -> Response:
        """``GET|POST /v1/apps/APP/channels/CH/rollout``: the rollout, or an operator's
        change to it: ``{"action": "raise", "percent": P}``, ``halt``, ``resume``,
        ``complete``; ``threshold`` and ``min_outcomes`` set the automatic halt."""
        head = await self.registry_call(self.registry.head, row_name, channel)
        r = None if head is None else await self.current(row_name, channel, head)
        if request.method == "GET":
            if r is None:
                raise NotFound(
                    f"channel {channel} of {row_name} has no rollout under way",
                    fix="stage a build with publish --rollout PERCENT (GET .../channels/CH "
                    "shows the head every node is offered)",
                )
            return JSONResponse(r.view())
        actor = require_publisher(
            request, self.config.admin_token, row_name, self.registry.get_app(row_name)
        )
        obj = core.json_object(await read_body(request, MAX_ROLLOUT_BODY) or b"{}")
        core._only(obj, required={"action"}, optional={"percent", "threshold", "min_outcomes"})
        action = obj["action"]
        if action not in rollout.ACTIONS:
            raise BadRequest(f"action must be one of {', '.join(rollout.ACTIONS)}")
        percent = _number(obj, "percent", *PERCENT_RANGE)
        threshold = _number(obj, "threshold", *THRESHOLD_RANGE)
        min_outcomes = None
        if obj.get("min_outcomes") is not None:
            min_outcomes = core._int(obj, "min_outcomes", 1, MAX_MIN_OUTCOMES)
        if r is None:
            raise Conflict(
                f"channel {channel} of {row_name} has no rollout under way",
                fix="publish with --rollout PERCENT",
            )
        now = self.config.clock()
        manifest = r.manifest

        def apply(cur: Rollout) -> Rollout:
            if cur.manifest != manifest:
                raise RolloutError(
                    "the channel's rollout changed meanwhile",
                    fix="look at it again (tracker rollout APP CHANNEL show), then retry",
                )
            new = rollout.change(cur, action, now, percent)
            if threshold is not None:
                new = replace(new, threshold=threshold)
            if min_outcomes is not None:
                new = replace(new, min_outcomes=min_outcomes)
            return new

        try:
            changed = await self.call(self.ops.update_rollout, row_name, channel, apply)
        except RolloutError as exc:
            raise Conflict(str(exc), fix=exc.fix) from exc
        if changed is None:
            raise Conflict(
                f"channel {channel} of {row_name} has no rollout under way",
                fix="publish with --rollout PERCENT",
            )
        before, after = changed
        if after.state != "active" or after.epoch != before.epoch:
            await self.tidy(row_name, channel)
        await self._move(after, action, actor)
        await self.record(
            request, f"rollout-{action}", actor, f"{row_name}/{channel}",
            build=after.build, percent=after.percent, was=before.percent, state=after.state,
        )  # fmt: skip
        # a raise while halted lets no node in (until a resume: not forecast, see docs)
        if action in ("raise", "complete") and after.state != "halted" and self.on_move:
            await self.on_move(
                row_name, channel, after.manifest, f"rollout-{action}", before.percent,
                after.percent,
            )  # fmt: skip
        return JSONResponse(after.view())

    # ---------------------------------------------------------------- outcomes

    async def outcome(self, o: Outcome, digest: bytes, now: float, window: float) -> bool:
        """Count an accepted outcome; one of a rollout's build may halt it. False: a replay."""
        if o.kind == "rollback" and o.from_build is not None:
            o = replace(o, from_manifest=await self.fled(o.app, o.from_build))
        if not await self.call(self.ops.add_outcome, o, digest, now, window):
            return False
        failed = o.code is not None
        for r in await self.call(self.ops.rollouts):
            if r.app != o.app or r.manifest != o.manifest or r.state != "active":
                continue
            key = rollout.nodes_key(r)
            was = await self.call(self.ops.rollout_node, key, r.app, r.channel, o.node_id, failed)
            if was == ("failed" if failed else "ok") or was == "full":
                continue  # a retry that changes nothing, or a node beyond the set's bound

            def count(cur: Rollout, was: rollout.NodeWas = was, epoch: int = r.epoch) -> Rollout:
                if cur.manifest != o.manifest:
                    return cur
                return rollout.with_outcome(cur, failed, now, was, epoch)

            changed = await self.call(self.ops.update_rollout, r.app, r.channel, count)
            if changed is not None and changed[0].state == "active" != changed[1].state:
                await self._halted(changed[1])
        return True

    async def fled(self, app: str, build: int) -> bytes | None:
        """The manifest a rollback fled: the app's one manifest with that build number (a
        rollback names the build it left by number; None when no manifest or several
        channels' manifests have it, and then no build's ``rollbacks_from`` counts it)."""
        releases = await self.registry_call(self.registry.releases)
        found = [mid for mid, (a, b, _) in releases.items() if a == app and b == build]
        return found[0] if len(found) == 1 else None

    async def _halted(self, r: Rollout) -> None:
        """The outcomes halted ``r``: recorded in the channel's history and the audit log."""
        log.warning("rollout of build %d on %s/%s halted: %s", r.build, r.app, r.channel, r.reason)
        self.metrics.rollout_halts.inc()
        await self.tidy(r.app, r.channel)
        await self._move(r, "halt", "tracker")
        entry = AuditEntry(
            self.config.clock(),
            "rollout-halt",
            "tracker",
            "",
            "",
            f"{r.app}/{r.channel}",
            {"build": r.build, "percent": r.percent, "reason": r.reason},
        )
        await self.call(self.ops.audit, entry)


def _number(obj: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be a number in [{lo:g}, {hi:g}]")
    return float(value)
