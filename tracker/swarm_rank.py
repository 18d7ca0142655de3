"""How the in-memory swarm (:class:`tracker.swarm.MemorySwarm`) ranks the peers of an answer.

Ranking: answers list the requested build's members first, then partial seeds (members of the
other builds of the app announced in the last hour, at most ``PARTIAL_SWARMS`` builds); within
each group by quality score (highest first), then by bytes left (fewest first), then node id.
Sorting a swarm of hundreds on every announce would cost more than everything else, so each
swarm keeps its sorted member list and re-sorts it when its membership or a member's score
changes (at once), or when members only moved their ``left`` (at most every ``RANK_REFRESH``
seconds). The list holds the live member objects, so what an answer shows (address, progress)
is always current; only the order among peers whose progress changed may lag by up to
``RANK_REFRESH``. Expired, stopped and flagged members are skipped when the list is read.
Reading it is itself cached: each swarm keeps its first ``TOP`` servable members in rank order
(``MAX_NUMWANT`` + 1, enough for any answer minus the asker), reused by every answer until the
list is re-sorted, a member joins, leaves or changes whether it serves (port 0), or one of
them expires; an answer is the first ``numwant`` of them that are not the asker.

Every member caches its JSON fragment for answers (rebuilt when it re-announces or its score
changes), so an answer is a join of ready-made bytes.
"""

from __future__ import annotations

import math

from .backend import AnnounceAnswer
from .core import MAX_NUMWANT
from .stats import UNKNOWN_SCORE
from .swarm_members import Member, SwarmMembers, member_fragment

#: Other builds of the same app searched for partial seeds (most recently announced first).
PARTIAL_SWARMS = 8
#: A build counts as "being shared" for partial seeds if announced within this many seconds.
PARTIAL_WINDOW_S = 3600.0
#: Longest time a swarm's order may lag behind members' progress (seconds); membership and
#: score changes re-sort at once.
RANK_REFRESH = 1.0
#: Members kept in each swarm's cached head of the ranking: any answer, minus the asker.
TOP = MAX_NUMWANT + 1


class SwarmRanking:
    """The reading side of :class:`tracker.swarm.MemorySwarm`: its answers, from the state
    that class keeps (declared here, set there)."""

    _swarms: dict[bytes, SwarmMembers]
    #: app -> manifest -> time of its last announce (for partial seeds)
    _builds: dict[str, dict[bytes, float]]
    _scores: dict[bytes, float]
    _flagged: set[bytes]

    def _answer(
        self, sw: SwarmMembers, app: str, exclude: bytes, numwant: int, now: float
    ) -> AnnounceAnswer:
        seeders, leechers = sw.seeds, len(sw.members) - sw.seeds
        if numwant <= 0:
            return AnnounceAnswer([], seeders, leechers)
        # the asker is at most one of the first numwant + 1
        own = [m for m in self._top(sw, now)[: numwant + 1] if m.node != exclude][:numwant]
        need = numwant - len(own)
        if need > 0:
            taken = {m.node for m in own}
            taken.add(exclude)
            others: list[Member] = []
            for other in self._partial_swarms(app, sw.manifest, now):
                n = 0
                for m in self._top(other, now):
                    if m.node not in taken:
                        others.append(m)
                        n += 1
                        if n == need:
                            break
            if others:
                scores = self._scores
                others.sort(key=lambda m: (-scores.get(m.node, UNKNOWN_SCORE), m.left, m.node))
                for m in others:
                    if m.node not in taken:
                        taken.add(m.node)
                        own.append(m)
                        need -= 1
                        if need == 0:
                            break
        frag = self._frag
        return AnnounceAnswer([m.frag or frag(m) for m in own], seeders, leechers)

    def _partial_swarms(self, app: str, manifest: bytes, now: float) -> list[SwarmMembers]:
        builds = self._builds.get(app)
        if not builds or (len(builds) == 1 and manifest in builds):
            return []
        recent = sorted(
            (t, m) for m, t in builds.items() if m != manifest and t >= now - PARTIAL_WINDOW_S
        )
        out = []
        for _, m in reversed(recent[-PARTIAL_SWARMS:]):
            sw = self._swarms.get(m)
            if sw is not None:
                out.append(sw)
        return out

    def _top(self, sw: SwarmMembers, now: float) -> list[Member]:
        """The first ``TOP`` members of ``sw`` that may be handed out, in rank order (see the
        module docstring): re-sorted when needed, else cached."""
        ranked = sw.ranked
        if ranked is None or (sw.stale and now - sw.ranked_at >= RANK_REFRESH):
            scores = self._scores
            ranked = sw.ranked = sorted(
                sw.members.values(),
                key=lambda m: (-scores.get(m.node, UNKNOWN_SCORE), m.left, m.node),
            )
            sw.ranked_at = now
            sw.stale = False
        elif sw.top is not None and sw.top_of is ranked and now < sw.top_until:
            return sw.top
        members, flagged = sw.members, self._flagged
        top: list[Member] = []
        for m in ranked:
            if (
                not m.port  # a node that does not serve: counted, never handed out
                or m.expires <= now
                or members.get(m.node) is not m
                or m.node in flagged
            ):
                continue
            top.append(m)
            if len(top) == TOP:
                break
        sw.top, sw.top_of = top, ranked
        sw.top_until = min((m.expires for m in top), default=math.inf)
        return top

    def _frag(self, m: Member) -> bytes:
        m.frag = member_fragment(m, self._scores.get(m.node, UNKNOWN_SCORE))
        return m.frag
