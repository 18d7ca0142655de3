"""The bandwidth schedule and update windows, on explicit local times."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import UsageError
from p2pnode.service.schedule import (
    ALL_DAYS,
    AltSpeed,
    Caps,
    Schedule,
    Window,
    parse_days,
)

K, M = 1024, 1024 * 1024
# 2026-11-30 is a Monday.
MON = datetime(2026, 11, 30)


def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> datetime:
    return MON + timedelta(days=day, hours=hh, minutes=mm, seconds=ss)


def evening() -> Schedule:
    return Schedule.from_config(
        {
            "max_download_rate": "40M",
            "max_upload_rate": 0,
            "alt_speed": [
                {
                    "days": "weekdays",
                    "begin": "18:00",
                    "end": "23:00",
                    "download": "2M",
                    "upload": "256K",
                }
            ],
            "update_window": [{"days": ["sat", "sun"], "begin": "22:00", "end": "06:00"}],
        },
        "config.toml",
    )


def test_caps_inside_and_outside_an_alt_window() -> None:
    s = evening()
    assert s.caps_at(at(0, 17, 59, 59)) == Caps(40 * M, None)
    assert s.caps_at(at(0, 18)) == Caps(2 * M, 256 * K)  # begin is inclusive
    assert s.caps_at(at(0, 23)) == Caps(40 * M, None)  # end is exclusive
    assert s.caps_at(at(5, 19)) == Caps(40 * M, None)  # Saturday is not a weekday


def test_next_change_walks_the_week() -> None:
    s = evening()
    assert s.next_change(at(0, 12, 30, 15)) == at(0, 18)
    assert s.next_change(at(0, 18)) == at(0, 23)
    assert s.next_change(at(4, 23)) == at(5, 22)  # Friday night: next is Saturday's window
    assert s.next_change(at(6, 23)) == at(7, 6)  # Sunday's window closes Monday morning
    assert Schedule().next_change(at(0, 0)) is None


def test_a_window_crossing_midnight_and_the_week_end() -> None:
    s = evening()
    assert not s.update_window_open(at(5, 21, 59))
    assert s.update_window_open(at(5, 22))
    assert s.update_window_open(at(6, 3))  # Saturday's window, Sunday morning
    assert s.update_window_open(at(0, 5, 59))  # Sunday's window, Monday morning
    assert not s.update_window_open(at(0, 6))
    assert not s.update_window_open(at(1, 3))


def test_no_update_window_means_any_time_and_equal_ends_mean_all_day() -> None:
    assert Schedule().update_window_open(at(2, 3))
    w = Window(days=1, begin=600, end=600)  # Monday 10:00 for 24 hours
    assert w.contains(600) and w.contains(1440 + 599) and not w.contains(1440 + 600)


def test_overlapping_windows_take_the_strictest_cap_per_direction() -> None:
    day = Window(ALL_DAYS, 8 * 60, 20 * 60)
    s = Schedule(
        Caps(10 * M, 5 * M),
        (
            AltSpeed(day, Caps(1 * M, None)),
            AltSpeed(Window(ALL_DAYS, 12 * 60, 13 * 60), Caps(3 * M, 1 * M)),
        ),
    )
    assert s.caps_at(at(3, 12, 30)) == Caps(1 * M, 1 * M)
    assert s.caps_at(at(3, 9)) == Caps(1 * M, 5 * M)
    assert s.next_change(at(3, 12, 30)) == at(3, 13)


def test_adjacent_windows_with_the_same_caps_are_one_change() -> None:
    caps = Caps(1 * M, None)
    s = Schedule(alt=(AltSpeed(Window(1, 60, 120), caps), AltSpeed(Window(1, 120, 180), caps)))
    assert s.next_change(at(0, 0, 30)) == at(0, 1)
    assert s.next_change(at(0, 1, 30)) == at(0, 3)  # 02:00 changes nothing


def test_config_round_trips() -> None:
    s = evening()
    assert Schedule.from_config(s.to_config(), "settings.json") == s


@pytest.mark.parametrize(
    ("table", "fix"),
    [
        ({"max_download_rate": "40Q"}, "40M"),
        ({"max_upload_rate": -1}, "0 for no cap"),
        ({"max_upload_rate": 1.5}, "like"),
        ({"alt_speed": {"begin": "1:00"}}, "[[alt_speed]]"),
        ({"alt_speed": [{"begin": "25:00", "end": "01:00"}]}, "HH:MM"),
        ({"alt_speed": [{"begin": "01:00"}]}, "HH:MM"),
        ({"alt_speed": [{"begin": "01:00", "end": "02:00", "days": ["mo"]}]}, "weekdays"),
        ({"alt_speed": [{"begin": "01:00", "end": "02:00", "days": []}]}, "weekdays"),
        ({"alt_speed": [{"begin": "01:00", "end": "02:00", "speed": 1}]}, "download"),
        (
            {"update_window": [{"begin": "01:00", "end": "02:00", "download": 1}]},
            "use begin, days, end",
        ),
        ({"update_window": [{"begin": "01:00", "end": "02:00"}] * 65}, "merge"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(table: dict[str, object], fix: str) -> None:
    with pytest.raises(UsageError, match=r"config\.toml") as info:
        Schedule.from_config(table, "config.toml")
    assert fix in info.value.fix


def test_days() -> None:
    assert parse_days("all", "d") == ALL_DAYS
    assert parse_days(["Mon", "weekend"], "d") == 0b1100001


windows = st.builds(Window, st.integers(1, ALL_DAYS), st.integers(0, 1439), st.integers(0, 1439))
rates = st.one_of(st.none(), st.integers(1, 10**9))
schedules = st.builds(
    Schedule,
    st.builds(Caps, rates, rates),
    st.lists(st.builds(AltSpeed, windows, st.builds(Caps, rates, rates)), max_size=4).map(tuple),
    st.lists(windows, max_size=3).map(tuple),
)
instants = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1))


@given(schedules, instants)
def test_nothing_changes_before_next_change_and_something_does_at_it(
    s: Schedule, t: datetime
) -> None:
    t = t.replace(microsecond=0)
    state = (s.caps_at(t), s.update_window_open(t))
    nxt = s.next_change(t)
    if nxt is None:
        for probe in range(0, 7 * 1440, 97):  # never: sample the week
            u = t + timedelta(minutes=probe)
            assert (s.caps_at(u), s.update_window_open(u)) == state
        return
    assert t < nxt <= t + timedelta(days=7)
    assert nxt.second == 0 and nxt.microsecond == 0
    just_before = max(t, nxt - timedelta(seconds=1))
    assert (s.caps_at(just_before), s.update_window_open(just_before)) == state
    assert (s.caps_at(nxt), s.update_window_open(nxt)) != state


@given(schedules)
def test_any_schedule_round_trips_through_its_config(s: Schedule) -> None:
    assert Schedule.from_config(s.to_config(), "x") == s
