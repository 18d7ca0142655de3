"""The registry's routes: apps, publishing, channel moves, the update feed, manifests.

Handlers are thin: read the body under a size cap, check names and tokens, call the registry
(:class:`tracker.backend.RegistryStore`), answer. The uploaded manifest (up to 64 MiB) is parsed
and its signature checked in a worker thread. Each move wakes the update feed
(:class:`tracker.feed.Feed`); a node asks ``GET .../channels/CH?since=SEQ&wait=S`` and gets the
head at once if it moved past ``SEQ``, else when it moves, else after ``S`` seconds; the same
moves are pushed as server-sent events on ``.../events``. Heads carry the build's update type
and release notes (:class:`tracker.releaseinfo.ReleaseInfos`), history entries its type.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from p2pnode.discovery.tracker_api import ChannelHead
from p2pnode.errors import P2PNodeError
from p2pnode.release import keys
from p2pnode.release.manifest import MAX_MANIFEST_BYTES, SignedManifest, parse_signed
from p2pnode.release.rotation import KeyRing

from . import core
from .auth import require_admin, require_publisher, token_hash
from .backend import AppRow, Publication, RegistryStore
from .config import TrackerConfig
from .errors import APIError, BadRequest, Conflict, Forbidden, NotFound
from .feed import Feed
from .keyrotation import KeyChains, app_keys
from .metrics import TrackerMetrics
from .operations import PERCENT_RANGE, Operations
from .releaseinfo import ReleaseInfos
from .web import query_float, query_int, read_body

__all__ = ["MAX_JSON_BYTES", "MAX_SINCE", "MAX_WAIT", "ChannelRoutes"]

MAX_JSON_BYTES = 4096
#: Longest a long-poll may ask to be held (seconds).
MAX_WAIT = 60.0
#: Largest ``since`` (a channel sequence number) a feed request may name.
MAX_SINCE = 1 << 62


class ChannelRoutes:
    """The handlers of the registry's routes; their names are the ``route`` label of the
    request metrics, so they do not change.

    Args:
        config: the tracker's (``admin_token``, ``clock``).
        registry: the registry store.
        registry_call: runs a registry call (in a worker thread when it may block).
        feed: woken by every channel move.
        metrics: counts the moves.
        infos: each build's update type and notes, which heads and history carry.
        operations: rollouts and the audit log (:class:`tracker.operations.Operations`).
    """

    def __init__(
        self,
        config: TrackerConfig,
        registry: RegistryStore,
        registry_call: Callable[..., Awaitable[Any]],
        feed: Feed,
        metrics: TrackerMetrics,
        infos: ReleaseInfos,
        operations: Operations,
    ) -> None:
        self.config, self.registry, self.registry_call = config, registry, registry_call
        self.feed, self.metrics, self.infos, self.ops = feed, metrics, infos, operations
        #: each app's key rotation chain, named on feed answers (``key_chain``)
        self.chains = KeyChains(registry, registry_call)
        #: called after each publish: the load forecast's summary for the answer (tracker.app
        #: sets it to ``LoadRoutes.published``), or None
        self.forecaster: Callable[..., Awaitable[dict[str, Any] | None]] | None = None
        #: called after each promote as ``(app, channel, manifest, action, 0.0, 100.0)``: its
        #: load forecast is recorded (tracker.app sets it to ``LoadRoutes.moved``), or None
        self.on_move: Callable[..., Awaitable[None]] | None = None

    def app_row(self, app: str) -> AppRow:
        core.check_name(app, "app")
        row = self.registry.get_app(app)
        if row is None:
            raise NotFound(f"app {app} is not registered", fix="register it: tracker app add")
        return row

    async def apps(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(
                {
                    "apps": [
                        {"app": a.name, "key": keys.format_public_key(a.key)}
                        for a in await self.registry_call(self.registry.list_apps)
                    ]
                }
            )
        actor = require_admin(request, self.config.admin_token)
        obj = core.json_object(await read_body(request, MAX_JSON_BYTES))
        app = core.check_name(obj.get("app"), "app")  # type: ignore[arg-type]
        key_text = obj.get("key")
        if not isinstance(key_text, str):
            raise BadRequest("key must be ed25519:<64 hex>")
        try:
            key = keys.parse_public_key(key_text)
        except P2PNodeError as exc:
            raise BadRequest("key must be ed25519:<64 hex>") from exc
        token = "pub_" + secrets.token_urlsafe(32)
        await self.registry_call(
            self.registry.add_app, app, key, token_hash(token), self.config.clock()
        )
        await self.ops.record(request, "app-registered", actor, app, key=key_text)
        return JSONResponse(
            {"app": app, "key": keys.format_public_key(key), "publisher_token": token},
            status_code=201,
        )

    async def rotate_token(self, request: Request) -> Response:
        """``POST /v1/apps/APP/token``: a new publisher token; the old one stops working (on
        other replicas within the feed's poll, ~0.2 s)."""
        row = self.app_row(request.path_params["app"])
        actor = require_publisher(request, self.config.admin_token, row.name, row)
        # no body, or an empty object: a field here would be a mistake (none is read)
        core._only(core.json_object(await read_body(request, MAX_JSON_BYTES) or b"{}"),
                   required=set(), optional=set())  # fmt: skip
        token = "pub_" + secrets.token_urlsafe(32)
        new = await self.registry_call(self.registry.rotate_token, row.name, token_hash(token))
        if new is None:
            raise NotFound(f"app {row.name} is not registered")
        await self.ops.record(
            request, "token-rotated", actor, row.name, new_token_id="t-" + new.token_hash[:4].hex()
        )
        return JSONResponse({"app": row.name, "publisher_token": token}, status_code=201)

    async def app_info(self, request: Request) -> Response:
        row = self.app_row(request.path_params["app"])
        heads = await self.registry_call(self.registry.channels, row.name)
        return JSONResponse(
            {
                "app": row.name,
                "key": keys.format_public_key(row.key),
                "channels": [(await self.infos.head(h)).to_json() for h in heads],
            }
        )

    def channel(self, request: Request) -> tuple[AppRow, str]:
        row = self.app_row(request.path_params["app"])
        channel = core.check_name(request.path_params["channel"], "channel")
        return row, channel

    async def publish(self, request: Request) -> Response:
        row, channel = self.channel(request)
        actor = require_publisher(request, self.config.admin_token, row.name, row)
        percent = (
            query_float(request, "rollout", *PERCENT_RANGE)
            if "rollout" in request.query_params
            else None
        )
        now = self.config.clock()
        ring = await app_keys(self.registry, self.registry_call, row)
        body, signed = await checked_upload(request, ring, now)
        m = signed.manifest
        if m.app != row.name:
            raise BadRequest(f"the manifest is for app {m.app}, not {row.name}")
        if m.channel != channel:
            raise BadRequest(
                f"the manifest is signed for channel {m.channel}, not {channel}",
                fix=f"publish to {m.channel}, then promote it to {channel}",
            )
        mid = signed.id
        publication = Publication(
            app=row.name,
            channel=channel,
            manifest_id=mid,
            build=m.build,
            version=m.version,
            size=m.total_size,
            signed=body,
            now=now,
            actor=actor,
        )
        staged = replaced = None
        if percent is not None and percent < 100:
            staged, replaced = await self.ops.stage(row.name, channel, mid, m.build, percent)
        try:
            seq = await self.registry_call(self.registry.publish, publication)
        except BaseException:
            if staged is not None:
                await self.ops.unstage(staged, replaced)
            raise
        self.infos.put(mid, m.info)
        if staged is None:
            await self.ops.moved(row.name, channel, mid, "publish")
        else:
            await self.ops.tidy(row.name, channel)  # the replaced rollout's node set goes
        self.metrics.moves.labels("publish").inc()
        self.feed.notify()
        await self.ops.record(
            request, "publish", actor, f"{row.name}/{channel}",
            manifest_id=mid.hex(), build=m.build, rollout=percent,
        )  # fmt: skip
        answer: dict[str, Any] = {
            "app": row.name,
            "channel": channel,
            "seq": seq,
            "manifest_id": mid.hex(),
            "build": m.build,
            "version": m.version,
            "update_type": m.info.update_type,
        }
        if staged is not None:
            answer["rollout"] = staged.view()
        if self.forecaster is not None:
            answer["forecast"] = await self.forecaster(m, mid, channel, percent, now)
        return JSONResponse(answer, status_code=201)

    async def move(self, request: Request, action: str) -> Response:
        row, channel = self.channel(request)
        actor = require_publisher(request, self.config.admin_token, row.name, row)
        obj = core.json_object(await read_body(request, MAX_JSON_BYTES) or b"{}")
        target = obj.get("manifest_id")
        if target is None and action == "rollback":
            mid = await self.registry_call(self.registry.previous_head, row.name, channel)
            if mid is None:
                raise Conflict(
                    f"channel {channel} of {row.name} has no earlier build to roll back to",
                    fix="pass manifest_id explicitly",
                )
        elif target is None:
            raise BadRequest("manifest_id is required")
        else:
            mid = core.check_manifest_id(target)
        await self.registry_call(
            self.registry.move,
            app=row.name,
            channel=channel,
            manifest_id=mid,
            action=action,
            now=self.config.clock(),
            actor=actor,
        )
        self.metrics.moves.labels(action).inc()
        await self.ops.moved(row.name, channel, mid, action)
        self.feed.notify()
        await self.ops.record(
            request, action, actor, f"{row.name}/{channel}", manifest_id=mid.hex()
        )
        if action == "promote" and self.on_move is not None:
            await self.on_move(row.name, channel, mid, action, 0.0, 100.0)
        head = await self.registry_call(self.registry.head, row.name, channel)
        if head is None:  # the move just committed; only a concurrent delete could do this
            raise NotFound(f"channel {channel} vanished")
        return JSONResponse((await self.infos.head(head)).to_json())

    async def promote(self, request: Request) -> Response:
        return await self.move(request, "promote")

    async def rollback(self, request: Request) -> Response:
        return await self.move(request, "rollback")

    async def rollout(self, request: Request) -> Response:
        row, channel = self.channel(request)
        return await self.ops.rollout_route(request, row.name, channel)

    async def _answer(
        self, row: AppRow, head: ChannelHead, node: bytes | None, have: bytes | None
    ) -> dict[str, Any]:
        """The feed's answer: the build this node is offered (a staged rollout may keep it on
        the previous one), with its update type and notes, and the app's key chain."""
        mine, rollout = await self.ops.personal(head, node, have)
        mine = dataclasses.replace(mine, key_chain=await self.chains.digest(row))
        out = (await self.infos.head(mine)).to_json()
        if rollout is not None:
            out["rollout"] = rollout
        return out

    def _node(self, request: Request) -> tuple[bytes | None, bytes | None]:
        """``?node=ID&have=MANIFEST``: who asks the feed, and what it runs (rollouts)."""
        node, have = request.query_params.get("node"), request.query_params.get("have")
        if node is not None and not core._HEX40.match(node):
            raise BadRequest("node must be a node id, 40 lowercase hex digits")
        return (
            bytes.fromhex(node) if node is not None else None,
            core.check_manifest_id(have) if have is not None else None,
        )

    async def history(self, request: Request) -> Response:
        row, channel = self.channel(request)
        history = await self.registry_call(self.registry.history, row.name, channel)
        for entry in history:  # the type, not the notes: 100 entries of 16 KiB is too much
            entry.update(await self.infos.fields(bytes.fromhex(entry["manifest_id"]), notes=False))
        return JSONResponse({"app": row.name, "channel": channel, "history": history})

    async def latest(self, request: Request) -> Response:
        row, channel = self.channel(request)
        node, have = self._node(request)
        since = query_int(request, "since", -1, MAX_SINCE)
        wait = query_float(request, "wait", 0.0, MAX_WAIT)
        head = await self.registry_call(self.registry.head, row.name, channel)
        if since is not None and wait > 0:
            chain = await self.chains.digest(row)
            with trio.move_on_after(wait):
                while head is None or head.seq <= since:
                    await self.feed.wait()
                    head = await self.registry_call(self.registry.head, row.name, channel)
                    if head is not None and await self.chains.digest(row) != chain:
                        break  # a key rotation: the node hears of it now, not at the next build
        if head is None:
            raise NotFound(
                f"nothing is published to channel {channel} of {row.name} yet",
                fix="publish a build first (or wait with ?since=0&wait=S)",
            )
        return JSONResponse(await self._answer(row, head, node, have))

    async def events(self, request: Request) -> Response:
        row, channel = self.channel(request)
        node, have = self._node(request)
        since = query_int(request, "since", -1, MAX_SINCE)

        async def stream() -> AsyncIterator[bytes]:
            last = -1 if since is None else since
            yield b"retry: 1000\n\n"
            while True:
                head = await self.registry_call(self.registry.head, row.name, channel)
                if head is not None and head.seq > last:
                    last = head.seq
                    data = json.dumps(await self._answer(row, head, node, have))
                    yield f"id: {head.seq}\nevent: release\ndata: {data}\n\n".encode()
                with trio.move_on_after(15):
                    await self.feed.wait()
                    continue
                yield b": keepalive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def manifest(self, request: Request) -> Response:
        mid = core.check_manifest_id(request.path_params["manifest_id"])
        raw = await self.registry_call(self.registry.get_manifest, mid)
        if raw is None:
            raise NotFound(f"manifest {mid.hex()} is not stored here")
        return Response(
            raw,
            media_type="application/x-p2pnode-manifest",
            headers={"Cache-Control": "public, max-age=31536000, immutable"},
        )


async def checked_upload(
    request: Request, ring: KeyRing, now: float
) -> tuple[bytes, SignedManifest]:
    """The uploaded signed manifest (its bytes, and parsed) of a publish or a forecast's dry
    run: read under its cap, parsed and verified in a worker thread (up to 64 MiB) with the
    app's keys (``keyrotation.app_keys``: its key, or one it rotated to, or from until the
    rotation's date); a problem is a refusal."""
    body = await read_body(request, MAX_MANIFEST_BYTES + 1024)

    def check() -> SignedManifest:
        signed = parse_signed(body, source="uploaded manifest")
        ring.verify(signed, now=now)
        return signed

    try:
        return body, await trio.to_thread.run_sync(check)
    except P2PNodeError as exc:
        raise _refusal(exc) from exc


def _refusal(exc: P2PNodeError) -> APIError:
    """A manifest problem as an HTTP refusal: trust failures are 403, format problems 400."""
    from p2pnode.errors import IntegrityError

    cls: type[APIError] = Forbidden if isinstance(exc, IntegrityError) else BadRequest
    return cls(f"manifest refused: {exc.message}", fix=exc.fix)
