"""A set that remembers only its most recent members: bounded memory for what peers can grow.

A node keeps several "have I seen this?" sets whose members a peer can mint at will (banned
node ids, peers already served a first piece, request ids we cancelled); each must stay
bounded, and the member to forget is the one added (or re-added) longest ago.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["RecentSet"]

K = TypeVar("K", bound=Hashable)


class RecentSet(Generic[K]):
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        self.limit = limit
        self._members: dict[K, None] = {}  # oldest first (dicts keep insertion order)

    def add(self, key: K) -> None:
        """Add ``key`` as the newest member (again, if it was one), forgetting the oldest
        beyond ``limit``."""
        self._members.pop(key, None)
        self._members[key] = None
        while len(self._members) > self.limit:
            del self._members[next(iter(self._members))]

    def discard(self, key: K) -> None:
        self._members.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[K]:
        return iter(self._members)
