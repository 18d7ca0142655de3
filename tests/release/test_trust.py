"""The rules that decide whether a verified manifest may replace the installed one."""

from __future__ import annotations

import pytest

from p2pnode.errors import DowngradeError, InstallError, NotInstalledError
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.release.trust import Offer, judge_offer, trusted_keys

KEY = keys.public_key_bytes(keys.generate_key())


def manifest(app: str = "game", build: int = 5, version: str = "1.0") -> M.Manifest:
    return M.Manifest(
        app=app,
        version=version,
        build=build,
        channel="stable",
        created=1,
        expires=2,
        key=KEY,
        files=(),
    )


def test_nothing_installed_is_a_fresh_install_unless_update_requires_one() -> None:
    assert judge_offer(manifest(), None, "/x") is Offer.FRESH
    with pytest.raises(NotInstalledError, match="nothing is installed in /x"):
        judge_offer(manifest(), None, "/x", require_installed=True)


def test_the_installed_manifest_again_is_unchanged() -> None:
    assert judge_offer(manifest(), manifest(), "/x") is Offer.UNCHANGED


def test_a_newer_build_is_an_update() -> None:
    assert judge_offer(manifest(build=6), manifest(build=5), "/x") is Offer.UPDATE


def test_an_older_build_is_a_downgrade() -> None:
    with pytest.raises(DowngradeError, match="has build 5; the manifest offers older build 4"):
        judge_offer(manifest(build=4), manifest(build=5), "/x")


def test_a_second_manifest_for_the_installed_build_is_equivocation() -> None:
    with pytest.raises(DowngradeError, match="two manifests claim one build") as err:
        judge_offer(manifest(version="1.0-evil"), manifest(), "/x")
    assert "genuine" in err.value.fix


def test_another_app_is_refused_before_any_build_rule() -> None:
    with pytest.raises(InstallError, match="holds game, not chat"):
        judge_offer(manifest(app="chat", build=1), manifest(), "/x")


def test_given_keys_win_over_pinned_ones() -> None:
    other = keys.public_key_bytes(keys.generate_key())
    pinned = [keys.format_public_key(KEY)]
    assert trusted_keys([other], pinned) == {other}
    assert trusted_keys([], pinned) == {KEY}
    assert trusted_keys([], ()) == set()
