"""The whole publishing path through a real tracker process and a real nginx."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from p2pnode.demo.cdn import LocalCDN
from tests.support.e2e import ADMIN, cli, registered_app
from tests.support.release import tree


def test_publish_through_tracker_reaches_a_watching_node(tmp_path: Path, tracker_url: str) -> None:
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    dest = tmp_path / "game"
    with LocalCDN(cdn_root) as cdn:
        common = [
            "--app",
            "game",
            "--key",
            str(key),
            "--out",
            str(cdn_root),
            "--tracker",
            tracker_url,
            "--token",
            ADMIN,
            "--mirror",
            cdn.url,
        ]
        cli("publish", str(src), "--version", "1", "--build", "1", *common)
        # a node that trusts another key refuses the build: reported as a failed install
        other = str(cli("keygen", str(tmp_path / "other.pem"))["key"])
        refused = ["install", "game", "--tracker", tracker_url, "--dest", str(tmp_path / "x")]
        cli(*refused, "--trust", other, ok=False)
        # Resolve the channel through the tracker; files come from the mirror in the manifest.
        out = cli("install", "game", "--tracker", tracker_url, "--dest", str(dest), "--trust", pub)
        assert out["build"] == 1 and tree(dest) == tree(src)

        watcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p2pnode",
                "watch",
                "game",
                "--tracker",
                tracker_url,
                "--dest",
                str(dest),
                "--max-updates",
                "2",
                "--timeout",
                "60",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert watcher.stdout is not None
        events = [json.loads(watcher.stdout.readline()) for _ in range(3)]
        assert [e["event"] for e in events] == ["watching", "release", "installed"]
        assert events[2]["action"] == "unchanged"  # the current head (build 1, installed)
        (src / "data" / "new.pak").write_bytes(b"build two" * 1000)
        cli("publish", str(src), "--version", "2", "--build", "2", *common)
        published = time.monotonic()
        release = json.loads(watcher.stdout.readline())
        seen = time.monotonic()
        assert release["event"] == "release" and release["build"] == 2
        assert seen - published < 1.0, f"the node learned of build 2 after {seen - published:.2f}s"
        installed = json.loads(watcher.stdout.readline())
        assert installed["event"] == "installed" and installed["build"] == 2
        watcher.wait(timeout=30)
        assert tree(dest) == tree(src)
        assert 0 < int(installed["bytes_cdn"]) < (1 << 20)  # only the new file's chunks

        # a repair and a rollback with --tracker are install outcomes too (issue 18), beside
        # the installs (install --tracker: the refused one and the first) and the update (watch)
        damaged = dest / "data" / "new.pak"
        damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
        fixed = cli("verify", "--dest", str(dest), "--repair", "--tracker", tracker_url)
        assert fixed["repaired"] == ["data/new.pak"], fixed
        back = cli("rollback", "--dest", str(dest), "--tracker", tracker_url)
        assert back["build"] == 1 and "warning" not in back["_stderr"], back["_stderr"]
    tally = httpx.get(f"{tracker_url}/v1/outcomes?app=game").json()["releases"]
    kinds = {r["build"]: r["by_kind"] for r in tally}
    assert kinds[1] == {
        "install": {"success": 1, "failure": 1},
        "rollback": {"success": 1, "failure": 0},
    }, kinds
    assert {r["build"]: r["failure_codes"] for r in tally}[1] == {"signature_invalid": 1}
    assert kinds[2] == {
        "update": {"success": 1, "failure": 0},
        "repair": {"success": 1, "failure": 0},
    }, kinds
    assert {r["build"]: r["rollbacks"] for r in tally} == {1: 1, 2: 0}
    # the rollback counts against the build the node fled
    assert {r["build"]: r["rollbacks_from"] for r in tally} == {1: 0, 2: 1}


def test_nodes_find_each_other_through_tracker_announces(tmp_path: Path, tracker_url: str) -> None:
    """A seeding node announces itself; the next node gets it from the tracker as a peer and
    fetches everything from it; both report, and the tracker's offload shows it."""
    from p2pnode.demo.cdn import free_port

    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        cli(
            "publish",
            str(src),
            "--app",
            "game",
            "--version",
            "1",
            "--build",
            "1",
            "--key",
            str(key),
            "--out",
            str(cdn_root),
            "--tracker",
            tracker_url,
            "--token",
            ADMIN,
            "--mirror",
            cdn.url,
        )
        env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "home1")}
        port1 = free_port()
        first = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p2pnode",
                "install",
                "game",
                "--tracker",
                tracker_url,
                "--dest",
                str(tmp_path / "n1"),
                "--trust",
                pub,
                "--listen",
                f"127.0.0.1:{port1}",
                "--seed",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert first.stdout is not None
            r1 = json.loads(first.stdout.readline() or "{}")
            assert r1.get("event") == "installed", first.stderr.read() if first.stderr else ""
            assert r1["bytes_cdn"] > 0
            time.sleep(0.3)  # its completed announce goes out right after the install
            env2 = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "home2")}
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "p2pnode",
                    "install",
                    "game",
                    "--tracker",
                    tracker_url,
                    "--dest",
                    str(tmp_path / "n2"),
                    "--trust",
                    pub,
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=env2,
            )
            assert proc.returncode == 0, proc.stderr
            r2 = json.loads(proc.stdout)
            assert r2["bytes_cdn"] == 0 and r2["bytes_peers"] > 0
            assert list(r2["peers"]) == [f"127.0.0.1:{port1}"]
            assert r2["peers"][f"127.0.0.1:{port1}"]["first_piece_ms"] > 0
            stats = httpx.get(tracker_url + "/v1/stats").json()
            release = next(x for x in stats["releases"] if x["build"] == 1)
            assert 0.4 < release["offload_ratio"] < 0.6  # one node from the CDN, one from peers
        finally:
            first.send_signal(signal.SIGINT)
            first.wait(timeout=10)
        assert tree(tmp_path / "n2") == tree(src)


def test_install_through_a_tracker_names_the_node_to_a_staged_rollout(
    tmp_path: Path, tracker_url: str
) -> None:
    """``install``/``update --tracker`` send the node's id and installed build with the feed
    request: out of a rollout the node gets the previous build, and once the rollout is raised
    over its place it gets the new one (without its id it would stay out until completion)."""
    from p2pnode.identity import load_or_create
    from tracker.rollout import BUCKETS, bucket

    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    home = tmp_path / "home"
    me = load_or_create(home / "p2pnode")  # where the CLI finds it under XDG_DATA_HOME
    env = {**os.environ, "XDG_DATA_HOME": str(home)}
    dest = tmp_path / "game"

    def node(verb: str) -> dict[str, object]:
        args = [sys.executable, "-m", "p2pnode", verb, "game", "--tracker", tracker_url,
                "--dest", str(dest), "--trust", pub, "--json"]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        out: dict[str, object] = json.loads(proc.stdout)
        return out

    with LocalCDN(cdn_root) as cdn:
        common = ["--app", "game", "--key", str(key), "--out", str(cdn_root), "--tracker",
                  tracker_url, "--token", ADMIN, "--mirror", cdn.url]  # fmt: skip
        cli("publish", str(src), "--version", "1", "--build", "1", *common)
        (src / "data" / "new.pak").write_bytes(b"build two" * 1000)
        two = cli("publish", str(src), "--version", "2", "--build", "2", *common,
                  "--rollout", "0.01")  # fmt: skip
        place = bucket(bytes.fromhex(str(two["manifest_id"])), me.node_id)
        if place < 1:
            import pytest

            pytest.skip("this node id falls in the rollout's first bucket")  # 1 in BUCKETS
        assert node("install")["build"] == 1  # outside the rollout: the previous build
        raise_to = (place + 1) * 100 / BUCKETS
        verb = [sys.executable, "-m", "tracker", "rollout", "game", "stable", "raise",
                str(raise_to), "--url", tracker_url, "--token", ADMIN, "--json"]  # fmt: skip
        subprocess.run(verb, check=True, capture_output=True, timeout=30)
        assert node("update")["build"] == 2
        assert tree(dest) == tree(src)


def test_a_one_off_install_tells_the_fleet_view_its_client_version(
    tmp_path: Path, tracker_url: str
) -> None:
    """`install --tracker` announces once (its completion) with a client of its own: the
    tracker's answer lists the client field, so the node says it in one more announce, and
    the fleet view does not count it as an "unknown" client."""
    from p2pnode import __version__

    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        cli("publish", str(src), "--version", "1", "--build", "1", "--app", "game", "--key",
            str(key), "--out", str(cdn_root), "--tracker", tracker_url, "--token", ADMIN,
            "--mirror", cdn.url)  # fmt: skip
        out = cli("install", "game", "--tracker", tracker_url, "--dest", str(tmp_path / "game"),
                  "--trust", pub)  # fmt: skip
    assert out["build"] == 1 and "warning" not in out["_stderr"], out["_stderr"]
    fleet = httpx.get(f"{tracker_url}/v1/apps/game/fleet").json()
    assert fleet["clients"] == {__version__: 1}, fleet
    assert [(b["build"], b["nodes"]) for b in fleet["builds"]] == [(1, 1)]
    stats = httpx.get(f"{tracker_url}/v1/stats").json()
    (release,) = [r for r in stats["releases"] if r["app"] == "game"]
    assert release["completed"] == 1, release  # the second announce is no second completion
