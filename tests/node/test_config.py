"""The node config file: defaults for discovery, strictly checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.errors import UsageError
from p2pnode.node.cli import build_parser
from p2pnode.node.config import NodeConfig, load_config
from p2pnode.node.flags import discovery_flags


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2PNODE_CONFIG", str(tmp_path / "absent.toml"))
    assert load_config() == NodeConfig()
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "absent.toml")  # named explicitly: a mistake


def test_a_good_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[discovery]\ndht_port = 6881\ndht_bootstrap = ["10.0.0.5:6881", "[::1]:7000"]\n'
        "lan = true\n",
    )
    assert load_config(path) == NodeConfig(6881, ("10.0.0.5:6881", "[::1]:7000"), True)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[discovery]\ndht_prot = 1\n", "discovery.dht_prot"),
        ("[dht]\nport = 1\n", "dht"),
        ("[discovery]\ndht_port = 70000\n", "discovery.dht_port"),
        ("[discovery]\ndht_port = true\n", "discovery.dht_port"),
        ('[discovery]\ndht_bootstrap = "10.0.0.5:6881"\n', "discovery.dht_bootstrap"),
        ('[discovery]\ndht_bootstrap = ["10.0.0.5"]\n', "10.0.0.5"),
        ('[discovery]\nlan = "yes"\n', "discovery.lan"),
        ("discovery = 3\n", "discovery"),
        ("service = 3\n", "service must be a table"),
        ("[discovery\n", "not valid TOML"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(UsageError, match=names.replace("[", r"\[")):
        load_config(write(tmp_path, text))


def test_the_service_table_is_kept_for_the_daemon(tmp_path: Path) -> None:
    path = write(tmp_path, '[service]\nmax_active = 2\nmax_upload_rate = "1M"\n')
    assert load_config(path).service == {"max_active": 2, "max_upload_rate": "1M"}


def test_flags_win_and_bootstrap_lists_join(tmp_path: Path) -> None:
    path = write(tmp_path, '[discovery]\ndht_port = 6881\ndht_bootstrap = ["10.0.0.5:6881"]\n')
    argv = ["seed", "--dest", "d", "--listen", "0.0.0.0:1", "--config", str(path)]
    args = build_parser().parse_args(argv)
    assert discovery_flags(args) == {
        "dht_port": 6881,
        "dht_bootstrap": ["10.0.0.5:6881"],
        "lan": False,
    }
    args = build_parser().parse_args(
        [*argv, "--dht-port", "7000", "--dht-bootstrap", "10.0.0.6:1", "--lan"]
    )
    assert discovery_flags(args) == {
        "dht_port": 7000,
        "dht_bootstrap": ["10.0.0.5:6881", "10.0.0.6:1"],
        "lan": True,
    }
