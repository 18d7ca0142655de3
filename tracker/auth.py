"""Who may do what: the admin token, and the publisher token each app got when registered.

Tokens travel as ``Authorization: Bearer <token>``. The admin token is compared in constant
time; publisher tokens are stored only as their blake3 hash (``AppRow.token_hash``), so a copy
of the registry does not hand out publishing rights.
"""

from __future__ import annotations

import hmac

import blake3
from starlette.requests import Request

from .backend import AppRow
from .errors import Unauthorized

__all__ = ["require_admin", "require_publisher", "token_hash", "token_id"]


def token_hash(token: str) -> bytes:
    return blake3.blake3(token.encode()).digest()


def token_id(request: Request, admin_token: str) -> str:
    """Who a request's token is, for the audit log, never the token: ``admin``, or the first
    8 hex digits of its hash (a publisher token's ``token_hash`` starts with them); empty when
    the request carries none."""
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        return ""
    token = header[len("Bearer ") :].strip()
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return "admin"
    return "t-" + token_hash(token)[:4].hex()


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        raise Unauthorized("this request needs a token")
    return header[len("Bearer ") :].strip()


def require_admin(request: Request, admin_token: str) -> str:
    """The actor (``admin``) if the request carries the admin token; else 401."""
    token = _bearer(request)
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise Unauthorized("the admin token is wrong", fix="pass the tracker's --admin-token")
    return "admin"


def require_publisher(request: Request, admin_token: str, app: str, row: AppRow | None) -> str:
    """The actor (``admin`` or ``publisher``) if the request carries the admin token or the
    publisher token of ``app`` (its registry ``row``); else 401."""
    token = _bearer(request)
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return "admin"
    if row is not None and hmac.compare_digest(token_hash(token), row.token_hash):
        return "publisher"
    raise Unauthorized(
        f"the token is neither the admin token nor {app}'s publisher token",
        fix="use the publisher token printed by `tracker app add`, or by the latest "
        "`tracker app rotate-token` (a rotated token is refused from then on)",
    )
