"""The state dir: one daemon per dir (flock, across processes too), the token, JSON files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pnode.service.statedir import (
    MAX_STATE_FILE_BYTES,
    DamagedStateError,
    ServiceLockedError,
    StateDir,
    read_json,
    write_json,
)


def test_a_second_owner_in_this_process_is_refused(tmp_path: Path) -> None:
    with StateDir(tmp_path / "s") as first:
        assert first.locked
        with pytest.raises(ServiceLockedError, match="another p2pnode daemon") as info:
            StateDir(tmp_path / "s").lock()
        assert "--state" in str(info.value)
    StateDir(tmp_path / "s").lock()  # released on exit
    assert os.stat(tmp_path / "s").st_mode & 0o777 == 0o700


def test_a_second_process_is_refused_and_a_killed_owner_frees_the_dir(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from p2pnode.service.statedir import StateDir;"
        "d = StateDir(Path(sys.argv[1])); d.lock(); print('locked', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        with pytest.raises(ServiceLockedError):
            StateDir(tmp_path).lock()
    finally:
        proc.kill()  # like kill -9: no cleanup runs, the kernel drops the flock
        proc.wait()
    with StateDir(tmp_path):
        pass


def test_locking_twice_through_one_object_is_a_bug(tmp_path: Path) -> None:
    with StateDir(tmp_path) as d, pytest.raises(RuntimeError):
        d.lock()


def test_token_is_made_once_private_and_stable(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "s")
    token = d.api_token()
    assert len(token) >= 40
    assert os.stat(d.token_file).st_mode & 0o777 == 0o600
    assert StateDir(tmp_path / "s").api_token() == token


def test_a_token_others_can_read_is_refused(tmp_path: Path) -> None:
    d = StateDir(tmp_path)
    d.api_token()
    os.chmod(d.token_file, 0o644)
    with pytest.raises(DamagedStateError, match="chmod 600"):
        d.api_token()


def test_an_empty_token_is_refused(tmp_path: Path) -> None:
    d = StateDir(tmp_path)
    d.token_file.write_text("")
    os.chmod(d.token_file, 0o600)
    with pytest.raises(DamagedStateError, match="delete"):
        d.api_token()


def test_json_round_trip_is_private(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    assert read_json(p) is None
    write_json(p, {"a": [1, 2]})
    assert read_json(p) == {"a": [1, 2]}
    assert os.stat(p).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "data",
    [b"{", b"[1]", b"\xff", b" " * (MAX_STATE_FILE_BYTES + 1)],
    ids=["cut", "list", "utf8", "big"],
)
def test_damaged_json_names_the_file(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "x.json"
    p.write_bytes(data)
    with pytest.raises(DamagedStateError, match=r"x\.json"):
        read_json(p)
