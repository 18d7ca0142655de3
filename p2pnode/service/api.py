"""The local API: REST under ``/api/v1``, a push stream and the web page, over one Service.

Theory of operation
-------------------
Handlers are thin: check the request (:mod:`p2pnode.service.apiguard`: Host, token, body),
check the body against its schema (:mod:`p2pnode.service.apischema`), call one
:class:`~p2pnode.service.control.Service` method, answer with its view. The Service checks
before it changes anything and raises ``UsageError``/``JobStateError`` with a fix; those become
a 400/409 ``{"error", "fix", "code"}`` here, so a refused call changes nothing. Everything runs
in the daemon's trio thread: the Service is sans-IO and its calls return at once, so no lock is
needed between the API, the workers and the feed follower.

The security model (docs/api.md): loopback by default; every ``/api/v1`` call but the OpenAPI
document needs the state dir's token (a bearer header, or the cookie the page's login sets);
a Host header other than the loopback names on our port is refused (DNS rebinding); no CORS
headers at all, so other origins cannot read answers.

``serve_api`` is the trio shell: hypercorn's trio worker, started with ``nursery.start`` and
reporting the bound address, like ``tracker.server.serve_tracker``. Once bound it writes
``STATE/api.json`` so clients (``p2pnode jobs``) find it, and removes it on the way out.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..errors import UsageError
from .apiguard import (
    COOKIE,
    MAX_BODY,
    Guard,
    Refused,
    error_json,
)
from .apischema import PREFIX, check_body, openapi_document
from .control import Service, parse_priority
from .events import Changes, event_stream
from .job import FINISHED, Job, JobKind

__all__ = ["MAX_BODY", "make_app", "serve_api"]

Handler = Callable[[Request], Awaitable[Response]]


class LocalAPI:
    """The routes over one Service; ``guard`` holds the token and the accepted Hosts."""

    def __init__(self, service: Service, guard: Guard) -> None:
        self.service = service
        self.guard = guard
        self.changes = Changes(service)

    # Helpers -----------------------------------------------------------------------------

    def _job(self, ident: str) -> Job:
        """A job by id, or a library entry's unfinished job (``p2pnode pause g1``)."""
        svc = self.service
        job = next((j for j in svc.queue.jobs if j.id == ident), None)
        if job is None and ident in svc.library:
            job = svc.queue.unfinished_for(ident)
            if job is None:
                raise Refused(
                    404,
                    f"library entry {ident} has no unfinished job",
                    "not_found",
                    fix="list the jobs with `p2pnode jobs`",
                )
        if job is None:
            raise Refused(
                404, f"no job {ident!r}", "not_found", fix="list the jobs with `p2pnode jobs`"
            )
        return job

    def _entry_id(self, ident: object) -> str:
        if not isinstance(ident, str) or ident not in self.service.library:
            raise Refused(
                404,
                f"no library entry {ident!r}",
                "not_found",
                fix="list the library with GET /api/v1/library",
            )
        return ident

    def _jobs(self, jobs: list[Job]) -> list[dict[str, Any]]:
        return [self.service.job_view(j) for j in jobs]

    # Library -----------------------------------------------------------------------------

    async def library(self, request: Request) -> Response:
        return JSONResponse({"entries": [e.to_json() for e in self.service.library.entries]})

    async def add(self, request: Request) -> Response:
        body = check_body("NewEntry", await self.guard.json_body(request))
        entry, job = self.service.add(
            body["source"],
            body["dest"],
            body["trust"],
            channel=body.get("channel", "stable"),
            tracker=body.get("tracker"),
            auto_update=body.get("auto_update", True),
            priority=parse_priority(body.get("priority", "normal")),
        )
        view = self.service.job_view(job)
        return JSONResponse({"id": job.id, "entry": entry.to_json(), "job": view}, 201)

    async def entry(self, request: Request) -> Response:
        ident = self._entry_id(request.path_params["entry"])
        if request.method == "DELETE":
            return JSONResponse(self.service.remove(ident).to_json())
        if request.method == "PATCH":
            body = check_body("EntryChange", await self.guard.json_body(request))
            return JSONResponse(self.service.set_auto_update(ident, body["auto_update"]).to_json())
        return JSONResponse(self.service.library.get(ident).to_json())

    async def move(self, request: Request) -> Response:
        ident = self._entry_id(request.path_params["entry"])
        body = check_body("Move", await self.guard.json_body(request))
        priority = parse_priority(body.get("priority", "normal"))
        job = self.service.move(ident, body["to"], priority=priority)
        return JSONResponse(self.service.job_view(job), 201)

    # Jobs --------------------------------------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        return JSONResponse({"jobs": self.service.jobs_view()})

    async def new_job(self, request: Request) -> Response:
        body = check_body("NewJob", await self.guard.json_body(request))
        job = self.service.submit(
            self._entry_id(body["entry"]),
            JobKind(body["kind"]),
            target=body.get("target"),
            priority=parse_priority(body.get("priority", "normal")),
        )
        return JSONResponse(self.service.job_view(job), 201)

    async def job(self, request: Request) -> Response:
        job = self._job(request.path_params["job"])
        if request.method == "DELETE":
            job = self.service.forget(job.id)
        return JSONResponse(self.service.job_view(job))

    async def job_action(self, request: Request) -> Response:
        job = self._job(request.path_params["job"])
        verb = request.path_params["verb"]
        svc = self.service
        if verb == "pause":
            job = svc.pause(job.id)
        elif verb == "resume":
            job = svc.resume(job.id)
        elif verb == "cancel":
            job = svc.cancel(job.id)
        elif verb == "priority":
            body = check_body("PriorityChange", await self.guard.json_body(request))
            job = svc.set_priority(job.id, body["priority"])
        elif verb == "defer":
            body = check_body("Defer", await self.guard.json_body(request))
            job = svc.defer(job.id, float(body["until"]))
        else:
            raise Refused(
                404,
                f"no action {verb!r}",
                "not_found",
                fix="use pause, resume, cancel, priority or defer",
            )
        return JSONResponse(svc.job_view(job))

    # Updates and verification ------------------------------------------------------------

    async def check_updates(self, request: Request) -> Response:
        """As the feed would: an automatic update, which waits for an update window."""
        body = check_body("EntryRef", await self.guard.json_body(request, empty_ok=True))
        svc = self.service
        if "entry" in body:
            ids = [self._entry_id(body["entry"])]
        else:
            ids = [e.id for e in svc.library.entries if svc.queue.unfinished_for(e.id) is None]
        jobs = [svc.submit(i, JobKind.UPDATE, auto=True) for i in ids]
        return JSONResponse({"jobs": self._jobs(jobs)})

    async def apply_update(self, request: Request) -> Response:
        """The user's "install it now": a user's update passes windows; a deferral is lifted."""
        body = check_body("EntryRequired", await self.guard.json_body(request))
        if "entry" not in body:
            raise UsageError("the request body needs the field 'entry'", fix="add it")
        svc = self.service
        job = svc.submit(self._entry_id(body["entry"]), JobKind.UPDATE)
        if job.not_before is not None:
            job = svc.defer(job.id, 0.0)
        return JSONResponse(svc.job_view(job))

    async def update_history(self, request: Request) -> Response:
        done = [
            j for j in self.service.queue.jobs if j.kind is JobKind.UPDATE and j.state in FINISHED
        ]
        done.sort(key=lambda j: j.finished or 0.0, reverse=True)
        return JSONResponse({"jobs": self._jobs(done)})

    async def verify(self, request: Request) -> Response:
        body = check_body("EntryRequired", await self.guard.json_body(request))
        if "entry" not in body:
            raise UsageError("the request body needs the field 'entry'", fix="add it")
        job = self.service.submit(self._entry_id(body["entry"]), JobKind.VERIFY)
        return JSONResponse(self.service.job_view(job), 201)

    async def verify_result(self, request: Request) -> Response:
        ident = self._entry_id(request.path_params["entry"])
        runs = [j for j in self.service.queue.jobs if j.entry == ident and j.kind is JobKind.VERIFY]
        if not runs:
            raise Refused(
                404,
                f"library entry {ident} was never verified",
                "not_found",
                fix="start one with POST /api/v1/verify",
            )
        latest = max(runs, key=lambda j: int(j.id[1:]) if j.id[1:].isdigit() else 0)
        return JSONResponse(self.service.job_view(latest))

    # Settings ----------------------------------------------------------------------------

    async def settings(self, request: Request) -> Response:
        if request.method == "PATCH":
            body = check_body("SettingsPatch", await self.guard.json_body(request))
            return JSONResponse(self.service.update_settings(body))
        return JSONResponse(self.service.settings_view())

    async def schedule(self, request: Request) -> Response:
        view = self.service.settings_view()
        keys = ("alt_speed", "update_window", "caps_now", "update_window_open")
        out = {k: view.get(k) for k in keys}
        out["next_change_in"] = self.service.next_schedule_change()
        return JSONResponse(out)

    async def snapshot(self, request: Request) -> Response:
        return JSONResponse(self.service.snapshot())

    async def events(self, request: Request) -> Response:
        return event_stream(self.service, self.changes)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    # The page ----------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        """The web page; ``/?token=T`` logs in: a cookie is set and the token leaves the URL."""
        token = request.query_params.get("token")
        if token is not None:
            if not self.guard.token_ok(token):
                raise Refused(
                    401,
                    "the token in the URL is wrong",
                    "unauthorized",
                    fix="open the URL `p2pnode web` prints",
                )
            answer = RedirectResponse("/", status_code=303)
            answer.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            answer.headers["Cache-Control"] = "no-store"
            answer.headers["Referrer-Policy"] = "no-referrer"
            return answer
        nonce = secrets.token_urlsafe(16)
        html = _page().replace("{{nonce}}", nonce)
        return HTMLResponse(html, headers=_page_headers(nonce))


def _page() -> str:
    return resources.files("p2pnode.service").joinpath("static", "index.html").read_text("utf-8")


def _page_headers(nonce: str) -> dict[str, str]:
    """The page runs only its own inline script (this response's nonce) and talks only to us;
    no framing (clickjacking), no referrer (a login URL carries the token)."""
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'self'"
        ),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def by_method(**handlers: Handler) -> Handler:
    """One handler per method on one route, so that a 405 on the path lists every method the
    path has in its ``Allow`` (two routes for one path would each list only their own)."""

    async def handle(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method  # Starlette adds HEAD
        return await handlers[method](request)

    return handle


def make_app(service: Service, token: str, hosts: set[str] | None = None) -> Starlette:
    """The ASGI app. ``hosts``: the Host headers accepted (the server fills it once bound)."""
    guard = Guard(token, hosts if hosts is not None else set())
    api = LocalAPI(service, guard)

    def route(path: str, handler: Handler, methods: list[str], *, auth: bool = True) -> Route:
        return Route(path, guard.wrap(handler, auth=auth), methods=methods)

    p = PREFIX
    routes = [
        route("/", api.page, ["GET"], auth=False),
        route(f"{p}/openapi.json", api.openapi, ["GET"], auth=False),
        route(f"{p}/library", by_method(GET=api.library, POST=api.add), ["GET", "POST"]),
        route(f"{p}/library/{{entry}}", api.entry, ["GET", "PATCH", "DELETE"]),
        route(f"{p}/library/{{entry}}/move", api.move, ["POST"]),
        route(f"{p}/jobs", by_method(GET=api.jobs, POST=api.new_job), ["GET", "POST"]),
        route(f"{p}/jobs/{{job}}", api.job, ["GET", "DELETE"]),
        route(f"{p}/jobs/{{job}}/{{verb}}", api.job_action, ["POST"]),
        route(f"{p}/updates/check", api.check_updates, ["POST"]),
        route(f"{p}/updates/apply", api.apply_update, ["POST"]),
        route(f"{p}/updates/history", api.update_history, ["GET"]),
        route(f"{p}/verify", api.verify, ["POST"]),
        route(f"{p}/verify/{{entry}}", api.verify_result, ["GET"]),
        route(f"{p}/settings", api.settings, ["GET", "PATCH"]),
        route(f"{p}/settings/schedule", api.schedule, ["GET"]),
        route(f"{p}/snapshot", api.snapshot, ["GET"]),
        route(f"{p}/events", api.events, ["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        fix = "see /api/v1/openapi.json for the routes and their methods"
        answer = error_json(exc.status_code, str(exc.detail), "http", fix)
        answer.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110)
        return answer

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.api = api
    return app


async def serve_api(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until cancelled (or ``shutdown`` is set); reports ``(host, port)``.

    ``host`` may be ``unix:/path`` for a Unix socket (port 0 is reported). Writes
    ``STATE/api.json`` with the URL clients use once bound, and removes it on the way out.
    """
    token = token if token is not None else service.state.api_token()
    hosts: set[str] = set()
    app = make_app(service, token, hosts)
    config = Config()
    unix = host.startswith("unix:")
    host = host if unix else host.strip("[]")  # "[::1]" as split from "[::1]:PORT"
    config.bind = [host if unix else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 75.0
    stop = trio.Event() if shutdown is None else shutdown
    url = ""
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    app,  # type: ignore[arg-type]
                    config,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            bound = 0 if unix else int(binds[0].rsplit(":", 1)[1])
            hosts.update(Guard.loopback_hosts(bound, host))
            url = f"http+{host}" if unix else f"http://{_url_host(host)}:{bound}"
            service.state.write_api_address(url)
            task_status.started((host, bound))
            await stop.wait()
            nursery.cancel_scope.cancel()
    finally:
        if url:
            service.state.clear_api_address(url)


def _url_host(host: str) -> str:
    """Where a client on this machine connects: a wildcard bind is reached on loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
