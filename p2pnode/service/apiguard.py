"""Who may call the local API, and how a refusal is answered.

The threats, as Transmission's and aria2's RPC met them:

* **Other users and programs on this machine** can reach a loopback port. Every ``/api/v1``
  call but the OpenAPI document needs the state dir's token (``STATE/api-token``, mode 0600 in
  a 0700 dir, so only the daemon's user reads it), as ``Authorization: Bearer TOKEN`` or as the
  cookie the page's login sets. Reads need it too: the library names what a user installs and
  where, and the page must not hand it out.
* **Web pages in the user's browser** (CSRF). The cookie is ``HttpOnly; SameSite=Strict``, so a
  page on another site never sends it; a changing call authenticated by the cookie must also
  carry an ``Origin`` naming us (browsers always send one on POST/PATCH/DELETE); bodies must be
  ``application/json``, which a cross-site form cannot send. No CORS headers are ever set, so
  another origin cannot read an answer either.
* **DNS rebinding** (a hostile name re-pointed at 127.0.0.1 makes the browser treat us as that
  site): the ``Host`` header must be one of ``127.0.0.1:PORT``, ``localhost:PORT``,
  ``[::1]:PORT`` (and the bound address when the user chose a non-loopback one), else 403.
* **Oversized or malformed input**: bodies over :data:`MAX_BODY` are refused (413) before they
  are read whole; bad JSON, unknown fields and bad values get a 4xx and change nothing.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import JobStateError, P2PNodeError, UsageError

__all__ = ["COOKIE", "MAX_BODY", "Guard", "Refused", "error_json"]

#: The largest request body (the biggest is a settings patch with 64 schedule windows).
MAX_BODY = 64 * 1024
COOKIE = "p2pnode_token"
_CHANGING = frozenset({"POST", "PATCH", "PUT", "DELETE"})

Handler = Callable[[Request], Awaitable[Response]]


class Refused(Exception):
    """A request the API turns down with ``status`` (not a :class:`P2PNodeError`: it never
    leaves the API; a Service's errors are mapped by :func:`status_of`)."""

    def __init__(self, status: int, message: str, code: str, *, fix: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.fix = status, message, code, fix


def error_json(status: int, message: str, code: str, fix: str) -> JSONResponse:
    return JSONResponse({"error": message, "fix": fix, "code": code}, status_code=status)


def status_of(exc: P2PNodeError) -> tuple[int, str]:
    """A Service error's HTTP status: a state conflict 409, other bad input 400, the rest
    (a state file that cannot be written) 500."""
    if isinstance(exc, JobStateError):
        return 409, "conflict"
    if isinstance(exc, UsageError):
        return 400, "bad_request"
    return 500, "failed"


class Guard:
    """The token and the accepted Host headers of one server.

    Args:
        token: the state dir's API token.
        hosts: accepted Host header values; the server adds them once bound (the port is
            known only then), so it is shared, not copied.
    """

    def __init__(self, token: str, hosts: set[str]) -> None:
        self._token = token.encode()
        self.hosts = hosts

    @staticmethod
    def loopback_hosts(port: int, bound: str) -> set[str]:
        """The Host values a client on this machine sends for ``port`` (0: a Unix socket,
        where clients send a bare name)."""
        names = {"127.0.0.1", "localhost", "[::1]"}
        if bound and not bound.startswith("unix:") and bound not in ("0.0.0.0", "::"):
            names.add(f"[{bound}]" if ":" in bound else bound)
        return names if port == 0 else {f"{n}:{port}" for n in names}

    def token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token)

    def _authenticated(self, request: Request) -> str:
        """``bearer`` or ``cookie``, or Refused (401)."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not self.token_ok(token.strip()):
                raise Refused(
                    401,
                    "the API token is wrong",
                    "unauthorized",
                    fix="pass the token in STATE/api-token as Authorization: Bearer",
                )
            return "bearer"
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and self.token_ok(cookie):
            return "cookie"
        raise Refused(
            401,
            "this call needs the API token",
            "unauthorized",
            fix="pass the token in STATE/api-token as Authorization: Bearer, or open "
            "the URL `p2pnode web` prints",
        )

    def check(self, request: Request, *, auth: bool) -> None:
        host = request.headers.get("host", "")
        if host not in self.hosts:
            raise Refused(
                403,
                f"Host {host!r} is not this machine's API",
                "bad_host",
                fix="connect to 127.0.0.1, localhost or [::1] on the API's port",
            )
        if not auth:
            return
        how = self._authenticated(request)
        if how == "cookie" and request.method in _CHANGING:
            origin = request.headers.get("origin", "")
            if origin.removeprefix("http://") not in self.hosts:
                raise Refused(
                    403,
                    f"a change from origin {origin!r} is refused",
                    "bad_origin",
                    fix="use the page this API serves, or the bearer token",
                )

    def wrap(self, handler: Handler, *, auth: bool) -> Handler:
        """``handler`` behind the checks, with every refusal answered as JSON."""

        async def guarded(request: Request) -> Response:
            try:
                self.check(request, auth=auth)
                return await handler(request)
            except Refused as exc:
                return error_json(exc.status, exc.message, exc.code, exc.fix)
            except P2PNodeError as exc:
                status, code = status_of(exc)
                return error_json(status, exc.message, code, exc.fix)

        return guarded

    async def json_body(self, request: Request, *, empty_ok: bool = False) -> Any:
        """The body as JSON (``{}`` for none when ``empty_ok``), read under :data:`MAX_BODY`."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            raise Refused(
                413, f"the request body is over {MAX_BODY} bytes", "too_large", fix="send less"
            )
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise Refused(
                    413, f"the request body is over {MAX_BODY} bytes", "too_large", fix="send less"
                )
        if not data and empty_ok:
            return {}
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused(
                415,
                "the request body must be application/json",
                "bad_media",
                fix="send JSON with Content-Type: application/json",
            )
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise Refused(
                400, f"the request body is not JSON: {exc}", "bad_request", fix="send a JSON object"
            ) from None
