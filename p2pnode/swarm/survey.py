"""Asking peers what they hold before fetching: the patch planner's view of the swarm.

Theory of operation
-------------------
An install that may use delta patches weighs each patch against the chunks it produces by who
can deliver them (``release/deltaplan.py``). What a peer can deliver is its bitfield for the
manifest, which a fetch learns only once it runs. :meth:`Surveying.survey` asks first: it dials
each known peer, says hello and joins the manifest's swarm, takes the bitfield, says goodbye
and closes. The whole survey is bounded by ``wait``; a peer that has not answered by then, or
fails, counts as holding nothing.

Unlike a fetch, the survey never shows the signed manifest to a peer that does not know it. A
peer that was shown it answers later joins with a bitfield at once, so the fetch after the
survey would take it for a leecher of this build and wait for its haves instead of giving the
CDN what it lacks. What it loses is little: a peer on an earlier build holds none of this
build's patches, nor the changed chunks a patch would replace.

:func:`availability` turns the bitfields into piece id -> peers holding it (pure).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import trio

from ..identity import peer_node_id
from ..release import manifest as M
from ..release.delta import pieces
from . import wire as W
from .links import CONNECTION_ENDED, dial
from .peer import PeerSession
from .shell import Shell

__all__ = ["SURVEY_WAIT", "Surveying", "availability"]

#: The survey's bound, in all: long enough for a TLS handshake and one answer from peers on
#: a WAN, short next to the install it plans (a peer that is not up yet is given up on).
SURVEY_WAIT = 2.0


def availability(ids: Sequence[bytes], bitfields: Iterable[bytes]) -> dict[bytes, int]:
    """Piece id -> how many of ``bitfields`` (over ``ids``, in swarm index order) hold it."""
    out: dict[bytes, int] = {}
    for bits in bitfields:
        for i, pid in enumerate(ids[: len(bits) * 8]):
            if bits[i >> 3] & (0x80 >> (i & 7)):
                out[pid] = out.get(pid, 0) + 1
    return out


class Surveying(Shell):
    """Asking peers for their bitfields without fetching (see the module)."""

    async def survey(
        self,
        manifest: M.Manifest,
        peers: Sequence[tuple[str, int]],
        wait: float = SURVEY_WAIT,
    ) -> dict[bytes, int]:
        """Piece id (chunk or patch) of ``manifest`` -> how many of ``peers`` hold it, as
        they answer within ``wait``."""
        ids = list(pieces(manifest))
        shown: dict[str, bytes] = {}
        with trio.move_on_after(wait):
            async with trio.open_nursery() as nursery:
                for host, port in list(dict.fromkeys(peers))[: self.max_connections]:
                    nursery.start_soon(self._bitfield_of, manifest, len(ids), host, port, shown)
        return availability(ids, shown.values())

    async def _bitfield_of(
        self,
        manifest: M.Manifest,
        count: int,
        host: str,
        port: int,
        shown: dict[str, bytes],
    ) -> None:
        """Put ``host:port``'s bitfield for ``manifest`` in ``shown``, if it has one."""
        try:
            tls = await dial(host, port, self._client_ctx)
        except (*CONNECTION_ENDED, trio.TooSlowError):
            return
        try:
            node_id = peer_node_id(tls)
            if node_id == self.identity.node_id or node_id in self.banned:
                return
            now = trio.current_time()
            s = PeerSession(
                self.identity.node_id,
                self.listen_port,
                now=now,
                expected_id=node_id,
                hello_timeout=self.hello_timeout,
            )
            await tls.send_all(s.hello(now) + s.join(manifest.id, count, now))
            bits = await _read_bitfield(tls, s, manifest.id)
            if bits is not None:
                shown[f"{host}:{port}"] = bits
                await tls.send_all(s.send(W.Goodbye(b"surveyed"), trio.current_time()))
        except (*CONNECTION_ENDED, trio.TooSlowError):
            return
        finally:
            await trio.aclose_forcefully(tls)


async def _read_bitfield(
    tls: trio.SSLStream[trio.SocketStream], s: PeerSession, mid: bytes
) -> bytes | None:
    """The peer's bitfield for ``mid`` (None: it does not know it, or closed)."""
    while True:
        data = await tls.receive_some(1 << 16)
        if not data:
            return None
        now = trio.current_time()
        s.receive_data(data, now)
        while (ev := s.next_event()) is not None:
            if isinstance(ev, W.Bitfield) and ev.manifest == mid:  # (its size checked)
                return bytes(ev.bits) if ev.count else None
            elif isinstance(ev, (W.Join, W.ManifestPush, W.Request)):
                await tls.send_all(s.decline(ev, now))
            elif isinstance(ev, W.Goodbye):
                return None
