"""Release metadata (manifest format 2): update type, notes, minimum client, platforms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import ManifestError, UsageError
from p2pnode.release import canonical, keys
from p2pnode.release import manifest as M
from p2pnode.release.metadata import (
    ARCHES,
    KEYS,
    MAX_NOTES_BYTES,
    OSES,
    ReleaseInfo,
    UpdateType,
    normalise_platform,
    normalise_platforms,
    this_platform,
)
from p2pnode.release.publish import publish, read_notes, release_info
from tests.support.release import KEY, TRUST, small_manifest

PUB = keys.public_key_bytes(KEY)


def _round_trip(m: M.Manifest) -> M.Manifest:
    return M.verify(M.parse_signed(M.sign(m, KEY).encode()), TRUST)


def _parse_obj(obj: dict[bytes, Any]) -> M.Manifest:
    """Parse a hand-made manifest dictionary as a node would read it off the wire."""
    return M.Manifest.from_obj(canonical.decode(canonical.encode(obj), max_size=1 << 20))


_PLATFORMS = [f"{o}/{a}" for o in OSES for a in ARCHES]
_infos = st.builds(
    ReleaseInfo,
    update_type=st.none() | st.sampled_from(UpdateType),
    notes=st.text(
        st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\n\t\r"),
        max_size=200,
    ),
    min_client=st.none() | st.sampled_from(["0.1.0", "1.0", "2.3.4rc1", "1!2.0.post3"]),
    platforms=st.lists(st.sampled_from(_PLATFORMS), max_size=5, unique=True).map(
        lambda p: tuple(sorted(p))
    )
    | st.just(("any",)),
)


@settings(max_examples=60, deadline=None)
@given(_infos)
def test_metadata_round_trips_through_a_signedsmall_manifest(info: ReleaseInfo) -> None:
    m = small_manifest(info=info)
    got = _round_trip(m)
    assert got.info == info and got == m and got.id == m.id
    assert got.format == (1 if info.empty else 2)


def test_a_manifest_without_metadata_is_still_written_and_read_as_format_1() -> None:
    m = small_manifest()
    assert m.format == 1 and b"update_type" not in m.canonical_bytes
    assert _round_trip(m).info == ReleaseInfo()
    with_type = small_manifest(info=ReleaseInfo(UpdateType.CRITICAL))
    assert with_type.format == 2 and _round_trip(with_type).info.critical


def test_format_1_with_format_2_fields_and_unknown_formats_are_refused() -> None:
    obj = small_manifest(info=ReleaseInfo(UpdateType.MINOR)).to_obj()
    obj[b"format"] = 1
    with pytest.raises(ManifestError, match="format-2 fields"):
        _parse_obj(obj)
    obj[b"format"] = 3
    obj[b"shiny"] = b"new"
    with pytest.raises(ManifestError, match="format 3 is not supported") as info:
        _parse_obj(obj)
    assert info.value.fix == "upgrade p2pnode"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (b"update_type", b"urgent", "not one of critical"),
        (b"update_type", 1, "not a string"),
        (b"notes", b"", "present but empty"),
        (b"notes", b"x" * (MAX_NOTES_BYTES + 1), "at most 16384"),
        (b"notes", b"\xff\xfe", "not UTF-8"),
        (b"notes", b"bell\x07", "control characters"),
        (b"min_client", b"one point oh", "PEP 440"),
        (b"min_client", b"v1.0", "normal form"),
        (b"platforms", [], "1..16"),
        (b"platforms", b"linux/x86_64", "1..16"),
        (b"platforms", [b"linux/amd64"], "normal form"),
        (b"platforms", [b"plan9/x86_64"], "not 'any' or OS/ARCH"),
        (b"platforms", [b"windows/x86_64", b"linux/x86_64"], "sorted and unique"),
        (b"platforms", [b"linux/x86_64", b"linux/x86_64"], "sorted and unique"),
        (b"platforms", [b"any", b"linux/x86_64"], "beside others"),
    ],
)
def test_metadata_is_checked_strictly_at_parse(key: bytes, value: Any, match: str) -> None:
    obj = small_manifest(info=ReleaseInfo(UpdateType.MINOR)).to_obj()
    obj[key] = value
    with pytest.raises(ManifestError, match=match):
        _parse_obj(obj)


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("linux/amd64", "linux/x86_64"),
        ("Linux/AARCH64", "linux/arm64"),
        ("darwin/arm64", "macos/arm64"),
        ("win32/x64", "windows/x86_64"),
        ("linux/i686", "linux/x86"),
        ("linux/armv7l", "linux/armv7"),
        (" ANY ", "any"),
    ],
)
def test_platform_aliases_are_normalised(given: str, normal: str) -> None:
    assert normalise_platform(given) == normal


def test_platform_lists_are_sorted_unique_and_any_wins() -> None:
    assert normalise_platforms(["windows/amd64,linux/x86_64", "linux/amd64"]) == (
        "linux/x86_64",
        "windows/x86_64",
    )
    assert normalise_platforms(["linux/x86_64", "any"]) == ("any",)
    assert normalise_platforms([]) == ()
    here = this_platform()
    assert "/" in here and here == here.lower()
    assert ReleaseInfo().runs_on(here) and ReleaseInfo(platforms=("any",)).runs_on(here)
    assert not ReleaseInfo(platforms=("freebsd/armv7",)).runs_on("linux/x86_64")


def test_publish_signs_the_metadata_and_reports_it(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "game.bin").write_bytes(b"x" * 100)
    notes = tmp_path / "notes.txt"
    notes.write_text("Fixes the <b>crash</b> on load.\nÜmlauts too.\n", encoding="utf-8")
    info = release_info(
        update_type="Critical",
        notes=read_notes(notes),
        min_client="v0.1",
        platforms=["linux/amd64,macos/aarch64", "linux/x86_64"],
    )
    r = publish(
        tmp_path / "src", app="g", version="1", build=1, key=KEY, out=tmp_path / "cdn", info=info
    )
    out = r.as_json()
    assert out["update_type"] == "critical" and out["min_client"] == "0.1"
    assert out["platforms"] == ["linux/x86_64", "macos/arm64"] and out["format"] == 2
    assert out["notes"] == notes.read_text(encoding="utf-8")
    blob = (tmp_path / "cdn" / r.manifest_path).read_bytes()
    assert M.verify(M.parse_signed(blob), TRUST).info == info
    plain = publish(tmp_path / "src", app="g", version="1", build=2, key=KEY, out=tmp_path / "cdn")
    assert plain.as_json()["update_type"] is None and plain.manifest.format == 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"update_type": "urgent"}, "--type 'urgent' is not one of"),
        ({"min_client": "latest"}, "PEP 440"),
        ({"platforms": ["linux"]}, "OS/ARCH"),
        ({"platforms": ["beos/x86"]}, "OS/ARCH"),
        ({"notes": "x" * (MAX_NOTES_BYTES + 1)}, "at most 16384 bytes"),
    ],
)
def test_bad_metadata_is_a_usage_error(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        release_info(**kw)


def test_notes_files_are_bounded_and_utf8(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * (MAX_NOTES_BYTES + 1))
    with pytest.raises(UsageError, match="longer than 16384 bytes"):
        read_notes(big)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        read_notes(latin)
    exact = tmp_path / "exact.txt"
    exact.write_bytes("é".encode() * (MAX_NOTES_BYTES // 2))
    assert len(read_notes(exact)) == MAX_NOTES_BYTES // 2


_bencode_values = st.recursive(
    st.integers(-5, 1 << 20) | st.binary(max_size=40) | st.sampled_from([b"critical", b"any"]),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(KEYS)), _bencode_values, max_size=4))
def test_any_metadata_value_parses_or_is_a_manifest_error(fields: dict[bytes, Any]) -> None:
    """The parser's one promise for hostile input: a valid ReleaseInfo or a ManifestError."""
    try:
        info = ReleaseInfo.from_obj(fields)
    except ManifestError:
        return
    assert ReleaseInfo.from_obj(info.to_obj()) == info
    assert set(info.to_obj()) == set(fields)  # present means set: one encoding per value


@given(st.sampled_from([*_PLATFORMS, "any", "Linux/AMD64", "darwin/aarch64", "win32/i686"]))
def test_normalising_a_platform_twice_changes_nothing(text: str) -> None:
    once = normalise_platform(text)
    assert normalise_platform(once) == once
