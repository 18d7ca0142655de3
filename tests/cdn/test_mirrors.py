"""Which mirrors an install asks, in which order."""

from __future__ import annotations

from p2pnode.cdn.mirrors import resolve_mirrors
from p2pnode.release import keys
from p2pnode.release import manifest as M


def manifest(mirrors: tuple[str, ...] = ()) -> M.Manifest:
    return M.Manifest(
        app="game",
        version="1.0",
        build=3,
        channel="stable",
        created=1,
        expires=2,
        key=keys.public_key_bytes(keys.generate_key()),
        files=(),
        mirrors=mirrors,
    )


def test_explicit_mirrors_stand_alone_and_urls_end_in_a_slash() -> None:
    m = manifest(("https://signed.example/",))
    got = resolve_mirrors(["https://a.example", "/srv/cdn", "https://a.example/"], None, m, ["x/"])
    assert got == ["https://a.example/", "/srv/cdn"]


def test_the_manifests_own_root_then_signed_then_previous_each_once() -> None:
    m = manifest(("https://signed.example/", "https://old.example/"))
    got = resolve_mirrors(
        [], "https://cdn.example/game/3/manifest.p2pm", m, ["https://old.example/", "https://z/"]
    )
    assert got == [
        "https://cdn.example/",
        "https://signed.example/",
        "https://old.example/",
        "https://z/",
    ]


def test_a_location_that_is_no_release_path_adds_no_root() -> None:
    m = manifest(("https://signed.example/",))
    assert resolve_mirrors([], "https://x.example/m", m) == ["https://signed.example/"]
