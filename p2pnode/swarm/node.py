"""The swarm's trio shell: serve chunks to peers, and fetch chunks from them.

Theory of operation
-------------------
Each connection is TLS 1.3 with both node ids proven (``identity``), then a
:class:`~p2pnode.swarm.peer.PeerSession` checks the protocol. The decisions live in sans-IO
classes: :class:`~p2pnode.swarm.scheduler.Scheduler` (what to request of whom),
:class:`~p2pnode.swarm.choker.Choker` (whom to serve) and
:class:`~p2pnode.swarm.sendorder.SendOrder` (in which order answers are written). The shell
that moves bytes between them and the sockets is split by job:

* ``links.py``: dialling and accepting (TLS, ALPN), and one connection's writes (:class:`Link`).
* ``serving.py``: answering the peers that dial us (joins, pushed manifests, requests; upload
  caps, choking, the write order).
* ``fetching.py``: asking the peers we dial for chunks, one task per peer, with the CDN as one
  more source (:class:`CdnSource`).
* ``shell.py``: what both halves share (identity, limits, links, offers, choker, bans).

:class:`SwarmNode` is the node that does both; this module is where the rest of p2pnode
imports the swarm from.
"""

from __future__ import annotations

from .fetching import (
    MAX_BAD_CHUNKS,
    NOT_IN_SWARM,
    OWN_NODE,
    START_GRACE,
    CdnSource,
    Deliver,
    Fetching,
    PeerStats,
    why_no_peer,
)
from .links import CONNECT_TIMEOUT, WRITE_TIMEOUT, Link, parse_peer
from .offers import MAX_PUSHED
from .serving import Serving
from .shell import MAX_BANNED, MAX_CONNECTIONS, REQUEST_TIMEOUT, STALL_TIMEOUT
from .survey import SURVEY_WAIT, Surveying

__all__ = [
    "CONNECT_TIMEOUT",
    "MAX_BAD_CHUNKS",
    "MAX_BANNED",
    "MAX_CONNECTIONS",
    "MAX_PUSHED",
    "NOT_IN_SWARM",
    "OWN_NODE",
    "REQUEST_TIMEOUT",
    "STALL_TIMEOUT",
    "START_GRACE",
    "SURVEY_WAIT",
    "WRITE_TIMEOUT",
    "CdnSource",
    "Deliver",
    "Link",
    "PeerStats",
    "SwarmNode",
    "parse_peer",
    "why_no_peer",
]


class SwarmNode(Serving, Fetching, Surveying):
    """A node of the swarm: it serves the manifests it ``offer``s (``serve``), fetches
    chunks from peers (``fetch``) and asks them what they hold before a fetch (``survey``).
    Its arguments are :class:`~p2pnode.swarm.shell.Shell`'s."""
