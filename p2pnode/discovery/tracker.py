"""The node side of the tracker: publish, the update feed, signed announces and reports.

Theory of operation
-------------------
A thin httpx-on-trio client over the contract in docs/tracker-api.md. The caller may inject an
``httpx.AsyncClient`` (tests pass one whose transport is the tracker app itself); otherwise one is
made per ``TrackerClient`` and closed by ``aclose``.

Nothing the tracker says is trusted for integrity: :meth:`TrackerClient.fetch_manifest` checks
the returned bytes are the manifest whose id was asked for (the caller still runs
``manifest.verify`` against its pinned keys), and :class:`TrackerPeerSource` only returns peers
whose DHT peer records (signed by the peers themselves) verify, exactly like a DHT lookup.

Announces and reports are JSON bodies signed verbatim with the node's key (the wire types and
domain tags are in :mod:`.tracker_api`, shared with the tracker), each with a fresh timestamp and
random nonce.

Errors: a tracker that cannot be reached or answers 5xx raises :class:`TrackerError`; a 4xx
raises :class:`TrackerRefusedError` carrying the tracker's error code, message and fix. Timeouts
are the caller's cancel scopes, except the long-poll which bounds itself with ``wait``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import __version__
from ..errors import P2PNodeError, TrackerError, TrackerRefusedError
from ..release import keys
from ..release.manifest import parse_signed
from .dht.records import PeerRecord, Topic, make_record, parse_record
from .tracker_api import (
    ANNOUNCE_DOMAIN,
    CLIENT_FIELD,
    OUTCOME_DOMAIN,
    OUTCOME_SPLIT_FIELDS,
    REPORT_DOMAIN,
    SESSION_HEADER,
    SIGNATURE_HEADER,
    ChannelHead,
    TrackerPeer,
    sign_body,
)

__all__ = [
    "ANNOUNCE_DOMAIN",
    "REPORT_DOMAIN",
    "AnnounceResult",
    "ChannelHead",
    "PeerQualityReport",
    "TrackerClient",
    "TrackerError",
    "TrackerPeer",
    "TrackerPeerSource",
    "TrackerRefusedError",
    "sign_body",
]

#: How long one long-poll asks the tracker to hold the request (it caps at 60).
LONG_POLL_S = 25.0


@dataclass(frozen=True, slots=True)
class AnnounceResult:
    interval: int
    min_interval: int
    seeders: int
    leechers: int
    peers: list[TrackerPeer]


@dataclass(frozen=True, slots=True)
class PeerQualityReport:
    """What this node saw of one peer since its last report."""

    node_id: bytes
    bytes: int = 0
    rate: int = 0
    failures: int = 0
    corrupt: int = 0


class TrackerClient:
    """Talk to one tracker at ``base_url``.

    Args:
        base_url: e.g. ``http://127.0.0.1:7070``.
        token: publisher or admin token for publish/promote/rollback/app registration.
        client: an httpx client to use (not closed by us); default: our own.
    """

    def __init__(
        self, base_url: str, *, token: str | None = None, client: httpx.AsyncClient | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._own = client is None
        self._http = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=90.0))
        #: the tracker's fast announce listener, once an answer advertised it (announce_port)
        self.announce_url: str | None = None
        #: announce session per node key: (token, monotonic time to stop using it)
        self._sessions: dict[bytes, tuple[str, float]] = {}
        #: optional announce fields the tracker said it accepts (``announce_fields``): sent
        #: only then, since trackers older than a field refuse it
        self._accepted_fields: frozenset[str] = frozenset()
        #: optional outcome fields the tracker said it accepts (``outcome_fields``), likewise
        self._outcome_fields: frozenset[str] = frozenset()
        #: the last announce left out the client version that its answer says the tracker
        #: takes (:attr:`owes_client_version`)
        self._owes_client = False

    @property
    def owes_client_version(self) -> bool:
        """The last announce was this client's first to the tracker, so it went without the
        client version (sent only once an answer lists the field), and the answer lists it.
        A node that announces again anyway sends it then; a one-off install, whose completion
        announce is its only one, re-announces once so the fleet view learns its version
        (``tracking.announce_completed``)."""
        return self._owes_client

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> TrackerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        auth: bool = False,
        url: str | None = None,
    ) -> httpx.Response:
        hdrs = dict(headers or {})
        if auth:
            if not self.token:
                raise TrackerRefusedError(
                    f"{method} {path} needs a token",
                    status=401,
                    code="unauthorized",
                    fix="pass --token (the publisher token from `tracker app add`)",
                )
            hdrs["Authorization"] = f"Bearer {self.token}"
        if json_body is not None:
            content = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        if url is None:
            url = self.base_url + path
        else:
            path = httpx.URL(url).path
        try:
            resp = await self._http.request(
                method, url, content=content, headers=hdrs, params=params
            )
        except httpx.HTTPError as exc:
            raise TrackerError(f"tracker {self.base_url} unreachable: {exc!r}") from exc
        if resp.status_code >= 500:  # with the tracker's own account of why, when it gives one
            why, fix = f"HTTP {resp.status_code}", None
            try:
                err = resp.json()
                why, fix = f"HTTP {resp.status_code}: {err['message']}", str(err["fix"])
            except (ValueError, KeyError, TypeError):
                pass
            raise TrackerError(f"tracker {self.base_url} failed: {why}", fix=fix)
        if resp.status_code >= 400:
            try:
                err = resp.json()
                raise TrackerRefusedError(
                    f"tracker refused {method} {path}: {err['message']}",
                    status=resp.status_code,
                    code=str(err["error"]),
                    fix=str(err["fix"]),
                )
            except (ValueError, KeyError, TypeError):
                raise TrackerRefusedError(
                    f"tracker refused {method} {path}: HTTP {resp.status_code}",
                    status=resp.status_code,
                    code="http_error",
                ) from None
        return resp

    # ------------------------------------------------------------------ publishers

    async def add_app(self, app: str, key: bytes) -> dict[str, Any]:
        """Register ``app`` with its publisher key (admin token). Returns the publisher token."""
        resp = await self._request(
            "POST",
            "/v1/apps",
            json_body={"app": app, "key": keys.format_public_key(key)},
            auth=True,
        )
        return dict(resp.json())

    async def rotate_key(self, app: str, signed_rotation: bytes) -> dict[str, Any]:
        """Hand the tracker a key rotation of ``app`` (release/rotation.py, signed by the old
        key); from then on it takes builds signed by the new key, and the old key's until the
        rotation's date. Returns the app's current key."""
        resp = await self._request(
            "POST",
            f"/v1/apps/{app}/rotations",
            content=signed_rotation,
            headers={"Content-Type": "application/x-p2pnode-rotation"},
            auth=True,
        )
        return dict(resp.json())

    async def rotations(self, app: str) -> bytes:
        """The app's key rotations, as a rotations document (what nodes and CDNs serve)."""
        return (await self._request("GET", f"/v1/apps/{app}/rotations")).content

    async def rotate_token(self, app: str) -> str:
        """A new publisher token for ``app`` (admin or its current publisher token); the old
        one stops working."""
        resp = await self._request("POST", f"/v1/apps/{app}/token", auth=True)
        return str(resp.json()["publisher_token"])

    async def publish(
        self, app: str, channel: str, signed_manifest: bytes, *, rollout: float | None = None
    ) -> dict[str, Any]:
        """Publish; with ``rollout`` (a percentage) only that share of the channel's nodes is
        offered the build at first (a staged rollout: :meth:`change_rollout`)."""
        resp = await self._request(
            "POST",
            f"/v1/apps/{app}/channels/{channel}/manifests",
            content=signed_manifest,
            headers={"Content-Type": "application/x-p2pnode-manifest"},
            params=None if rollout is None else {"rollout": rollout},
            auth=True,
        )
        return dict(resp.json())

    async def change_rollout(
        self, app: str, channel: str, action: str, **fields: float | int
    ) -> dict[str, Any]:
        """``raise`` (``percent=``), ``halt``, ``resume`` or ``complete`` the channel's staged
        rollout (``threshold=``, ``min_outcomes=`` set its automatic halt); its new state."""
        resp = await self._request(
            "POST",
            f"/v1/apps/{app}/channels/{channel}/rollout",
            json_body={"action": action, **fields},
            auth=True,
        )
        return dict(resp.json())

    async def promote(self, app: str, channel: str, manifest_id: bytes) -> ChannelHead:
        resp = await self._request(
            "POST",
            f"/v1/apps/{app}/channels/{channel}/promote",
            json_body={"manifest_id": manifest_id.hex()},
            auth=True,
        )
        return ChannelHead.from_json(resp.json())

    async def rollback(
        self, app: str, channel: str, manifest_id: bytes | None = None
    ) -> ChannelHead:
        body = {} if manifest_id is None else {"manifest_id": manifest_id.hex()}
        resp = await self._request(
            "POST", f"/v1/apps/{app}/channels/{channel}/rollback", json_body=body, auth=True
        )
        return ChannelHead.from_json(resp.json())

    async def history(self, app: str, channel: str) -> list[dict[str, Any]]:
        resp = await self._request("GET", f"/v1/apps/{app}/channels/{channel}/history")
        return list(resp.json()["history"])

    # ------------------------------------------------------------------ update feed

    async def latest(
        self,
        app: str,
        channel: str,
        *,
        since: int | None = None,
        wait: float = 0.0,
        node: bytes | None = None,
        have: bytes | None = None,
    ) -> ChannelHead | None:
        """The channel head; with ``since``, held by the tracker up to ``wait`` s until it
        moves past ``since``. ``None`` when nothing is published yet. ``node`` (this node's
        id) and ``have`` (the manifest it runs) get the build a staged rollout offers it."""
        params: dict[str, Any] = {}
        if since is not None:
            params = {"since": since, "wait": wait}
        if node is not None:
            params["node"] = node.hex()
        if have is not None:
            params["have"] = have.hex()
        try:
            resp = await self._request("GET", f"/v1/apps/{app}/channels/{channel}", params=params)
        except TrackerRefusedError as exc:
            if exc.status == 404 and exc.code == "not_found" and "nothing is published" in str(exc):
                return None
            raise
        return ChannelHead.from_json(resp.json())

    async def wait_for_release(
        self,
        app: str,
        channel: str,
        *,
        since: int = 0,
        node: bytes | None = None,
        have: bytes | None = None,
        wait: float = LONG_POLL_S,
        on_head: Callable[[ChannelHead], Awaitable[None]] | None = None,
    ) -> ChannelHead:
        """Long-poll until the channel's head has a seq above ``since``; returns it (for
        ``node``: see :meth:`latest`). Unbounded: wrap it in ``trio.move_on_after``/
        ``fail_after``. ``wait``: how long each poll asks the tracker to hold it (a daemon
        following many channels asks for longer). ``on_head``: shown every answer, the
        unchanged ones too (what a head says besides its build: ``key_chain``)."""
        while True:
            head = await self.latest(app, channel, since=since, wait=wait, node=node, have=have)
            if head is not None and on_head is not None:
                await on_head(head)
            if head is not None and head.seq > since:
                return head
            if head is None:
                await trio.sleep(1.0)  # a tracker that cannot hold the request: poll gently

    async def fetch_manifest(self, manifest_id: bytes) -> bytes:
        """The signed manifest bytes; checked to be the manifest named ``manifest_id``."""
        resp = await self._request("GET", f"/v1/manifests/{manifest_id.hex()}")
        data = resp.content
        try:
            signed = parse_signed(data, source=f"manifest from {self.base_url}")
        except P2PNodeError as exc:
            raise TrackerError(f"tracker served a broken manifest: {exc.message}") from exc
        if signed.id != manifest_id:
            raise TrackerError(
                f"tracker served manifest {signed.id.hex()} when asked for {manifest_id.hex()}",
                fix="the tracker is broken or hostile; use another tracker",
            )
        return data

    async def dht_bootstrap(self) -> list[str]:
        """DHT nodes (HOST:PORT) the tracker's operator hands out; at most 32, each checked."""
        from .dht.node import parse_hostport

        resp = await self._request("GET", "/v1/dht/bootstrap")
        nodes = resp.json().get("nodes")
        if not isinstance(nodes, list):
            raise TrackerError("tracker answered /v1/dht/bootstrap without a node list")
        out = []
        for text in nodes[:32]:
            if isinstance(text, str):
                try:
                    parse_hostport(text)
                except P2PNodeError:
                    continue
                out.append(text)
        return out

    # ------------------------------------------------------------------ node messages

    async def announce(
        self,
        key: Ed25519PrivateKey,
        *,
        app: str,
        manifest_id: bytes,
        port: int,
        event: str = "update",
        size: int = 0,
        left: int = 0,
        from_peers: int = 0,
        from_cdn: int = 0,
        uploaded: int = 0,
        numwant: int = 30,
        ip: str | None = None,
        records: Sequence[bytes] = (),
    ) -> AnnounceResult:
        fields: dict[str, Any] = {
            "app": app,
            "manifest": manifest_id.hex(),
            "port": port,
            "event": event,
            "size": size,
            "left": left,
            "from_peers": from_peers,
            "from_cdn": from_cdn,
            "uploaded": uploaded,
            "numwant": numwant,
        }
        if ip is not None:
            fields["ip"] = ip
        if records:
            fields["records"] = [r.hex() for r in records]
        sent_client = CLIENT_FIELD in self._accepted_fields
        if sent_client:
            fields[CLIENT_FIELD] = __version__  # for the tracker's fleet view
        body, sig = sign_body(key, ANNOUNCE_DOMAIN, fields)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sig}
        public = keys.public_key_bytes(key)
        session = self._sessions.get(public)
        if session is not None and time.monotonic() < session[1]:
            headers[SESSION_HEADER] = session[0]  # spares the tracker a signature check
        resp = None
        if self.announce_url is not None:
            try:
                resp = await self._request(
                    "POST", "", content=body, headers=headers, url=self.announce_url
                )
            except TrackerRefusedError:
                raise
            except TrackerError:
                # the fast listener is gone (the tracker restarted without it?): fall back to
                # the main port for good; should the listener have applied this body before
                # failing, the main port refuses it as a replay (409), which is the truth
                self.announce_url = None
        if resp is None:
            resp = await self._request("POST", "/v1/announce", content=body, headers=headers)
        d = resp.json()
        self._learn_announce_port(d.get("announce_port"))
        accepted = d.get("announce_fields")
        if isinstance(accepted, list):
            self._accepted_fields = frozenset(f for f in accepted[:16] if isinstance(f, str))
        self._owes_client = not sent_client and CLIENT_FIELD in self._accepted_fields
        accepted = d.get("outcome_fields")
        if isinstance(accepted, list):
            self._outcome_fields = frozenset(f for f in accepted[:16] if isinstance(f, str))
        token, ttl = d.get("session"), d.get("session_ttl")
        if isinstance(token, str) and len(token) <= 64 and isinstance(ttl, int) and ttl > 0:
            # stop a minute early: a token expiring in flight costs the tracker a check, no more
            self._sessions[public] = (token, time.monotonic() + max(0, ttl - 60))
        peers = [TrackerPeer.from_json(p) for p in d["peers"]]
        return AnnounceResult(
            interval=int(d["interval"]),
            min_interval=int(d["min_interval"]),
            seeders=int(d["seeders"]),
            leechers=int(d["leechers"]),
            peers=peers,
        )

    def _learn_announce_port(self, port: Any) -> None:
        """Use the fast announce listener the tracker advertises, on the same host."""
        if self.announce_url is not None or type(port) is not int or not 0 < port < 65536:
            return
        url = httpx.URL(self.base_url)
        self.announce_url = str(url.copy_with(port=port, path="/v1/announce"))

    async def report(self, key: Ed25519PrivateKey, entries: Iterable[PeerQualityReport]) -> int:
        peers = [
            {
                "node_id": e.node_id.hex(),
                "bytes": e.bytes,
                "rate": e.rate,
                "failures": e.failures,
                "corrupt": e.corrupt,
            }
            for e in entries
        ]
        body, sig = sign_body(key, REPORT_DOMAIN, {"peers": peers})
        resp = await self._request(
            "POST",
            "/v1/report",
            content=body,
            headers={"Content-Type": "application/json", SIGNATURE_HEADER: sig},
        )
        return int(resp.json()["accepted"])

    async def report_outcome(self, key: Ed25519PrivateKey, fields: dict[str, Any]) -> None:
        """Send one install outcome (``POST /v1/outcomes``; ``fields`` as docs/tracker-api.md
        lists them), signed like announces. The optional fields of ``OUTCOME_SPLIT_FIELDS``
        are left out unless an announce answer of this tracker listed them (an older tracker
        refuses them)."""
        fields = {
            k: v
            for k, v in fields.items()
            if k not in OUTCOME_SPLIT_FIELDS or k in self._outcome_fields
        }
        body, sig = sign_body(key, OUTCOME_DOMAIN, fields)
        await self._request(
            "POST",
            "/v1/outcomes",
            content=body,
            headers={"Content-Type": "application/json", SIGNATURE_HEADER: sig},
        )


class TrackerPeerSource:
    """Peers from the tracker, as verified DHT peer records (a ``dht.discovery.PeerSource``).

    Each call announces this node (attaching its own freshly signed records for the manifest and
    app topics) and keeps, from the answer, only peers whose attached records verify and name
    the topic; the tracker ranks them but cannot forge one.

    Args:
        client: the tracker client.
        key: this node's key.
        host, port: where this node serves the swarm (as in its DHT records); with no host,
            the tracker uses the address it sees and no records are attached.
        progress: a callable returning (size, left, from_peers, from_cdn, uploaded) for a
            manifest id, so announces carry real progress; default says "nothing yet".
    """

    name = "tracker"

    def __init__(
        self,
        client: TrackerClient,
        key: Ed25519PrivateKey,
        host: str | None,
        port: int,
        *,
        record_ttl: float = 1800.0,
        progress: Any = None,
    ) -> None:
        self.client = client
        self.key = key
        self.host = host
        self.port = port
        self.record_ttl = record_ttl
        self.progress = progress
        self._mine: dict[bytes, tuple[float, list[bytes]]] = {}

    def _own_records(self, manifest_id: bytes, app: str, now: float) -> list[bytes]:
        """Our records for the two topics, re-signed only when half expired: the same bytes
        on every announce let the tracker skip verifying them again."""
        if self.host is None:
            return []
        cached = self._mine.get(manifest_id)
        if cached is not None and now < cached[0]:
            return cached[1]
        records = [
            make_record(self.key, topic, self.host, self.port, now=now, ttl=self.record_ttl)
            for topic in (Topic.manifest(manifest_id), Topic.app(app))
        ]
        self._mine[manifest_id] = (now + self.record_ttl / 2, [r.encoded for r in records])
        return self._mine[manifest_id][1]

    async def find_peers(self, manifest_id: bytes, app: str) -> list[PeerRecord]:
        now = time.time()
        mine = self._own_records(manifest_id, app, now)
        size, left, fp, fc, up = self.progress(manifest_id) if self.progress else (0, 0, 0, 0, 0)
        result = await self.client.announce(
            self.key,
            app=app,
            manifest_id=manifest_id,
            port=self.port,
            ip=self.host,
            size=size,
            left=left,
            from_peers=fp,
            from_cdn=fc,
            uploaded=up,
            numwant=50,
            records=mine,
        )
        wanted = {Topic.manifest(manifest_id), Topic.app(app)}
        out: list[PeerRecord] = []
        for peer in result.peers:
            for raw in peer.records:
                try:
                    rec = parse_record(raw, now=now)
                except P2PNodeError:
                    continue
                if rec.public_key == peer.public_key and rec.topic in wanted:
                    out.append(rec)
        # the requested build's records first (the tracker already ranked by quality)
        out.sort(key=lambda r: r.topic != Topic.manifest(manifest_id))
        return out
