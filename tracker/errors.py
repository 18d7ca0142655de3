"""The tracker's exception tree: what a request is refused with, and what is down.

Every class here answers an HTTP request the same way, as ``{"error": code, "message": ...,
"fix": ...}`` with its ``status``; they differ in whose fault it is:

    P2PNodeError                     (p2pnode.errors)
    └── TrackerError                 anything the tracker raises on purpose
        ├── APIError                 4xx: the request is wrong; retrying it unchanged fails again
        │   ├── BadRequest           400  malformed body, field or query
        │   ├── Unauthorized         401  missing or wrong token
        │   ├── Forbidden            403  bad signature, clock skew, foreign records
        │   ├── NotFound             404  unknown app, channel, manifest or route
        │   ├── Conflict             409  replay, build not newer, app already registered
        │   ├── TooLarge             413  body over its limit
        │   ├── RateLimited          429  too many requests from one address or node
        │   └── HTTPRefusal          4xx/5xx of the fast announce listener's HTTP framing
        ├── Unavailable              503: a store the tracker needs is down; retry later
        │   ├── SwarmUnavailable     the swarm's redis-server (--redis, script mode)
        │   ├── LogUnavailable       the replicated log (--redis-mode log)
        │   ├── RedisUnavailable     a Redis connection of the log's trio client
        │   └── RegistryUnavailable  the registry's redis-server (--registry)
        └── LogFormatError           the replicated log holds what this version cannot read

``APIError`` is raised before anything is written; ``Unavailable`` may leave a change applied
whole or not at all (each store's docstring says which). Bugs are neither: they surface as
themselves (a 500 on the HTTP port, logged).
"""

from __future__ import annotations

from p2pnode.errors import P2PNodeError

__all__ = [
    "APIError",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "HTTPRefusal",
    "LogFormatError",
    "LogUnavailable",
    "NotFound",
    "RateLimited",
    "RedisUnavailable",
    "RegistryUnavailable",
    "SwarmUnavailable",
    "TooLarge",
    "TrackerError",
    "Unauthorized",
    "Unavailable",
]


class TrackerError(P2PNodeError):
    """Root of what the tracker raises on purpose; ``status`` and ``code`` go into the JSON
    error of the request it ends."""

    status = 500
    code = "internal"
    default_fix = "read docs/tracker-api.md"


class APIError(TrackerError):
    """An HTTP request the tracker refuses (4xx); nothing was stored."""

    status = 400
    code = "bad_request"
    default_fix = "read docs/tracker-api.md for the request format"


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    status = 401
    code = "unauthorized"
    default_fix = "send Authorization: Bearer <admin or publisher token>"


class Forbidden(APIError):
    status = 403
    code = "forbidden"
    default_fix = "sign the message with the node key it names, or use the right token"


class NotFound(APIError):
    status = 404
    code = "not_found"
    default_fix = "check the app, channel or manifest id"


class Conflict(APIError):
    status = 409
    code = "conflict"
    default_fix = "publish a build with a higher build number than the channel has seen"


class TooLarge(APIError):
    status = 413
    code = "too_large"
    default_fix = "send a smaller request body"


class RateLimited(APIError):
    status = 429
    code = "rate_limited"
    default_fix = "slow down; retry after the number of seconds in Retry-After"


class HTTPRefusal(APIError):
    """A request the fast announce listener refuses at the HTTP level (its status may be any
    of 4xx, or 501 for framing it does not support); the connection is closed after."""

    def __init__(self, status: int, code: str, message: str, fix: str, **extra: str) -> None:
        super().__init__(message, fix=fix)
        self.status, self.code, self.headers = status, code, extra


class Unavailable(TrackerError):
    """A store the tracker needs could not be reached or failed (HTTP 503)."""

    status = 503
    code = "unavailable"
    default_fix = "retry later"


class SwarmUnavailable(Unavailable):
    """The swarm store's redis-server (``--redis``) could not be reached or failed."""

    code = "store_unavailable"
    default_fix = (
        "check that the swarm's redis-server (--redis) is up and reachable from this replica; "
        "nodes retry their announces"
    )


class LogUnavailable(Unavailable):
    """The replicated log (Redis) did not take or return a change in time."""

    code = "log_unavailable"
    default_fix = "check that redis-server is up and reachable from every replica; retry"


class RedisUnavailable(Unavailable):
    """Redis could not be reached, did not answer in time, or refused a command (the log
    mode's trio client; the log turns it into :class:`LogUnavailable` for requests)."""

    code = "redis_unavailable"
    default_fix = "check that redis-server is up and reachable at the --redis URL"


class RegistryUnavailable(Unavailable):
    """The registry's redis-server could not be reached or refused the command."""

    code = "registry_unavailable"
    default_fix = (
        "check that the registry's redis-server (--registry) is up, reachable from every "
        "replica and accepts writes; then retry"
    )


class LogFormatError(TrackerError):
    """The log or a snapshot holds something this version cannot read."""

    default_fix = "run the same tracker version on every replica, or clear the PREFIX log keys"
