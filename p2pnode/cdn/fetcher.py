"""Fetching chunks from CDN mirrors with HTTP range requests (or from local directories).

Theory of operation
-------------------
:class:`CDNFetcher` is a thin trio shell around :class:`p2pnode.cdn.plan.FetchPlan`, which makes
every decision (which chunks go together in one range, how big a range, which mirror, when to
retry, when to give up). ``connections`` worker tasks loop: ask the plan for a job, perform it,
report. A job is one ``GET`` with ``Range: bytes=start-end`` for a run of chunks adjacent in one
file; the body is received straight into one buffer per chunk (the transport's ``readinto``:
the kernel's copy is the only one), and each full chunk is hashed with blake3 (in a thread,
which releases the GIL) and handed to ``deliver`` while the next one is being received.
Nothing holds a whole range; memory is at most ``CHECKS_PER_CONNECTION`` chunks per
connection waiting for their check, plus the one being received.

Every failure is translated at this boundary into a *kind* (``connect``, ``timeout``, ``slow``,
``reset``, ``truncated``, ``http_503``, ``http_416``, ``size_mismatch``, ``bad_range``, ...)
that the plan turns into a retry elsewhere or later, a cooldown, or a permanent exclusion;
the counts land in :class:`FetchStats`. Bytes that fail blake3 are never delivered.

Timeouts are trio cancel scopes: ``connect_timeout`` bounds connecting plus the response
headers, ``read_timeout`` bounds every single body read, and a server that keeps the
connection alive by drip-feeding is abandoned when its speed over ``speed_window`` seconds of
*network* time (time spent waiting on our own rate limiter does not count) is below
``min_speed``.

What the server has pushed into socket buffers but the process has not verified is bounded by
the plan's in-flight budget (proportional to the rate); with a rate cap the socket receive
buffer is capped too, so a ``kill -9`` costs at most a fraction of a second of transfer.

Servers that ignore ``Range`` and answer 200 are read once per file: the body becomes the
file's stream, and every chunk of that file still wanted is kept as it passes (the plan claims
them), the bytes between them read and dropped (counted in ``bytes_received``); such a mirror
then ranks below ones that honour Range. ETag changes between requests to the same file are
counted; they cannot cause harm, because each chunk is verified on its own, and a file whose
content really changed fails blake3 and is fetched elsewhere. A size that differs from the
manifest's (``Content-Range`` total, ``Content-Length`` of a 200, a local file's size)
excludes the mirror for that file.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import blake3
import httpx
import trio

from ..errors import CDNError
from ..ratelimit import RateLimiter
from ..release import layout
from .buffers import BufferPool
from .drain import DRAIN
from .plan import DONE, FetchPlan, Job, PlanParams, Wait
from .ranges import ChunkRequest, parse_content_range
from .transport import READINTO, RangeTransport

__all__ = ["CDNFetcher", "CDNOptions", "ChunkRequest", "FetchStats", "MirrorStats", "make_client"]

#: ``deliver(req, data)``: ``data`` may be a view of a buffer the fetcher reuses once
#: ``deliver`` returns (write it, hash it, or copy what you keep).
Deliver = Callable[[ChunkRequest, bytes | memoryview], Awaitable[None]]
#: ``store(req, data)``: the same, but synchronous and run in the worker thread that verified
#: the chunk (saves a second hop into a thread for a caller that writes chunks to disk).
Store = Callable[[ChunkRequest, bytes | memoryview], None]

#: Chunks at least this big are hashed in a worker thread: blake3 releases the GIL, so the
#: event loop keeps reading sockets meanwhile. Below it the thread hop costs more than it saves.
HASH_IN_THREAD_BYTES = 256 * 1024
#: Received chunks waiting for their hash and ``deliver``, over all connections, per
#: connection: reading goes on meanwhile, up to this many (memory: this many chunks).
CHECKS_PER_CONNECTION = 2
#: Scratch buffer for body bytes that are read and dropped (a whole-file answer's gaps).
DISCARD_BYTES = 1 << 20


@dataclass(frozen=True)
class CDNOptions(PlanParams):
    """Knobs of :class:`CDNFetcher`: the plan's (:class:`PlanParams`, passed to it as they
    are) and the shell's own. Durations are seconds.

    Attributes:
        connect_timeout: connecting and receiving the response headers.
        read_timeout: the longest wait for any single piece of body.
        min_speed, speed_window: a response slower than ``min_speed`` bytes/s over
            ``speed_window`` seconds of network time is abandoned (defends against
            drip-feeding servers).
        seed: seeds the jitter (tests); None = random.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 15.0
    min_speed: int = 16 * 1024
    speed_window: float = 5.0
    seed: int | None = None


@dataclass
class MirrorStats:
    bytes: int = 0  # body bytes received from this mirror
    delivered: int = 0  # verified chunk bytes from this mirror
    requests: int = 0
    failures: int = 0  # requests that ended in a failure
    hash_failures: int = 0  # chunks whose bytes failed blake3
    faults: dict[str, int] = field(default_factory=dict)  # kind -> count


@dataclass
class FetchStats:
    bytes_received: int = 0  # every body byte read off the wire (or disk), kept or discarded
    bytes_delivered: int = 0  # verified chunk bytes handed to ``deliver``
    chunks_delivered: int = 0
    chunks_failed: int = 0
    requests: int = 0
    retries: int = 0  # chunks put back in the queue after a failure
    hash_failures: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # kind -> count, over all mirrors
    per_mirror: dict[str, MirrorStats] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, mirror: str, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1
        ms = self.per_mirror[mirror]
        ms.faults[kind] = ms.faults.get(kind, 0) + 1


class _JobFailure(Exception):
    """Internal: a job ended for ``kind``; never escapes :class:`CDNFetcher`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _digest(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def _check_and_store(req: ChunkRequest, data: bytes | memoryview, store: Store | None) -> bool:
    if len(data) != req.length or _digest(data) != req.id:
        return False
    if store is not None:
        store(req, data)
    return True


def _local_root(mirror: str) -> Path | None:
    """The directory of a local mirror (a path or ``file://`` URL); None for HTTP(S)."""
    if mirror.startswith("file://"):
        return Path(unquote(urlsplit(mirror).path))
    if "://" in mirror:
        return None
    return Path(mirror)


def make_client(options: CDNOptions) -> httpx.AsyncClient:
    """The HTTP client a fetch uses (one per :meth:`CDNFetcher.fetch` unless one is passed:
    the swarm's CDN batches share one, so they reuse its connections)."""
    o = options
    socket_options = []
    if o.max_download_rate is not None:
        # Autotuning would let the kernel accept megabytes we have not read (and that a
        # killed process loses); size the window to this connection's share of the budget.
        share = o.max_download_rate * o.target_seconds / max(1, o.connections)
        rcvbuf = int(min(4 * 2**20, max(64 * 1024, share)))
        socket_options.append((socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf))
    transport = RangeTransport(max_connections=o.connections, socket_options=socket_options)
    # Timeouts are our cancel scopes; proxies from the environment are not wanted for a
    # loopback origin and a CDN alike (the mirror URL says where to go).
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(None),
        headers={"Accept-Encoding": "identity"},
        follow_redirects=True,
        trust_env=False,
    )


class _BodyReader:
    """A response body read into the caller's buffers: through the transport's
    ``readinto`` when it offers one (no copy in Python), else from ``aiter_raw``'s pieces
    (one copy; other transports, chunked bodies). Also holds the job's speed window."""

    def __init__(self, response: httpx.Response) -> None:
        self._readinto: Callable[[memoryview], Awaitable[int]] | None = response.extensions.get(
            READINTO
        )
        self._pieces = response.aiter_raw() if self._readinto is None else None
        self._rest = memoryview(b"")
        self.net = 0.0  # seconds spent waiting on the network in this speed window
        self.window = 0  # bytes received in it

    async def readinto(self, view: memoryview) -> int:
        if self._readinto is not None:
            return await self._readinto(view)
        assert self._pieces is not None
        while not self._rest:
            try:
                self._rest = memoryview(await self._pieces.__anext__())
            except StopAsyncIteration:
                return 0
        n = min(len(view), len(self._rest))
        view[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n

    async def aclose(self) -> None:
        if self._pieces is not None:
            await self._pieces.aclose()  # type: ignore[attr-defined]


class CDNFetcher:
    """Fetches chunks of one release (``app``, ``build``) from ``mirrors``.

    Args:
        app, build: which release; file URLs are ``mirror + layout.file_path(app, build, path)``.
        area: which of the release's folders paths name: ``files``, or ``patches`` to fetch
            patches from the pack (content-addressed and verified exactly like chunks).
        mirrors: mirror roots: ``http(s)://`` URLs, local directories or ``file://`` URLs.
        file_sizes: release path -> size from the manifest (checked against every response).
        options: see :class:`CDNOptions`.
        client: an ``httpx.AsyncClient`` to use (tests inject transports); by default one is
            made per :meth:`fetch` with a pool of ``options.connections`` connections.
        on_bytes: called with the size of every piece of body as it arrives (progress).
    """

    def __init__(
        self,
        *,
        app: str,
        build: int,
        mirrors: Sequence[str],
        file_sizes: Mapping[str, int],
        options: CDNOptions | None = None,
        client: httpx.AsyncClient | None = None,
        on_bytes: Callable[[int], None] | None = None,
        limiter: RateLimiter | None = None,
        area: str = "files",
    ) -> None:
        if not mirrors:
            raise CDNError("no mirror to fetch from", fix="pass --mirror BASE_URL")
        self.app = app
        self.build = build
        self.area = area
        self.mirrors = [m if m.endswith("/") or _local_root(m) else m + "/" for m in mirrors]
        self.file_sizes = dict(file_sizes)
        self.options = options or CDNOptions()
        self._client = client
        self._on_bytes = on_bytes
        self._shared_limiter = limiter  # a node-wide download cap shared with the swarm
        self._changed = trio.Event()
        self._etags: dict[tuple[int, str], str] = {}
        #: The last (or running) fetch's figures; read them also after a fetch that raised.
        self.stats = FetchStats(per_mirror={m: MirrorStats() for m in self.mirrors})

    # -- public ------------------------------------------------------------------------------

    async def fetch(
        self,
        requests: Sequence[ChunkRequest],
        deliver: Deliver | None,
        *,
        store: Store | None = None,
    ) -> FetchStats:
        """Fetch every chunk in ``requests`` and await ``deliver(req, data)`` once for each,
        with ``data`` verified against ``req.id``, in any order; ``store(req, data)`` (if
        given) runs first, in a worker thread. ``deliver`` may be None when ``store`` is all
        the caller needs.

        Raises:
            ValueError: a request names a path ``file_sizes`` lacks (a bug in the caller).
            CDNError: some chunk could not be had from any mirror (after every other chunk
                that could be fetched was delivered); names the chunk, its file, and why per
                mirror.
        Cancellation stops every request promptly; delivered chunks stay delivered.
        """
        o = self.options
        for r in requests:
            if r.path not in self.file_sizes:
                raise ValueError(  # misuse: the caller's requests do not match its file_sizes
                    f"chunk {r.id.hex()[:12]} names {r.path!r}, which is not in the release"
                )
        start = trio.current_time()
        rng = random.Random(o.seed)
        self._plan = FetchPlan(
            requests,
            self.mirrors,
            o,
            now=start,
            rng=rng,
        )
        self._limiter = self._shared_limiter or RateLimiter(o.max_download_rate)
        self.stats = FetchStats(per_mirror={m: MirrorStats() for m in self.mirrors})
        self._deliver = deliver
        self._store = store
        self._checks = trio.Semaphore(CHECKS_PER_CONNECTION * max(1, o.connections))
        self._buffers = BufferPool(CHECKS_PER_CONNECTION * max(1, o.connections) * 2**20)
        self._etags.clear()
        client = self._client
        own_client = client is None and any(_local_root(m) is None for m in self.mirrors)
        if own_client:
            client = self._make_client()
        self._http = client
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(max(1, o.connections)):
                    nursery.start_soon(self._worker)
        finally:
            if own_client and client is not None:
                with trio.CancelScope(shield=True):
                    await client.aclose()
            self.stats.seconds = trio.current_time() - start
            self.stats.retries = self._plan.retries
            self.stats.chunks_failed = len(self._plan.failed)
        if self._plan.failed:
            raise self._error()
        return self.stats

    # -- plumbing ----------------------------------------------------------------------------

    def _make_client(self) -> httpx.AsyncClient:
        return make_client(self.options)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _worker(self) -> None:
        plan = self._plan
        drain = DRAIN.get()
        while True:
            if drain is not None and drain.requested:
                await trio.sleep_forever()  # no new request; the drain's owner cancels us
            action = plan.next_action(trio.current_time())
            if action is DONE:
                self._notify()  # let the others see it too
                return
            if isinstance(action, Wait):
                changed = self._changed
                deadline = action.until if action.until is not None else float("inf")
                with trio.move_on_at(deadline):
                    await changed.wait()
                continue
            assert isinstance(action, Job)
            if drain is None:
                await self._run(action)
            else:
                drain.begin()
                try:
                    await self._run(action)
                finally:
                    drain.end()
            self._notify()

    async def _run(self, job: Job) -> None:
        ms = self.stats.per_mirror[job.url]
        ms.requests += 1
        self.stats.requests += 1
        kind: str | None = None
        detail = ""
        root = _local_root(job.url)
        try:
            if root is None:
                await self._run_http(job)
            else:
                await self._run_local(job, root)
        except _JobFailure as exc:
            kind, detail = exc.kind, exc.detail
        except httpx.ConnectError as exc:
            kind, detail = "connect", f"cannot connect ({exc or type(exc).__name__})"
        except httpx.RemoteProtocolError as exc:
            text = str(exc)
            kind = "truncated" if "complete message body" in text else "protocol"
            detail = f"{kind}: {text}"
        except (httpx.ReadError, httpx.WriteError, httpx.NetworkError) as exc:
            kind, detail = "reset", f"connection broke: {exc or type(exc).__name__}"
        except httpx.HTTPError as exc:
            kind, detail = "http_error", f"{type(exc).__name__}: {exc}"
        except OSError as exc:  # local mirrors
            kind, detail = "local_io", f"{exc.strerror or exc}"
        if kind is not None:
            ms.failures += 1
            self.stats.count(job.url, kind)
        self._plan.job_finished(job, trio.current_time(), kind=kind, detail=detail)

    def _account(self, job: Job, n: int) -> None:
        self.stats.bytes_received += n
        self.stats.per_mirror[job.url].bytes += n
        self._plan.job_bytes(job, n, trio.current_time())
        if self._on_bytes is not None:
            self._on_bytes(n)

    async def _verify_and_deliver(
        self, job: Job, req: ChunkRequest, data: bytes | memoryview
    ) -> None:
        if len(data) >= HASH_IN_THREAD_BYTES or self._store is not None:
            ok = await trio.to_thread.run_sync(_check_and_store, req, data, self._store)
        else:
            ok = _check_and_store(req, data, None)
        if not ok:
            self.stats.hash_failures += 1
            self.stats.per_mirror[job.url].hash_failures += 1
            self.stats.count(job.url, "hash")
            self._plan.chunk_bad(job, req, trio.current_time())
            self._notify()
            return
        self._plan.chunk_ok(job, req)
        self._notify()  # the budget has room again
        self.stats.bytes_delivered += len(data)
        self.stats.chunks_delivered += 1
        self.stats.per_mirror[job.url].delivered += len(data)
        if self._deliver is not None:  # (None: ``store`` did all that was wanted)
            await self._deliver(req, data)

    # -- HTTP --------------------------------------------------------------------------------

    async def _run_http(self, job: Job) -> None:
        o = self.options
        assert self._http is not None
        url = job.url + layout.file_path(self.app, self.build, job.path, self.area)
        expected = self.file_sizes[job.path]
        request = self._http.build_request(
            "GET", url, headers={"Range": f"bytes={job.start}-{job.end - 1}"}
        )
        with trio.move_on_after(o.connect_timeout) as scope:
            response = await self._http.send(request, stream=True)
        if scope.cancelled_caught:
            raise _JobFailure("timeout", f"no response within {o.connect_timeout:g}s")
        try:
            whole = self._check_response(job, response, expected)
            self._notify()  # the mirror has answered: jobs held back for that may go
            if whole and not self._plan.stream_whole_file(job):
                return  # another job streams this file already; it takes our chunks
            await self._stream_body(job, _BodyReader(response), whole)
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    def _check_response(self, job: Job, response: httpx.Response, expected: int) -> bool:
        """Validate status and headers; True if the body is the whole file (Range ignored)."""
        status = response.status_code
        h = response.headers
        if h.get("content-encoding", "identity").lower() not in ("identity", ""):
            raise _JobFailure("bad_encoding", f"body is {h['content-encoding']}-encoded")
        etag = h.get("etag")
        if etag:
            key = (job.mirror, job.path)
            seen = self._etags.get(key)
            if seen is not None and seen != etag:
                self.stats.count(job.url, "etag_changed")
            self._etags[key] = etag
        if status == 206:
            self._plan.answered(job, honoured_range=True)
            cr = parse_content_range(h.get("content-range", ""))
            if cr is None:
                raise _JobFailure("bad_range", "206 without a valid Content-Range")
            start, _end, total = cr
            if total is not None and total != expected:
                raise _JobFailure(
                    "size_mismatch", f"serves {total} bytes of it, the manifest says {expected}"
                )
            if start != job.start:
                raise _JobFailure("bad_range", f"asked for bytes from {job.start}, got {start}")
            return False
        if status == 200:
            self._plan.answered(job, honoured_range=False)
            length = h.get("content-length")
            if length is not None and length.isdigit() and int(length) != expected:
                raise _JobFailure(
                    "size_mismatch", f"serves {length} bytes of it, the manifest says {expected}"
                )
            self.stats.count(job.url, "ignored_range")
            return True
        self._plan.answered(job, honoured_range=True)  # an error says nothing about Range
        if status == 416:
            raise _JobFailure("http_416", "416 Range Not Satisfiable (file shorter there)")
        raise _JobFailure(f"http_{status}", f"HTTP {status} {response.reason_phrase}".strip())

    async def _stream_body(self, job: Job, body: _BodyReader, whole: bool) -> None:
        """Read the body once, each wanted chunk straight into a buffer of its size, and
        verify and deliver each beside the reading of the next. A whole-file body (``whole``)
        starts at byte 0 and keeps every chunk of the file the plan still wants from it; a
        206 body holds exactly the job's adjacent chunks."""
        failure: Exception | None = None
        async with trio.open_nursery() as checks:
            try:
                await self._read_chunks(job, body, whole, checks)
            except Exception as exc:  # a broken body: the chunks read before it still count
                failure = exc
            finally:
                with trio.CancelScope(shield=True):
                    await body.aclose()
        if failure is not None:
            raise failure

    async def _read_chunks(
        self, job: Job, body: _BodyReader, whole: bool, checks: trio.Nursery
    ) -> None:
        plan = self._plan
        own = iter(job.chunks)
        pos = 0 if whole else job.start
        scratch: bytearray | None = None
        while True:
            req = plan.next_in_stream(job, pos) if whole else next(own, None)
            if req is None:
                return
            while pos < req.offset:  # bytes nobody wants (whole-file bodies only)
                if scratch is None:
                    scratch = bytearray(DISCARD_BYTES)
                view = memoryview(scratch)[: min(DISCARD_BYTES, req.offset - pos)]
                pos += await self._read(job, body, view, req)
            await self._checks.acquire()
            try:
                buf = self._buffers.get(req.length)
                view = memoryview(buf)[: req.length]
                while view:
                    n = await self._read(job, body, view, req)
                    view = view[n:]
                    pos += n
            except BaseException:
                self._checks.release()
                raise
            checks.start_soon(self._check_chunk, job, req, buf)

    async def _check_chunk(self, job: Job, req: ChunkRequest, buf: bytearray) -> None:
        try:
            await self._verify_and_deliver(job, req, memoryview(buf)[: req.length])
        finally:
            self._checks.release()
        self._buffers.put(buf)  # not on failure: a thread may still read it

    async def _read(self, job: Job, body: _BodyReader, view: memoryview, req: ChunkRequest) -> int:
        """One read of body bytes into ``view`` (not empty), with the job's read timeout,
        speed floor and rate limit."""
        o = self.options
        t0 = trio.current_time()
        with trio.move_on_after(o.read_timeout) as scope:
            n = await body.readinto(view)
        if scope.cancelled_caught:
            raise _JobFailure("timeout", f"no data for {o.read_timeout:g}s")
        if n == 0:
            raise _JobFailure(
                "truncated",
                f"body ended before bytes {req.offset}-{req.end - 1} of {job.path} were in",
            )
        body.net += trio.current_time() - t0
        body.window += n
        self._account(job, n)
        if body.net >= o.speed_window:
            if body.window / body.net < o.min_speed:
                raise _JobFailure(
                    "slow", f"too slow ({body.window / body.net:.0f} B/s for {body.net:.1f}s)"
                )
            body.net, body.window = 0.0, 0
        await self._limiter.acquire(n)
        return n

    # -- local directories -------------------------------------------------------------------

    async def _run_local(self, job: Job, root: Path) -> None:
        path = root / layout.release_dir(self.app, self.build) / self.area / job.path
        expected = self.file_sizes[job.path]

        def open_checked() -> int:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise _JobFailure("not_found", f"{path} does not exist") from None
            size = os.fstat(fd).st_size
            if size != expected:
                os.close(fd)
                raise _JobFailure(
                    "size_mismatch", f"{path} has {size} bytes, the manifest says {expected}"
                )
            return fd

        fd = await trio.to_thread.run_sync(open_checked)
        try:
            for req in job.chunks:
                data = await trio.to_thread.run_sync(os.pread, fd, req.length, req.offset)
                self._account(job, len(data))
                if len(data) != req.length:
                    raise _JobFailure("truncated", f"{path} ended before byte {req.end}")
                await self._verify_and_deliver(job, req, data)
                await self._limiter.acquire(len(data))
        finally:
            os.close(fd)

    # -- errors ------------------------------------------------------------------------------

    def _error(self) -> CDNError:
        failed = self._plan.failed
        it = failed[0]
        r = it.req
        reasons = self._plan.reasons(it)
        why = "; ".join(f"{url}: {text}" for url, text in reasons.items()) or "no mirror left"
        more = f" ({len(failed) - 1} more chunks failed too)" if len(failed) > 1 else ""
        fix = None
        if reasons and all("blake3" in t for t in reasons.values()):
            fix = (
                "every mirror serves bytes that differ from the signed manifest; check that "
                "the mirrors hold this exact build, or add a good --mirror"
            )
        elif reasons and all(
            "manifest says" in t or "416" in t or "HTTP 404" in t for t in reasons.values()
        ):
            fix = "the mirrors hold another version of this file; republish or add a --mirror"
        return CDNError(
            f"cannot fetch chunk {r.id.hex()[:12]} of {r.path} (bytes {r.offset}-{r.end - 1}) "
            f"after {it.attempts} attempt{'s' if it.attempts != 1 else ''}: {why}{more}",
            fix=fix,
        )
