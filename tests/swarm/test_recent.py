"""The bounded recent-members set (p2pnode/swarm/recent.py)."""

from __future__ import annotations

import pytest

from p2pnode.swarm.recent import RecentSet


def test_a_recent_set_forgets_the_member_added_longest_ago() -> None:
    recent: RecentSet[int] = RecentSet(3)
    for k in (1, 2, 3):
        recent.add(k)
    recent.add(1)  # again: now the newest
    recent.add(4)
    assert list(recent) == [3, 1, 4] and 2 not in recent and len(recent) == 3
    recent.discard(3)
    assert list(recent) == [1, 4]
    with pytest.raises(ValueError):
        RecentSet(0)
