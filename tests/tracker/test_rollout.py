"""The pure rollout logic: stable membership, what each node is offered, the automatic halt."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.discovery.tracker import TrackerClient, TrackerRefusedError
from p2pnode.release import manifest as M
from tests.support.tracker import APP
from tracker import rollout
from tracker.errors import Conflict
from tracker.rollout import Rollout, RolloutError, change, member, offered, with_outcome

NEW, OLD = b"n" * 32, b"o" * 32


def make(percent: float = 10.0, **kw: object) -> Rollout:
    return Rollout("game", "stable", NEW, 2, OLD, percent, **kw)  # type: ignore[arg-type]


@given(
    st.binary(min_size=32, max_size=32),
    st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=50),
    st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=2, max_size=8),
)
def test_membership_only_grows_as_the_percentage_rises(
    manifest: bytes, nodes: list[bytes], percents: list[float]
) -> None:
    members: set[bytes] = set()
    for p in sorted(percents):
        now = {n for n in nodes if member(manifest, n, p)}
        assert members <= now
        members = now
    assert all(member(manifest, n, 100.0) for n in nodes)


def test_about_the_percentage_of_nodes_is_in_and_the_build_reshuffles_them() -> None:
    nodes = [os.urandom(20) for _ in range(5000)]
    ten = {n for n in nodes if member(NEW, n, 10.0)}
    assert 400 < len(ten) < 600
    other = {n for n in nodes if member(OLD, n, 10.0)}
    assert len(ten & other) < 150  # another build picks other nodes first


def test_what_a_node_is_offered() -> None:
    nodes = [os.urandom(20) for _ in range(200)]
    inside = next(n for n in nodes if member(NEW, n, 10.0))
    outside = next(n for n in nodes if not member(NEW, n, 10.0))
    r = make()
    assert offered(r, inside, None) == NEW
    assert offered(r, outside, None) == OLD
    assert offered(r, None, None) == OLD  # a node that does not say who it is waits
    assert offered(r, outside, NEW) == NEW  # it runs the build already: it keeps it
    halted = change(r, "halt", 5.0)
    assert offered(halted, inside, None) == OLD  # no further node starts the build
    assert offered(halted, inside, NEW) == NEW  # the ones that run it are not rolled back
    done = change(r, "complete", 6.0)
    assert offered(done, outside, None) is None  # the channel's head, for everyone
    assert offered(None, outside, None) is None


def test_the_rollout_halts_itself_at_the_threshold_over_enough_outcomes() -> None:
    r = make()
    for _ in range(3):
        r = with_outcome(r, True, 1.0)
    assert r.state == "active"  # 3 failures of 3, but fewer than 20 outcomes
    for _ in range(16):
        r = with_outcome(r, False, 1.0)
    assert r.state == "active" and (r.success, r.failure) == (16, 3)
    r = with_outcome(r, False, 2.0)  # 3 of 20 = 15%
    assert r.state == "halted" and r.changed == 2.0 and r.reason.startswith("auto: 3 of 20")
    assert with_outcome(r, True, 3.0) == r  # a halted rollout counts no more
    resumed = change(r, "resume", 4.0)
    assert resumed.state == "active" and (resumed.success, resumed.failure) == (0, 0)


def test_exactly_the_threshold_halts() -> None:
    r = make(min_outcomes=20)
    for i in range(20):
        r = with_outcome(r, i == 0, 1.0)  # 1 of 20 = 5%
    assert r.state == "halted"
    r = make(min_outcomes=20)
    for i in range(21):
        r = with_outcome(r, i == 20, 1.0)  # 1 of 21 < 5%
    assert r.state == "active"


def test_operator_changes() -> None:
    r = make(10.0)
    assert change(r, "raise", 1.0, 50.0).percent == 50.0
    for action, percent in [("raise", 5.0), ("raise", None), ("resume", None), ("jump", None)]:
        with pytest.raises(RolloutError):
            change(r, action, 1.0, percent)
    with pytest.raises(RolloutError):
        change(change(r, "halt", 1.0), "halt", 2.0)
    done = change(r, "complete", 1.0)
    assert done.percent == 100.0 and done.state == "complete"
    with pytest.raises(RolloutError):
        change(done, "raise", 2.0, 100.0)
    assert Rollout.from_json(r.to_json()) == r
    assert set(rollout.ACTIONS) == {"raise", "halt", "resume", "complete"}


def test_each_refused_change_says_what_to_do_instead() -> None:
    r, halted = make(50.0), change(make(50.0), "halt", 1.0)
    refused = [(r, "raise", 20.0), (r, "resume", None), (halted, "halt", None), (r, "jump", None)]
    refused.append((change(r, "complete", 1.0), "halt", None))
    fixes = set()
    for cur, action, percent in refused:
        with pytest.raises(RolloutError) as err:
            change(cur, action, 2.0, percent)
        assert err.value.fix and err.value.fix != Conflict.default_fix, (action, err.value)
        fixes.add(err.value.fix)
    assert len(fixes) == len(refused)  # each names its own way out


async def test_the_api_passes_the_fix_on(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    with pytest.raises(TrackerRefusedError) as err:
        await client._request("GET", f"/v1/apps/{APP}/channels/stable/rollout")
    assert err.value.status == 404 and "--rollout" in (err.value.fix or "")
    await client.publish(APP, "stable", make_manifest(1).encode())
    await client.publish(APP, "stable", make_manifest(2).encode(), rollout=50)
    with pytest.raises(TrackerRefusedError) as err:
        await client.change_rollout(APP, "stable", "raise", percent=20)
    assert err.value.status == 409 and "never shrinks" in (err.value.fix or ""), err.value


def test_another_head_ends_the_rollout() -> None:
    r = make()
    assert rollout.superseded(r, NEW, "promote", 1.0) == r  # still its build
    ended = rollout.superseded(r, b"x" * 32, "publish", 2.0)
    assert ended.state == "ended" and ended.reason == "ended by a publish"
    assert offered(ended, os.urandom(20), None) is None
    assert with_outcome(ended, True, 3.0) == ended
    with pytest.raises(RolloutError):
        change(ended, "resume", 3.0)
