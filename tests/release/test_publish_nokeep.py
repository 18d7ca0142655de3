"""publish --never-keep: patterns land in the signed manifest, bad ones are refused early."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.errors import UsageError
from p2pnode.release import manifest as M
from p2pnode.release.publish import publish
from tests.support.release import KEY, TRUST


def test_never_keep_is_signed_and_reported(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "game.bin").write_bytes(b"x" * 100)
    r = publish(
        tmp_path / "src",
        app="g",
        version="1",
        build=1,
        key=KEY,
        out=tmp_path / "cdn",
        nokeep=["cache/*", "logs"],
    )
    assert r.as_json()["nokeep"] == ["cache/*", "logs"]
    blob = (tmp_path / "cdn" / r.manifest_path).read_bytes()
    assert M.verify(M.parse_signed(blob), TRUST).nokeep == ("cache/*", "logs")
    plain = publish(tmp_path / "src", app="g", version="1", build=2, key=KEY, out=tmp_path / "cdn")
    assert plain.as_json()["nokeep"] == [] and b"nokeep" not in plain.signed.raw


@pytest.mark.parametrize("nokeep", [["../cache"], ["/tmp/*"], ["a/**"], ["c"] * 65])
def test_bad_never_keep_is_a_usage_error_before_reading(tmp_path: Path, nokeep: list[str]) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(UsageError):
        publish(
            tmp_path / "src",
            app="g",
            version="1",
            build=1,
            key=KEY,
            out=tmp_path / "cdn",
            nokeep=nokeep,
        )
    assert not (tmp_path / "cdn").exists()
