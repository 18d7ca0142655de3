"""Which sources an install may take chunks from (``--policy``).

``p2p-first`` (the default) asks peers and schedules the CDN beside them for what no peer has
or gives too slowly; ``p2p-only`` never touches the CDN (a swarm test, or a site whose CDN is
the origin seed box); ``cdn-only`` never asks a peer (the origin seed box itself).

A module of its own, with nothing heavy imported, because the command line needs the choices
before it knows whether anything will be installed.
"""

from __future__ import annotations

import enum

from ..errors import UsageError

__all__ = ["SourcePolicy"]


class SourcePolicy(enum.StrEnum):
    """Which sources an install may fetch from; the values are the ``--policy`` strings."""

    P2P_FIRST = "p2p-first"
    CDN_ONLY = "cdn-only"
    P2P_ONLY = "p2p-only"

    @classmethod
    def parse(cls, text: str) -> SourcePolicy:
        try:
            return cls(text)
        except ValueError:
            raise UsageError(
                f"unknown policy {text!r}", fix=f"use one of {', '.join(p.value for p in cls)}"
            ) from None

    @property
    def asks_peers(self) -> bool:
        return self is not SourcePolicy.CDN_ONLY

    @property
    def uses_cdn(self) -> bool:
        return self is not SourcePolicy.P2P_ONLY
