"""The bandwidth schedule and update windows: what the clock on the wall allows right now.

Users share their line with the rest of the house: they want the node to keep to a low cap in
the evening and take the whole line at night, and they want games updated while nobody plays.
Transmission's alt-speed schedule is the model players know: a set of days, a begin and an end
time, and a second pair of caps in force inside it. Here there may be several such windows,
and a second kind, update windows, inside which automatic updates may start.

Semantics
---------
* A :class:`Window` is a days bitmask (Monday = bit 0, as ``datetime.weekday()``) and begin
  and end minutes after midnight. It opens at ``begin`` on each of its days and stays open
  until ``end``; if ``end <= begin`` it closes at ``end`` on the *next* day (a window
  22:00-06:00 on Friday covers Friday night into Saturday morning), and ``end == begin`` means
  24 hours. Begin is inclusive, end exclusive.
* Caps in force: the base caps, except inside alt-speed windows, where each direction's cap is
  the lowest of the base cap and every open window's cap (the strictest wins: overlapping
  windows never loosen each other). ``None`` is no cap.
* Update windows: none configured means automatic updates may start at any time; otherwise
  only while one is open. A window gates *starting*; a running update is not stopped when its
  window closes (restarting it later would only waste what it has fetched).

Time is a local, naive :class:`datetime.datetime` passed in; answers come back as the caps
and the local time of the next change, so the daemon sleeps until then and applies the caps
live. Wall clocks jump (DST, NTP, a laptop waking), so the daemon should also re-ask at least
every :data:`RECHECK_SECONDS`: each answer is computed from the time given, never remembered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..errors import UsageError
from ..units import parse_rate

__all__ = [
    "ALL_DAYS",
    "RECHECK_SECONDS",
    "AltSpeed",
    "Caps",
    "Schedule",
    "Window",
    "format_days",
    "parse_days",
    "parse_rate_value",
]

MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
RECHECK_SECONDS = 60
ALL_DAYS = 0b1111111
MAX_WINDOWS = 64

_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_SETS = {"all": ALL_DAYS, "weekdays": 0b0011111, "weekend": 0b1100000}
_TIME = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True, slots=True)
class Caps:
    """Bytes per second for each direction; None is no cap."""

    download: int | None = None
    upload: int | None = None

    def tighten(self, other: Caps) -> Caps:
        return Caps(_lowest(self.download, other.download), _lowest(self.upload, other.upload))


def _lowest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True, slots=True)
class Window:
    """Days (bitmask, Monday = 1) and begin/end minutes after midnight; see the module doc."""

    days: int
    begin: int
    end: int

    def __post_init__(self) -> None:
        if not 0 < self.days <= ALL_DAYS:
            raise ValueError(f"days bitmask {self.days!r} names no day")
        for m in (self.begin, self.end):
            if not 0 <= m < MINUTES_PER_DAY:
                raise ValueError(f"{m!r} is not a minute of the day")

    @property
    def length(self) -> int:
        return (self.end - self.begin) % MINUTES_PER_DAY or MINUTES_PER_DAY

    def spans(self) -> list[tuple[int, int]]:
        """The open intervals as minutes of the week ``[start, stop)``, with ``stop`` possibly
        past the week's end (a Sunday night window runs into Monday)."""
        return [
            (day * MINUTES_PER_DAY + self.begin, day * MINUTES_PER_DAY + self.begin + self.length)
            for day in range(7)
            if self.days >> day & 1
        ]

    def contains(self, minute_of_week: float) -> bool:
        for start, stop in self.spans():
            # The same instant one week later lies in a span that wraps past Sunday midnight.
            for m in (minute_of_week, minute_of_week + MINUTES_PER_WEEK):
                if start <= m < stop:
                    return True
        return False

    def edges(self) -> set[int]:
        return {m % MINUTES_PER_WEEK for span in self.spans() for m in span}


@dataclass(frozen=True, slots=True)
class AltSpeed:
    """A window and the caps in force inside it."""

    window: Window
    caps: Caps


def _minute_of_week(local: datetime) -> float:
    return local.weekday() * MINUTES_PER_DAY + local.hour * 60 + local.minute + local.second / 60


@dataclass(frozen=True, slots=True)
class Schedule:
    """The base caps, the alt-speed windows and the update windows."""

    base: Caps = Caps()
    alt: tuple[AltSpeed, ...] = ()
    updates: tuple[Window, ...] = ()

    def caps_at(self, local: datetime) -> Caps:
        return self._caps(_minute_of_week(local))

    def _caps(self, m: float) -> Caps:
        caps = self.base
        for alt in self.alt:
            if alt.window.contains(m):
                caps = caps.tighten(alt.caps)
        return caps

    def update_window_open(self, local: datetime) -> bool:
        return self._updates_open(_minute_of_week(local))

    def _updates_open(self, m: float) -> bool:
        return not self.updates or any(w.contains(m) for w in self.updates)

    def next_change(self, local: datetime) -> datetime | None:
        """The local time at which the caps or the update window state next differ from now;
        None if they never change."""
        now = _minute_of_week(local)
        state = (self._caps(now), self._updates_open(now))
        edges = sorted(
            {e for a in self.alt for e in a.window.edges()}
            | {e for w in self.updates for e in w.edges()}
        )
        # Walk the edges in time order from now, once round the week.
        ahead = sorted(((e - now) % MINUTES_PER_WEEK or MINUTES_PER_WEEK, e) for e in edges)
        for delta, edge in ahead:
            if (self._caps(edge), self._updates_open(edge)) != state:
                return local + timedelta(minutes=delta)
        return None

    def to_config(self) -> dict[str, Any]:
        """The ``[service]`` keys that :meth:`from_config` reads back to an equal schedule."""

        def window(w: Window) -> dict[str, Any]:
            return {"days": format_days(w.days), "begin": _hhmm(w.begin), "end": _hhmm(w.end)}

        return {
            "max_download_rate": self.base.download or 0,
            "max_upload_rate": self.base.upload or 0,
            "alt_speed": [
                {**window(a.window), "download": a.caps.download or 0, "upload": a.caps.upload or 0}
                for a in self.alt
            ],
            "update_window": [window(w) for w in self.updates],
        }

    @classmethod
    def from_config(cls, table: dict[str, Any], where: str) -> Schedule:
        """Read the schedule keys of the ``[service]`` table (see ``docs/service.md``).

        Raises:
            UsageError: naming ``where`` (the file) and the bad key.
        """
        base = Caps(
            parse_rate_value(table.get("max_download_rate", 0), f"{where}: max_download_rate"),
            parse_rate_value(table.get("max_upload_rate", 0), f"{where}: max_upload_rate"),
        )
        alt = tuple(
            AltSpeed(
                _window(item, f"{where}: alt_speed[{i}]", {"download", "upload"}),
                Caps(
                    parse_rate_value(item.get("download", 0), f"{where}: alt_speed[{i}].download"),
                    parse_rate_value(item.get("upload", 0), f"{where}: alt_speed[{i}].upload"),
                ),
            )
            for i, item in enumerate(_tables(table.get("alt_speed", []), f"{where}: alt_speed"))
        )
        updates = tuple(
            _window(item, f"{where}: update_window[{i}]", set())
            for i, item in enumerate(
                _tables(table.get("update_window", []), f"{where}: update_window")
            )
        )
        return cls(base, alt, updates)


def _tables(value: object, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UsageError(
            f"{what} must be an array of tables", fix=f"write it as [[{what.split(': ')[-1]}]]"
        )
    if len(value) > MAX_WINDOWS:
        raise UsageError(f"{what} has more than {MAX_WINDOWS} windows", fix="merge windows")
    return value


def _window(item: dict[str, Any], what: str, extra: set[str]) -> Window:
    unknown = set(item) - {"days", "begin", "end"} - extra
    if unknown:
        known = ", ".join(sorted({"days", "begin", "end"} | extra))
        raise UsageError(f"{what}.{sorted(unknown)[0]} is not a known key", fix=f"use {known}")
    return Window(
        parse_days(item.get("days", "all"), f"{what}.days"),
        _minutes(item.get("begin"), f"{what}.begin"),
        _minutes(item.get("end"), f"{what}.end"),
    )


def parse_days(value: object, what: str) -> int:
    """``"all"``, ``"weekdays"``, ``"weekend"``, or a list of ``"mon"``..``"sun"`` (and those
    set names), as a bitmask."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        names = [None]
    mask = 0
    for name in names:
        key = name.lower() if isinstance(name, str) else ""
        if key in _DAY_SETS:
            mask |= _DAY_SETS[key]
        elif key in _DAY_NAMES:
            mask |= 1 << _DAY_NAMES.index(key)
        else:
            raise UsageError(
                f"{what}: {name!r} is not a day",
                fix='write days as "all", "weekdays", "weekend" or a list like ["mon", "sat"]',
            )
    return mask


def format_days(mask: int) -> list[str]:
    return [name for i, name in enumerate(_DAY_NAMES) if mask >> i & 1]


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _minutes(value: object, what: str) -> int:
    match = _TIME.match(value) if isinstance(value, str) else None
    if match is None:
        raise UsageError(
            f"{what}: {value!r} is not a time of day", fix='write it as "HH:MM", like "22:30"'
        )
    return int(match[1]) * 60 + int(match[2])


def parse_rate_value(value: object, what: str) -> int | None:
    """A rate from TOML: a string with a K/M/G suffix as on the command line, or a whole
    number of bytes per second; 0 (or "0") is no cap."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(
            f"{what}: {value!r} is not a rate", fix='write a rate like "40M", or 0 for no cap'
        )
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{what}: a rate cannot be negative", fix="write 0 for no cap")
        return value or None
    try:
        return parse_rate(value)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc.message}", fix=exc.fix) from None
