"""The PostgreSQL fleet's counters: replicas writing the same nodes at once, with expiry
running, leave them equal to a count of the seats; a database migrated from before the
counters gets them from its seats; a fleet kept in Redis moves into PostgreSQL whole."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import psycopg
import pytest
import trio

from tracker import pg
from tracker.fleet import FleetOutcome, Sighting
from tracker.fleet_pg import PGFleet
from tracker.fleet_redis import RedisFleet
from tracker.pg import PGDatabase

T0 = 1_800_000_000.0
BUILDS = [(bytes([b]) * 32, b) for b in range(1, 5)]


def node(i: int) -> bytes:
    return i.to_bytes(20, "big")


def counted(url: str) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """(per (app, build m) and per (app, client)): the counters, and a count of the seats."""
    with psycopg.connect(url) as c:
        kept = {
            (what + ":" + app, key): int(n)
            for app, what, key, n in c.execute(
                "SELECT app, what, key, n FROM fleet_counts WHERE n <> 0"
            )
        }
        truth = {
            ("b:" + app, m): int(n)
            for app, m, n in c.execute("SELECT app, m, COUNT(*) FROM fleet_seats GROUP BY 1, 2")
        }
        truth |= {
            ("c:" + app, cl): int(n)
            for app, cl, n in c.execute(
                "SELECT app, client, COUNT(*) FROM fleet_seats GROUP BY 1, 2"
            )
        }
    return kept, truth


def test_replicas_writing_the_same_nodes_at_once_never_make_the_counts_drift(
    pg_url: str,
) -> None:
    """Three replicas write overlapping nodes moving between builds and client versions, in
    batches, concurrently, while one expires old seats: the counters stay exact."""
    fleets = [PGFleet(PGDatabase(pg_url), ttl=100) for _ in range(3)]
    errors: list[BaseException] = []

    def replica(r: int) -> None:
        f = fleets[r]
        try:
            for rnd in range(12):
                # each node is written by two replicas, but the last 40 stop being written
                # (by replica 2) after a few rounds, so that expiry takes them
                for i in range(r * 40, r * 40 + (160 if r < 2 or rnd < 4 else 120)):
                    m, b = BUILDS[(i + rnd + r) % len(BUILDS)]
                    done = (i + rnd) % 3 != 0
                    client = None if i % 5 == 0 else f"0.{(rnd + r) % 3}.0"
                    app = "game" if i % 4 else "tool"
                    f.seen(
                        Sighting(
                            node(i), app, m if done else None, b if done else None, client,
                            T0 + rnd * 20 + (i % 7),
                        )
                    )  # fmt: skip
                    if i % 11 == 0:
                        f.outcome(FleetOutcome(node(i), app, m, "update", None, 0, b, T0 + rnd))
                f.write(f.take())
                if r == 0 and rnd % 3 == 2:
                    f._gc(T0 + rnd * 20 + 60)  # expires the seats unseen for 2 rounds
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    fleets[0]._gc(T0 + 12 * 20 + 60)  # whatever the threads' pace, the last 40 have gone
    for f in fleets:
        f.db.close()
    kept, truth = counted(pg_url)
    assert kept == truth
    assert 0 < sum(n for (k, _), n in truth.items() if k == "b:game") < 180


def test_a_fleet_from_before_the_counters_is_counted_when_migrated(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        monkeypatch.setattr(pg, "MIGRATIONS", pg.MIGRATIONS[:4])
        pg.migrate(c)
        rows: list[Any] = [
            ("game", node(i), f"{i % 2:016x}" if i % 3 else "-", 10, f"0.{i % 2}", "")
            for i in range(9)
        ]
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO fleet_seats (app, node, m, seen, client, outcome) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                rows,
            )
        monkeypatch.undo()
        assert pg.migrate(c) == len(pg.MIGRATIONS)
    kept, truth = counted(pg_url)
    assert kept == truth and truth[("b:game", "-")] == 3
    f = PGFleet(PGDatabase(pg_url), ttl=100)
    f.seen(Sighting(node(0), "game", b"\x05" * 32, 5, "0.9", T0))  # moves off "-"
    f.write(f.take())
    f.db.close()
    kept, truth = counted(pg_url)
    assert kept == truth and truth[("b:game", "-")] == 2 and truth[("c:game", "0.9")] == 1


async def test_a_fleet_kept_in_redis_is_copied_into_postgres_and_answers_alike(
    pg_url: str, redis_url: str
) -> None:
    """``tracker registry copy --fleet-from`` (the switch from a Redis fleet): the same
    views, curves and outcomes from PostgreSQL; a second copy is refused, writing nothing."""
    src = RedisFleet(redis_url, prefix="t:", ttl=100, bucket=60)
    for i in range(30):
        m, b = BUILDS[i % 3]
        src.seen(Sighting(node(i), "game" if i % 5 else "tool", m, b, f"0.{i % 2}", T0 + i))
    src.seen(Sighting(node(99), "game", None, None, None, T0))
    failed = FleetOutcome(node(3), "game", BUILDS[3][0], "update", "network_timeout", 1, 4, T0)
    src.outcome(failed)
    src.write(src.take())
    src._gc(T0 + 50)  # one adoption sample
    cmd = [sys.executable, "-m", "tracker", "registry", "copy", "--fleet-from", redis_url,
           "--redis-prefix", "t:", "--to", pg_url, "--json"]  # fmt: skip
    out = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "fleet_seats": 31, "fleet_builds": 6, "fleet_series": 2, "fleet_recent": 1
    }  # fmt: skip
    dst = PGFleet(PGDatabase(pg_url), ttl=100, bucket=60)
    for app in ("game", "tool"):
        assert await dst.app_view(app, T0 + 60) == await src.app_view(app, T0 + 60)
    assert await dst.node_view(node(3)) == await src.node_view(node(3))
    assert sorted((await dst.gauges())["builds"]) == sorted((await src.gauges())["builds"])
    kept, truth = counted(pg_url)
    assert kept == truth
    again = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    )
    assert again.returncode != 0 and "already holds a fleet" in again.stderr
    dst.db.close()
    src.close()


def test_counters_a_tracker_without_them_left_behind_are_recounted_once_per_bucket(
    pg_url: str,
) -> None:
    """A replica from before the counters moves seats without them (a rolling upgrade): the
    replica that takes the next adoption sample counts the seats afresh."""
    f = PGFleet(PGDatabase(pg_url), ttl=10_000, bucket=60)
    for i in range(10):
        f.seen(Sighting(node(i), "game", BUILDS[i % 2][0], i % 2 + 1, "0.1", T0))
    f.write(f.take())
    f._gc(T0)  # this bucket's sample (and recount)
    with psycopg.connect(pg_url, autocommit=True) as c:  # what an older tracker would do
        c.execute(
            "UPDATE fleet_seats SET m = %s WHERE node = %s", (BUILDS[1][0].hex()[:16], node(0))
        )
        c.execute("DELETE FROM fleet_seats WHERE node = %s", (node(2),))
    kept, truth = counted(pg_url)
    assert kept != truth
    f._gc(T0 + 30)  # same bucket: no recount
    assert counted(pg_url)[0] == kept
    f._gc(T0 + 60)
    kept, truth = counted(pg_url)
    assert kept == truth and truth[("b:game", BUILDS[1][0].hex()[:16])] == 6
    f.db.close()
