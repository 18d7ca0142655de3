"""Small helpers of the request handlers: bodies under a cap, query parameters, errors."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import APIError, BadRequest, TooLarge, Unavailable

__all__ = ["asset", "error_response", "query_float", "query_int", "read_body"]


def asset(name: str) -> bytes:
    """A file of the dashboard (package data under ``tracker/static``)."""
    return resources.files("tracker").joinpath("static", name).read_bytes()


def error_response(
    err: APIError | Unavailable, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error every refusal and outage is answered with (docs/tracker-api.md)."""
    return JSONResponse(
        {"error": err.code, "message": err.message, "fix": err.fix},
        status_code=err.status,
        headers=headers,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError as exc:
            raise BadRequest("Content-Length is not a number") from exc
        if n > limit:
            raise TooLarge(f"request body of {n} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def query_int(request: Request, name: str, lo: int, hi: int) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name} must be an integer") from exc
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name} must be in [{lo}, {hi}]")
    return value


def query_float(request: Request, name: str, lo: float, hi: float) -> float:
    text = request.query_params.get(name)
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name} must be a number") from exc
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name} must be in [{lo}, {hi}]")
    return value
