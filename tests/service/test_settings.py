"""Settings: the config file's [service] table, overlaid key by key by the API's changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.errors import UsageError
from p2pnode.node.config import load_config
from p2pnode.service.schedule import Caps
from p2pnode.service.settings import ServiceSettings, Settings
from p2pnode.service.statedir import DamagedStateError

M = 1024 * 1024


def test_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[service]\nmax_active = 2\nmax_download_rate = "40M"\n'
        '[[service.alt_speed]]\ndays = "weekdays"\nbegin = "18:00"\nend = "23:00"\n'
        'download = "1M"\n'
    )
    s = Settings(load_config(path).service, str(path)).current
    assert s.max_active == 2
    assert s.schedule.base == Caps(40 * M, None)
    assert s.schedule.alt[0].caps == Caps(1 * M, None)


def test_api_changes_win_survive_a_restart_and_can_be_reset(tmp_path: Path) -> None:
    table = {"max_active": 2, "max_download_rate": "40M"}
    s = Settings(table, "config.toml")
    assert s.set("max_active", "3").max_active == 3  # as typed on the command line
    s.set("max_download_rate", "0")
    s.save(tmp_path / "settings.json")
    again = Settings.load(table, "config.toml", tmp_path / "settings.json")
    assert again.current == ServiceSettings(3, again.current.schedule)
    assert again.current.schedule.base.download is None
    assert again.reset("max_download_rate").schedule.base.download == 40 * M
    assert again.overrides == {"max_active": "3"}


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("max_active", 0, "from 1 to 64"),
        ("max_active", "many", "from 1 to 64"),
        ("max_upload_rate", "fast", "40M"),
        ("colour", "red", "max_active"),
        ("update_window", [{"begin": "7"}], "HH:MM"),
    ],
)
def test_a_bad_change_is_refused_and_changes_nothing(key: str, value: object, fix: str) -> None:
    s = Settings({}, "config.toml")
    before = s.current
    with pytest.raises(UsageError) as info:
        s.set(key, value)
    assert fix in info.value.fix
    assert s.current == before and s.overrides == {}


def test_an_unknown_key_in_the_file_is_named() -> None:
    with pytest.raises(UsageError, match=r"service\.max_actve"):
        Settings({"max_actve": 1}, "config.toml")


def test_defaults_and_a_damaged_overrides_file(tmp_path: Path) -> None:
    assert Settings.load({}, "c", tmp_path / "settings.json").current == ServiceSettings()
    (tmp_path / "settings.json").write_text('{"format": 1, "overrides": {"x": 1}}')
    with pytest.raises(DamagedStateError, match="settings"):
        Settings.load({}, "c", tmp_path / "settings.json")
