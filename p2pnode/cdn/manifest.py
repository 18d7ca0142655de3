"""Fetching a signed manifest: from a mirror's URL or a local path, never more than a manifest
may weigh.

The size bound comes first because nothing about the document can be trusted before it is
parsed and verified: a hostile or broken server must not make a node buffer gigabytes on the
way to a signature check that fails.
"""

from __future__ import annotations

import trio

from ..errors import ManifestError, TransportError, UsageError
from ..release import manifest as M

__all__ = ["MANIFEST_FETCH_LIMIT", "read_document", "read_manifest"]

#: The most a manifest document may weigh: the manifest's own limit plus its signed envelope.
MANIFEST_FETCH_LIMIT = M.MAX_MANIFEST_BYTES + 1024

#: Bounds on one manifest download: the whole of it, and any single network wait.
FETCH_SECONDS = 60
NETWORK_TIMEOUT = 30


async def read_manifest(location: str) -> bytes:
    """The signed manifest's bytes from a URL or a path, refusing oversized documents."""
    return await read_document(location, MANIFEST_FETCH_LIMIT, "manifest")


async def read_document(location: str, limit: int, what: str) -> bytes:
    """A signed document's bytes (a manifest, key rotations) from a URL or a path, refusing
    one over ``limit`` bytes."""
    if "://" not in location:
        try:
            with open(location, "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise UsageError(
                f"cannot read {what} {location}: {exc.strerror}",
                fix="pass a manifest URL or the path of a manifest.p2pm file",
            ) from exc
    else:
        data = await _http_get(location, limit)
    if len(data) > limit:
        raise ManifestError(f"{what} {location} is larger than {limit} bytes")
    return data


async def _http_get(url: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``url`` (one more than allowed tells the caller it was
    too large without reading all of it)."""
    import httpx  # not at module level: installs from peers or files never pay for it

    # A plain http:// URL has no TLS to verify (redirects are not followed); the default
    # verifying context loads the CA bundle, 0.2 s of every CDN install's start-up.
    verify = not url.lower().startswith("http://")
    try:
        with trio.fail_after(FETCH_SECONDS):
            async with (
                httpx.AsyncClient(timeout=NETWORK_TIMEOUT, verify=verify) as client,
                client.stream("GET", url) as resp,
            ):
                if resp.status_code != 200:
                    raise TransportError(
                        f"GET {url} answered HTTP {resp.status_code}",
                        fix="check the manifest URL (is the release published there?)",
                    )
                buf = bytearray()
                async for part in resp.aiter_bytes():
                    buf += part
                    if len(buf) > limit:
                        break
                return bytes(buf)
    except trio.TooSlowError as exc:
        raise TransportError(f"GET {url} timed out") from exc
    except httpx.HTTPError as exc:
        raise TransportError(f"GET {url} failed: {exc!r}") from exc
