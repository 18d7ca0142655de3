"""What the two halves of the swarm's trio shell share: the node's identity, limits and
timeouts, its live links, the swarms it offers, the choker and the bans.

``serving.py`` (answering peers that dial us) and ``fetching.py`` (asking peers we dial) each
extend :class:`Shell`; ``node.py`` joins them into :class:`~p2pnode.swarm.node.SwarmNode`.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..disk.stage import LocalChunks
from ..identity import NodeIdentity, client_context, server_context
from ..ratelimit import RateLimiter
from ..release import manifest as M
from . import wire as W
from .choker import DEFAULT_SLOTS, Choker
from .links import CONNECT_TIMEOUT, WRITE_TIMEOUT, Link
from .offers import Offers
from .peer import SessionState
from .recent import RecentSet
from .scheduler import LEECHER_WAIT
from .sendorder import SendOrder

__all__ = ["Shell"]

#: A request unanswered this long (a stalled or slow-dripping peer) drops the peer.
REQUEST_TIMEOUT = 10.0
#: No chunk from any peer for this long: give the rest to the CDN (p2p-first's deadline).
STALL_TIMEOUT = 15.0
#: Node ids banned for corrupt chunks, remembered at most (the oldest ban is forgotten).
MAX_BANNED = 4096
#: Chunk reads in progress at once (disk concurrency, independent of the choker's slots).
READ_SLOTS = 16
#: Peers served at once; more are refused at accept (a flood of connections costs nothing).
MAX_CONNECTIONS = 64


class Shell:
    """Args (beyond identity and local chunks):
    upload_limiter, download_limiter: global caps, shared with other transfers (the CDN's).
    peer_upload_rate, peer_download_rate: caps per peer connection, bytes/s (None: none).
    upload_slots: peers served at once (the choker's slots).
    frugal: origin-frugal seeding (see choker.py).
    spare: with ``frugal``, say ``origin`` in the hello so leechers spare this node's upload
        (they ask it only for rare chunks: less upload, a slower finish; see scheduler.py).
    """

    def __init__(
        self,
        identity: NodeIdentity,
        local: LocalChunks,
        listen_port: int = 0,
        *,
        idle_timeout: float = 120.0,
        hello_timeout: float = CONNECT_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
        leecher_wait: float = LEECHER_WAIT,
        max_connections: int = MAX_CONNECTIONS,
        upload_limiter: RateLimiter | None = None,
        download_limiter: RateLimiter | None = None,
        peer_upload_rate: int | None = None,
        peer_download_rate: int | None = None,
        upload_slots: int = DEFAULT_SLOTS,
        frugal: bool = False,
        spare: bool = True,
    ) -> None:
        self.identity = identity
        self.local = local
        self.listen_port = listen_port
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self.write_timeout = write_timeout
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self.leecher_wait = leecher_wait
        self.max_connections = max_connections
        self.connections = 0
        self.refused = 0
        self.upload_limiter = upload_limiter or RateLimiter(None)
        self.download_limiter = download_limiter or RateLimiter(None)
        self.peer_upload_rate = peer_upload_rate
        self.peer_download_rate = peer_download_rate
        self.choker = Choker(upload_slots, frugal=frugal)
        self.send_order = SendOrder()
        self._granted: set[int] = set()  # send_order tickets granted, not yet started
        self._order_changed = trio.Event()  # set (and replaced) when the write order changes
        self.swarms = Offers()
        self.links: set[Link] = set()
        #: Node ids that sent MAX_BAD_CHUNKS corrupt chunks, oldest first: never fetched from
        #: nor served again, whatever address or port they come from (bounded: MAX_BANNED).
        self.banned: RecentSet[bytes] = RecentSet(MAX_BANNED)
        self._verifying = trio.Semaphore(1)  # one pushed manifest parsed at a time
        self.uploaded = 0
        self._reads = trio.Semaphore(READ_SLOTS)
        # manifest id -> how to add a peer to our running fetch of it (dial-back, serving.py)
        self._fetching: dict[bytes, Callable[[str, int], None]] = {}
        # A frugal seed is a seed box (an origin): it says so, and leechers spare its upload.
        self._caps = (b"origin",) if frugal and spare else ()
        self._server_ctx = server_context(identity)
        self._client_ctx = client_context(identity)

    def offer(self, manifest: M.Manifest, signed: bytes | None = None) -> None:
        """Serve ``manifest``'s swarm; with ``signed`` (its signed encoding), peers that do
        not know it yet can be shown it and serve the chunks they share with it."""
        self.swarms.offer(manifest, signed)

    @property
    def manifests(self) -> dict[bytes, M.Manifest]:
        """The manifests served, by id."""
        return self.swarms.manifests

    @property
    def offers(self) -> dict[bytes, list[bytes]]:
        """Each served manifest's unique chunk ids, by manifest id."""
        return self.swarms.chunks

    @property
    def signed(self) -> dict[bytes, bytes]:
        """Signed manifests to show peers that do not know them, by manifest id."""
        return self.swarms.signed

    def ban(self, node_id: bytes) -> None:
        self.banned.add(node_id)

    def peers_in(self, mid: bytes) -> int:
        """How many peers (node ids) this node exchanges ``mid``'s chunks with now, on the
        connections it dialled and those it accepted: a job's "peers"."""
        return len(
            {
                link.node_id
                for link in list(self.links)
                if mid in link.manifests and link.session.state is SessionState.OPEN
            }
        )

    def have(self, chunk_id: bytes) -> None:
        """A chunk just landed here: tell every connected peer in a swarm that has it."""
        now = trio.current_time()
        for link in list(self.links):
            for mid in link.manifests:
                i = self.swarms.index.get(mid, {}).get(chunk_id)
                if i is not None and link.session.state is SessionState.OPEN:
                    link.send_soon(link.session.send(W.Have(mid, i), now))
