"""Counts and sizes as people read them."""

from __future__ import annotations

from p2pnode.units import format_count


def test_a_forecasts_node_counts_read_as_whole_machines() -> None:
    assert format_count(0, "node") == "0 nodes"
    assert format_count(0.1, "node") == "under 1 node"
    assert format_count(0.6, "node") == "about 1 node"
    assert format_count(1, "node") == "1 node"
    assert format_count(4, "node") == "4 nodes"
    assert format_count(40.2, "node") == "about 40 nodes"
