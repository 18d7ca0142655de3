"""The library: entries checked on the way in and out, one per DEST, saved atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import UsageError
from p2pnode.service.library import MAX_TRUST_KEYS, Library
from p2pnode.service.statedir import DamagedStateError

KEY = "ed25519:" + "ab" * 32
KEY2 = "ed25519:" + "cd" * 32
URL = "http://cdn.example/game/5/manifest.p2pm"


def test_add_both_kinds_of_source() -> None:
    lib = Library()
    a = lib.add(URL, "/games/a", [KEY], now=10.0)
    b = lib.add("game", "/games/b/", ["AB" * 32], now=11.0, tracker="http://t:8000", channel="beta")
    assert (a.id, b.id) == ("g1", "g2")
    assert not a.follows_channel and b.follows_channel
    assert b.dest == "/games/b" and b.channel == "beta" and b.added == 11.0
    assert b.trust == (KEY,)  # normalised to the printed form
    assert lib.get("g2") == b and len(lib) == 2


@pytest.mark.parametrize(
    ("source", "dest", "trust", "kw", "fix"),
    [
        ("game", "/g", [KEY], {}, "--tracker"),
        ("ftp://x/m", "/g", [KEY], {}, "manifest's http(s) URL"),
        ("bad name", "/g", [KEY], {"tracker": "http://t"}, "app as published"),
        ("game", "/g", [KEY], {"tracker": "t:80"}, "--tracker http"),
        (URL, "/g", [KEY], {"channel": "no/slash"}, "--channel"),
        (URL, "rel/dir", [KEY], {}, "full path"),
        (URL, "/", [KEY], {}, "directory of its own"),
        (URL, "/g", [], {}, "--trust"),
        (URL, "/g", ["ed25519:12"], {}, "64 hex"),
        (URL, "/g", [KEY] * (MAX_TRUST_KEYS + 1), {}, "publisher's keys"),
    ],
)
def test_bad_entries_are_refused_with_a_fix(
    source: str, dest: str, trust: list[str], kw: dict[str, str], fix: str
) -> None:
    lib = Library()
    with pytest.raises(UsageError) as info:
        lib.add(source, dest, trust, now=0, **kw)
    assert fix in info.value.fix
    assert len(lib) == 0


@pytest.mark.parametrize(
    "dest", ["/games/a", "/games/a/", "/games/a/sub", "/games", "/games/a/../a"]
)
def test_one_entry_per_dest_and_no_nesting(dest: str) -> None:
    lib = Library()
    lib.add(URL, "/games/a", [KEY], now=0)
    with pytest.raises(UsageError, match="library entry g1"):
        lib.add(URL, dest, [KEY], now=0)
    assert len(lib) == 1
    lib.add(URL, "/games/ab", [KEY], now=0)  # a sibling sharing a prefix is fine


def test_at_dest_finds_the_owner_of_a_path() -> None:
    lib = Library()
    e = lib.add(URL, "/games/a", [KEY], now=0)
    assert lib.at_dest("/games/a") == e
    assert lib.at_dest("/games/a/bin") == e
    assert lib.at_dest("/games/ab") is None


def test_ids_are_never_reused_even_across_a_save(tmp_path: Path) -> None:
    lib = Library()
    lib.add(URL, "/a", [KEY], now=0)
    lib.add(URL, "/b", [KEY], now=0)
    lib.remove("g2")
    lib.save(tmp_path / "library.json")
    again = Library.load(tmp_path / "library.json")
    assert again.add(URL, "/c", [KEY], now=0).id == "g3"
    with pytest.raises(UsageError, match="no library entry"):
        again.get("g2")


def test_missing_file_is_an_empty_library(tmp_path: Path) -> None:
    assert len(Library.load(tmp_path / "library.json")) == 0


def test_set_auto_update() -> None:
    lib = Library()
    lib.add(URL, "/a", [KEY, KEY2], now=0)
    assert not lib.set_auto_update("g1", False).auto_update
    assert lib.get("g1").trust == (KEY, KEY2)


def _saved(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "library.json"
    p.write_text(json.dumps(doc))
    return p


def _good() -> dict[str, Any]:
    lib = Library()
    lib.add(URL, "/a", [KEY], now=0)
    lib.add(URL, "/b", [KEY], now=0)
    return lib.to_json()


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.update(format=9),
        lambda d: d.update(next_id=0),
        lambda d: d.update(next_id=2),  # g2 exists: ids would be reused
        lambda d: d.update(entries="x"),
        lambda d: d["entries"].append(d["entries"][0]),
        lambda d: d["entries"][1].update(dest="/a/in"),
        lambda d: d["entries"][0].update(trust="k"),
        lambda d: d["entries"][0].update(auto_update=1),
        lambda d: d["entries"][0].update(added="now"),
        lambda d: d["entries"][0].update(dest="x"),
        lambda d: d["entries"][0].update(id="zz"),
        lambda d: d["entries"].append(7),
    ],
)
def test_a_damaged_file_is_refused_naming_it(
    tmp_path: Path, damage: Callable[[dict[str, Any]], object]
) -> None:
    doc = _good()
    damage(doc)
    with pytest.raises(DamagedStateError, match=r"library\.json"):
        Library.load(_saved(tmp_path, doc))


_dest = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(
    lambda parts: "/" + "/".join(parts)
)


@given(st.lists(_dest, max_size=12))
def test_random_adds_never_leave_overlapping_dests_and_round_trip(dests: list[str]) -> None:
    lib = Library()
    for i, d in enumerate(dests):
        try:
            lib.add(URL, d, [KEY], now=float(i))
        except UsageError:
            pass
    kept = [e.dest for e in lib.entries]
    for x in kept:
        for y in kept:
            assert x == y or not (x + "/").startswith(y + "/")
    again = Library.from_json(json.loads(json.dumps(lib.to_json())), Path("l.json"))
    assert again.entries == lib.entries
