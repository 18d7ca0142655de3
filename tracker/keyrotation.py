"""Publisher key rotation on the tracker: ``POST /v1/apps/APP/rotations`` keeps a rotation
(release/rotation.py) signed by a key of the app's chain, ``GET`` hands the app's rotations to
nodes, and publishing checks manifests against the chain (:func:`app_keys`): the new key from
then on, a retired key until its ``old_until``.

The statement is signed by the old key on the publisher's machine (``tracker app rotate-key``);
the tracker only checks and keeps it, so the tracker never holds a key that signs anything. One
rotation per old key: a second one by the same key is 409, so a stolen retired key cannot
re-route the app.

The feed names each app's chain (``key_chain`` on every feed answer: the digest of its
rotations document), so nodes learn of a rotation on their normal polls even when they never
meet a build signed by the new key. :class:`KeyChains` caches the digest per app: a feed answer
costs no registry read while warm; a rotation here clears it at once, one kept through another
replica is seen within :data:`CHAIN_TTL`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from p2pnode.errors import P2PNodeError
from p2pnode.release import keys
from p2pnode.release import rotation as R

from .auth import require_publisher
from .backend import AppRow, RegistryStore
from .errors import BadRequest, Conflict, Forbidden
from .lru import LRU
from .web import read_body

if TYPE_CHECKING:
    from .channels import ChannelRoutes

__all__ = [
    "CHAIN_TTL",
    "ROTATIONS_MEDIA",
    "ROTATION_MEDIA",
    "KeyChains",
    "RotationRoutes",
    "app_keys",
]

ROTATION_MEDIA = "application/x-p2pnode-rotation"
ROTATIONS_MEDIA = "application/x-p2pnode-rotations"
#: How long a cached chain digest is used before the registry is read again (seconds): how late
#: a rotation kept through another replica may reach this one's feed answers.
CHAIN_TTL = 5.0


async def app_keys(
    registry: RegistryStore, registry_call: Callable[..., Awaitable[Any]], row: AppRow
) -> R.KeyRing:
    """The keys the app's builds may be signed by: its registered key and the chain its kept
    rotations make from it."""
    kept = await registry_call(registry.rotations, row.name)
    return R.follow({row.key}, row.name, [R.parse_rotation(r) for r in kept])


class KeyChains:
    """App -> the digest of its rotations document (``None``: it has none), for the feed.

    Args:
        registry, registry_call: where the rotations are kept.
        max_apps: apps remembered (one digest each).
    """

    def __init__(
        self,
        registry: RegistryStore,
        registry_call: Callable[..., Awaitable[Any]],
        max_apps: int = 4096,
    ) -> None:
        self.registry, self.registry_call = registry, registry_call
        self._cache = LRU(max_apps)

    async def digest(self, row: AppRow) -> str | None:
        cached: tuple[float, str | None] | None = self._cache.get(row.name)
        now = time.monotonic()
        if cached is not None and now < cached[0]:
            return cached[1]
        ring = await app_keys(self.registry, self.registry_call, row)
        digest = R.chain_digest(R.encode_list(ring.learned)) if ring.learned else None
        self._cache.put(row.name, (now + CHAIN_TTL, digest))
        return digest

    def forget(self, app: str) -> None:
        """The app's chain grew here: the next answer reads it again."""
        self._cache.put(app, (0.0, None))


class RotationRoutes:
    def __init__(self, channels: ChannelRoutes) -> None:
        self.ch = channels

    async def rotations(self, request: Request) -> Response:
        """GET: the app's rotations as a rotations document (an empty list: none). POST: keep
        one, answering the app's current key."""
        ch = self.ch
        row = ch.app_row(request.path_params["app"])
        if request.method == "GET":  # the chain from the registered key, oldest first
            ring = await app_keys(ch.registry, ch.registry_call, row)
            return Response(R.encode_list(ring.learned), media_type=ROTATIONS_MEDIA)
        actor = require_publisher(request, ch.config.admin_token, row.name, row)
        body = await read_body(request, R.MAX_ROTATIONS_BYTES)
        try:
            signed = R.parse_rotation(body, source="uploaded key rotation")
            r = signed.check()
        except P2PNodeError as exc:
            cls = BadRequest if "signature" not in exc.message else Forbidden
            raise cls(f"key rotation refused: {exc.message}", fix=exc.fix) from exc
        if r.app != row.name:
            raise BadRequest(f"the key rotation is for app {r.app}, not {row.name}")
        ring = await app_keys(ch.registry, ch.registry_call, row)
        if r.old not in ring:
            raise Forbidden(
                f"{keys.format_public_key(r.old)} is not a key of {row.name}",
                fix="sign the rotation with the app's current key",
            )
        if r.old in {s.rotation.old for s in ring.learned}:
            raise Conflict(f"{keys.format_public_key(r.old)} was rotated already")
        now = ch.config.clock()
        if not await ch.registry_call(ch.registry.add_rotation, row.name, r.old, body, now):
            raise Conflict(f"{keys.format_public_key(r.old)} was rotated already")
        ch.chains.forget(row.name)
        ch.feed.notify()  # long polls answer again, now naming the longer chain
        await ch.ops.record(
            request,
            "key-rotated",
            actor,
            row.name,
            old=keys.format_public_key(r.old),
            new=keys.format_public_key(r.new),
            old_until=r.old_until,
        )
        ring = await app_keys(ch.registry, ch.registry_call, row)
        return JSONResponse(
            {
                "app": row.name,
                "key": keys.format_public_key(ring.current(row.key)),
                "old": keys.format_public_key(r.old),
                "old_until": r.old_until,
                "rotations": len(ring.learned),
            },
            status_code=201,
        )
