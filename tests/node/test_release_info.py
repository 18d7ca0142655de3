"""Release metadata end to end through the CLI: publish signs it, install reports it, and a build
this node cannot run is refused before a single chunk is asked of the CDN."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode import __version__
from p2pnode.demo.cdn import LocalCDN
from p2pnode.node.render import print_install, print_watch_event
from p2pnode.release.metadata import this_platform
from tests.support.e2e import cli
from tests.support.release import make_release


def _other_platform() -> str:
    return "windows/armv7" if this_platform() != "windows/armv7" else "linux/armv7"


def test_publish_install_and_refusals_through_the_cli(tmp_path: Path, cdn: LocalCDN) -> None:
    src = tmp_path / "src"
    make_release(src, big=1 << 20)
    key = tmp_path / "k.pem"
    pub = str(cli("keygen", str(key))["key"])
    notes = tmp_path / "notes.txt"
    notes.write_text("Fixes <script>alert(1)</script> & more\n", encoding="utf-8")

    def publish(build: int, *extra: str) -> str:
        out = cli(
            "publish", str(src), "--app", "game", "--version", f"1.{build}",
            "--build", str(build), "--key", str(key), "--out", str(cdn.root), *extra,
        )  # fmt: skip
        return cdn.url + str(out["manifest"])

    def refused(manifest: str, dest: Path) -> dict[str, object]:
        cdn.clear_log()
        out = cli("install", manifest, "--dest", str(dest), "--trust", pub, ok=False)
        assert out["ok"] is False
        uris = [line.uri for line in cdn.log()]
        assert uris and all(u.endswith("/manifest.p2pm") for u in uris), uris  # no chunk
        assert not dest.exists() and not (dest.parent / f".{dest.name}.p2pnode").exists()
        return out

    too_new = publish(1, "--min-client", "99.0", "--type", "critical")
    out = refused(too_new, tmp_path / "a")
    assert f"needs p2pnode 99.0 or newer; this is p2pnode {__version__}" in str(out["error"])
    assert "upgrade p2pnode" in str(out["fix"])

    elsewhere = publish(2, "--platform", _other_platform())
    out = refused(elsewhere, tmp_path / "b")
    assert f"built for {_other_platform()}; this machine is {this_platform()}" in str(out["error"])

    here = this_platform().replace("x86_64", "amd64")  # an alias, normalised at publish
    pub_out = cli(
        "publish", str(src), "--app", "game", "--version", "1.3", "--build", "3",
        "--key", str(key), "--out", str(cdn.root), "--type", "hotfix", "--notes", str(notes),
        "--min-client", __version__, "--platform", f"{here},{_other_platform()}",
    )  # fmt: skip
    assert pub_out["update_type"] == "hotfix" and pub_out["format"] == 2
    assert pub_out["notes"] == notes.read_text(encoding="utf-8")
    assert pub_out["platforms"] == sorted([this_platform(), _other_platform()])
    installed = cli(
        "install", cdn.url + str(pub_out["manifest"]), "--dest", str(tmp_path / "c"),
        "--trust", pub,
    )  # fmt: skip
    assert installed["action"] == "installed" and installed["update_type"] == "hotfix"
    plain = cli("install", publish(4), "--dest", str(tmp_path / "d"), "--trust", pub)
    assert plain["update_type"] is None


def test_publish_refuses_bad_metadata_before_reading(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_release(src, big=1 << 16)
    key = tmp_path / "k.pem"
    cli("keygen", str(key))
    base = ["publish", str(src), "--app", "g", "--version", "1", "--build", "1"]
    base += ["--key", str(key), "--out", str(tmp_path / "cdn")]
    for extra, said in (
        (["--type", "urgent"], "not one of critical, major, minor, hotfix, beta"),
        (["--platform", "linux"], "OS/ARCH"),
        (["--min-client", "newest"], "PEP 440"),
    ):
        out = cli(*base, *extra, ok=False)
        assert said in str(out["error"]) and not (tmp_path / "cdn").exists()
    big = tmp_path / "notes.txt"
    big.write_text("x" * (16 * 1024 + 1))
    out = cli(*base, "--notes", str(big), ok=False)
    assert "longer than 16384 bytes" in str(out["error"])


def test_people_read_the_update_type_too(capsys: pytest.CaptureFixture[str]) -> None:
    release = {"event": "release", "app": "game", "build": 2, "version": "1.2"}
    print_watch_event({**release, "update_type": "critical", "critical": True})
    print_watch_event({**release, "update_type": None, "critical": False})
    print_install(
        {
            "app": "game",
            "version": "1.2",
            "build": 2,
            "action": "unchanged",
            "update_type": "hotfix",
        }
    )
    assert capsys.readouterr().out.splitlines() == [
        "game build 2 (1.2) is out (critical update)",
        "game build 2 (1.2) is out",
        "game 1.2 (build 2), a hotfix update is already installed",
    ]
