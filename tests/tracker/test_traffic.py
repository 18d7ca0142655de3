"""The traffic series: the recorder's arithmetic, and the same checks on the SQLite store, on a
real redis-server and on a real PostgreSQL server (tracker.traffic, tracker.traffic_store,
tracker.traffic_redis, tracker.traffic_pg)."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from tracker import traffic_pg, traffic_redis, traffic_store
from tracker.errors import RegistryUnavailable
from tracker.load_http import LoadRoutes
from tracker.pg import MIGRATIONS, PGDatabase, migrate
from tracker.registry_redis import RedisRegistry
from tracker.traffic import (
    FORECAST_RETENTION_S,
    RETENTION_S,
    MinuteRow,
    TrafficBatch,
    TrafficRecorder,
    per_minute,
    release_hour,
)
from tracker.traffic_store import SQLiteTraffic, TrafficStore

M1, M2, M3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
T0 = 1_800_000_000.0 // 86400 * 86400  # a UTC midnight
MIN0 = int(T0) // 60


def rel(mid: bytes, completed: int, peers: int, cdn: int, app: str = "game") -> dict[str, Any]:
    return {
        "manifest_id": mid.hex(),
        "app": app,
        "completed": completed,
        "bytes_from_peers": peers,
        "bytes_from_cdn": cdn,
    }


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TrafficStore]:
    if request.param == "sqlite":
        s: TrafficStore = SQLiteTraffic(tmp_path / "traffic.db")
        yield s
        s.close()
        return
    if request.param == "postgres":
        db = PGDatabase(request.getfixturevalue("pg_url"))
        yield traffic_pg.PGTraffic(db)
        db.close()
        return
    url = request.getfixturevalue("redis_url")
    reg = RedisRegistry(url, prefix="t:")
    yield traffic_redis.RedisTraffic(reg)
    reg.close()


def test_levels_become_bytes_per_minute_and_adds_are_summed() -> None:
    r = TrafficRecorder()
    assert r.due(T0 + 60)
    # a level read in a minute's first seconds is the level at the end of the minute before
    assert r.sample([rel(M1, 0, 0, 100)], T0 + 61) == 1
    assert not r.due(T0 + 90)
    assert r.sample([rel(M1, 0, 0, 100)], T0 + 120) == 0  # unchanged: nothing written
    r.sample([rel(M1, 2, 300, 150)], T0 + 180)
    r.outcome("game", M1, {"reused": 40, "patches": 0}, T0 + 125)
    split = {"reused": 2, "patches": 7, "patches_cdn": 5, "patches_peers": 2, "peers": 9}
    r.outcome("game", M1, split, T0 + 130)  # (an outcome's peers and cdn are not added)
    r.outcome("game", M1, {"reused": 0, "patches": 0}, T0 + 130)  # nothing to add
    b = r.take()
    assert not r.take()
    assert b.adds == {
        (M1, MIN0 + 2): ("game", {"reused": 42, "patches": 7, "patches_cdn": 5, "patches_peers": 2})
    }
    rows = [
        MinuteRow(m, levels, b.adds.get((M1, m), ("", {}))[1])
        for (_, m), (_, levels) in sorted(b.levels.items())
    ]
    none = {"patches_cdn": 0, "patches_peers": 0}
    assert per_minute(rows, MIN0) == [
        {"t": MIN0 * 60, "completed": 0, "peers": 0, "cdn": 100, "reused": 0, "patches": 0, **none},
        {"t": (MIN0 + 2) * 60, "completed": 2, "peers": 300, "cdn": 50, "reused": 42, "patches": 7,
         "patches_cdn": 5, "patches_peers": 2},
    ]  # fmt: skip
    # a series whose first minutes were deleted starts from its oldest level, not from zero;
    # a level that fell (the swarm's state was lost) counts from zero again
    trimmed = [rows[1], MinuteRow(MIN0 + 3, {"completed": 1, "peers": 10, "cdn": 5}, {})]
    assert [(x["peers"], x["cdn"]) for x in per_minute(trimmed, MIN0)] == [(0, 0), (10, 5)]


def test_a_failed_write_is_retried_whole_before_newer_adds() -> None:
    """The failed batch comes back as it was, with its id (it may have been applied: only the
    store can tell), and what arrived meanwhile follows in a batch of its own."""
    r = TrafficRecorder()
    r.outcome("game", M1, {"reused": 5, "patches": 0}, T0)
    r.announced("game", T0)
    b = r.take()
    r.outcome("game", M1, {"reused": 1, "patches": 0}, T0)
    r.restore(b)
    assert r.retrying and r.pending_adds(M1) == {MIN0: {"reused": 6}}
    again = r.take()
    assert again is b and again.adds[(M1, MIN0)][1] == {"reused": 5} and again.at == T0
    assert again.online == {("game", int(T0) // 86400, 0): 1}
    newer = r.take()
    assert not r.retrying and newer.id != b.id and newer.adds[(M1, MIN0)][1] == {"reused": 1}
    assert not r.take()


def test_housekeeping_writes_a_failed_batch_again_then_the_newer_one(tmp_path: Path) -> None:
    """The tracker's flush: a write that raised (applied or not, it cannot tell) is retried at
    the next flush with the same batch, before the adds gathered since."""
    inner = SQLiteTraffic(tmp_path / "traffic.db")
    written: list[TrafficBatch] = []

    class Flaky:
        blocking = False

        def write(self, batch: TrafficBatch) -> None:
            inner.write(batch)
            written.append(batch)
            if len(written) == 1:
                raise RegistryUnavailable("the reply was lost")

    class Swarm:
        async def stats(self, now: float) -> dict[str, Any]:
            return {"releases": []}

    routes = LoadRoutes(Flaky(), None, Swarm(), None, "", lambda: T0)  # type: ignore[arg-type]
    routes._trimmed = T0 + 1e9  # no trimming in this test

    async def go() -> None:
        routes.recorder.outcome("game", M1, {"reused": 30, "patches": 4}, T0)
        with pytest.raises(RegistryUnavailable):
            await routes.tick(T0, force=True)
        routes.recorder.outcome("game", M1, {"reused": 1, "patches": 0}, T0)
        await routes.tick(T0 + 10, force=True)

    trio.run(go)
    assert [len(b.adds) for b in written] == [1, 1, 1] and written[0] is written[1]
    assert [row.adds for row in inner.series(M1)[1]] == [{"reused": 31, "patches": 4}]
    inner.close()


def test_the_release_hour_starts_the_busiest_window() -> None:
    cells = [(1, h, 10) for h in range(24)] + [(1, 18, 50), (2, 19, 60), (2, 20, 40), (2, 4, -9)]
    out = release_hour(cells)
    assert out["recommended_hour"] == 18 and out["quietest_hour"] == 4
    assert out["days"] == 2 and len(out["histogram"]) == 24
    assert release_hour([])["recommended_hour"] is None
    # the window wraps around midnight
    assert release_hour([(1, 23, 5), (1, 0, 5), (1, 1, 5), (1, 12, 9)])["recommended_hour"] == 23


def write(store: TrafficStore, r: TrafficRecorder) -> None:
    store.write(r.take())


def test_a_level_read_late_in_a_minute_is_that_minutes() -> None:
    """A housekeeping pass held up past a minute's first seconds reads what nodes announced in
    that minute too: written as the minute before's, a build's first bytes were dated before
    its publish (the demo's forecast then compared 34 B against 293 KiB fetched)."""
    r = TrafficRecorder()
    r.sample([rel(M1, 1, 0, 100)], T0 + 65)  # on time: the minute before's level
    r.sample([rel(M2, 1, 0, 300)], T0 + 120 + 48)  # late: this minute's
    r.sample([rel(M2, 2, 0, 400)], T0 + 180 + 5)  # on time again: the same minute, higher
    assert sorted(r.take().levels) == [(M1, MIN0), (M2, MIN0 + 2)]


def test_stores_keep_the_highest_level_and_sum_adds_across_replicas(store: TrafficStore) -> None:
    a, b = TrafficRecorder(), TrafficRecorder()
    for rec in (a, b):  # two replicas read the same shared counters in the same minute
        rec.sample([rel(M1, 1, 100, 50), rel(M2, 0, 0, 10)], T0 + 60)
        rec.outcome("game", M1, {"reused": 30, "patches": 4}, T0 + 1)
        rec.outcome("game", M1, {"patches": 5, "patches_cdn": 3, "patches_peers": 1}, T0 + 2)
        rec.announced("game", T0 + 5)
    b.sample([rel(M1, 3, 400, 60)], T0 + 120)
    a.sample([rel(M1, 2, 200, 55)], T0 + 121)  # a lagging replica's lower reading
    for rec in (a, b):
        write(store, rec)
    first, rows = store.series(M1)
    assert first == MIN0
    got = per_minute(rows, first)
    assert [(x["completed"], x["peers"], x["cdn"]) for x in got] == [(1, 100, 50), (2, 300, 10)]
    assert (got[0]["reused"], got[0]["patches"]) == (60, 18)
    assert (got[0]["patches_cdn"], got[0]["patches_peers"]) == (6, 2)
    assert store.series(M3) == (None, [])
    assert store.online_cells("game", T0) == [(int(T0) // 86400, 0, 2)]
    assert store.online_cells("tool", T0) == []


def test_stores_apply_a_batch_written_twice_once(store: TrafficStore) -> None:
    """A write whose reply was lost is sent again: the second changes nothing (each store
    keeps the batch ids it applied), while a new batch with the same figures still adds."""
    r = TrafficRecorder()
    r.sample([rel(M1, 1, 100, 50)], T0 + 60)
    r.outcome("game", M1, {"reused": 30, "patches": 4}, T0 + 1)
    r.announced("game", T0 + 5)
    b = r.take()
    store.write(b)
    store.write(b)
    _, rows = store.series(M1)
    assert [row.adds for row in rows] == [{"reused": 30, "patches": 4}]
    assert store.online_cells("game", T0) == [(int(T0) // 86400, 0, 1)]
    r.outcome("game", M1, {"reused": 30, "patches": 4}, T0 + 1)
    store.write(r.take())
    _, rows = store.series(M1)
    assert [row.adds for row in rows] == [{"reused": 60, "patches": 8}]
    store.gc(T0 + RETENTION_S + 120)  # past retention, the id is forgotten with the minutes
    assert store.series(M1)[1] == []


class LoseOneReply:
    """A TCP proxy to redis-server that, once armed, lets the next script (EVAL/EVALSHA) reach
    the server and then drops that connection instead of passing the reply back: a write
    applied whose reply was lost. Other traffic passes through."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.armed = False
        self.scripts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            doomed = threading.Event()
            threading.Thread(target=self._up, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, doomed), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, doomed: threading.Event) -> None:
        while data := self._recv(src):
            if b"EVAL" in data.upper():
                self.scripts += 1
                if self.armed:
                    self.armed = False
                    doomed.set()
            if not self._send(dst, data):
                break
        self._drop(src, dst)

    def _down(self, src: socket.socket, dst: socket.socket, doomed: threading.Event) -> None:
        while data := self._recv(src):
            if doomed.is_set() or not self._send(dst, data):  # doomed: the script ran; its
                break  # reply is lost with the connection
        self._drop(src, dst)

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> bool:
        try:
            sock.sendall(data)
        except OSError:
            return False
        return True

    @staticmethod
    def _drop(*socks: socket.socket) -> None:
        for sock in socks:  # shutdown wakes the other direction's recv; then close
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def close(self) -> None:
        self.listener.close()


def test_redis_resending_a_script_whose_reply_was_lost_adds_once(redis_url: str) -> None:
    """The connection drops after redis-server ran the traffic script: redis-py sends it
    again on a new connection (its one retry), the write returns normally, and the bytes and
    online counts are counted once."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = LoseOneReply(port)
    reg = RedisRegistry(f"redis://127.0.0.1:{proxy.port}/0", prefix="lost:")
    store = traffic_redis.RedisTraffic(reg)
    try:
        r = TrafficRecorder()
        r.announced("tool", T0)
        store.write(r.take())  # the script is loaded (the first EVALSHA finds none)
        r.sample([rel(M1, 1, 100, 50)], T0 + 60)
        r.outcome("game", M1, {"reused": 30, "patches": 4}, T0 + 1)
        r.announced("game", T0 + 5)
        proxy.scripts, proxy.armed = 0, True
        store.write(r.take())
        assert proxy.scripts == 2 and not proxy.armed  # sent, lost, sent again
        _, rows = store.series(M1)
        assert [row.adds for row in rows] == [{"reused": 30, "patches": 4}]
        assert store.online_cells("game", T0) == [(int(T0) // 86400, 0, 1)]
    finally:
        reg.close()
        proxy.close()


def test_stores_forget_what_is_past_retention(store: TrafficStore) -> None:
    r = TrafficRecorder()
    r.sample([rel(M1, 1, 100, 50)], T0)
    r.announced("game", T0)
    write(store, r)
    later = T0 + RETENTION_S + 3 * 86400
    r.sample([rel(M2, 1, 10, 5)], later)
    r.announced("game", later)
    write(store, r)
    store.put_forecast(M1, "game", {"at": T0, "cdn_total": 5})
    store.put_forecast(M2, "game", {"at": later, "cdn_total": 6})
    store.gc(later)
    assert store.series(M1)[1] == []
    assert store.series(M2)[1] != []
    assert store.online_cells("game", later) == [(int(later) // 86400, 0, 1)]
    # forecasts (with their build's first day) outlive the minutes
    assert store.forecasts(M1) == [{"at": T0, "cdn_total": 5}]
    assert [(m, a) for m, a, _ in store.forecasts_since(T0 + 1)] == [(M2, "game")]
    store.gc(T0 + FORECAST_RETENTION_S + 1)
    assert [m for m, _, _ in store.forecasts_since(0)] == [M2]
    assert store.forecasts(M1) == []
    assert store.forecasts(M2) == [{"at": later, "cdn_total": 6}]


def test_stores_keep_a_forecast_per_event_of_a_build(
    store: TrafficStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish = {"at": T0, "channel": "beta", "event": "publish", "cdn_total": 5}
    raise_ = {"at": T0 + 600, "channel": "beta", "event": "rollout-raise", "cdn_total": 6}
    promote = {"at": T0 + 600, "channel": "stable", "event": "promote", "cdn_total": 7}
    for f in (promote, publish, raise_):
        store.put_forecast(M1, "game", f)
    store.put_forecast(M2, "tool", {**publish, "at": T0 + 60})
    assert store.forecasts(M1) == [publish, raise_, promote]  # by time, then channel
    store.put_forecast(M1, "game", {**publish, "profile": [1]})  # the same event: replaced
    assert store.forecasts(M1)[0] == {**publish, "profile": [1]}
    assert [(m, a, f["at"]) for m, a, f in store.forecasts_since(T0 + 1)] == [
        (M2, "tool", T0 + 60), (M1, "game", T0 + 600), (M1, "game", T0 + 600)
    ]  # fmt: skip
    # bounded: the oldest events go first
    for module in (traffic_store, traffic_redis, traffic_pg):
        monkeypatch.setattr(module, "MAX_FORECASTS", 3)
    store.put_forecast(M3, "game", {"at": T0 + 900, "channel": "beta"})
    assert [f["at"] for _, _, f in store.forecasts_since(0)] == [T0 + 600, T0 + 600, T0 + 900]
    assert store.forecasts(M2) == []


def test_a_sqlite_file_of_one_forecast_per_build_is_read_as_publish_events(
    tmp_path: Path,
) -> None:
    path = tmp_path / "traffic.db"
    SQLiteTraffic(path).close()
    with sqlite3.connect(path) as c:  # as a tracker before forecasts per event left it
        c.execute("DROP TABLE forecast_events")
        c.execute("CREATE TABLE forecasts (manifest BLOB PRIMARY KEY, app TEXT NOT NULL, "
                  "at REAL NOT NULL, body TEXT NOT NULL)")  # fmt: skip
        c.execute(
            "INSERT INTO forecasts VALUES (?, 'game', ?, ?)",
            (M1, T0, json.dumps({"at": T0, "channel": "stable"})),
        )
    store = SQLiteTraffic(path)
    assert store.forecasts(M1) == [{"at": T0, "channel": "stable"}]
    store.put_forecast(M1, "game", {"at": T0 + 60, "channel": "beta"})
    assert len(store.forecasts(M1)) == 2
    store.close()


def test_stores_keep_a_bounded_number_of_builds(
    store: TrafficStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(traffic_store, "MAX_BUILDS", 2)
    monkeypatch.setattr(traffic_redis, "MAX_BUILDS", 2)
    monkeypatch.setattr(traffic_pg, "MAX_BUILDS", 2)
    r = TrafficRecorder()
    for i, mid in enumerate((M1, M2, M3)):
        r.sample([rel(mid, 1, 1, 1)], T0 + 60 * (i + 1))
        write(store, r)
    assert store.series(M1) == (None, [])
    assert [store.series(m)[0] for m in (M2, M3)] == [MIN0 + 1, MIN0 + 2]


def test_two_postgres_replicas_flushing_at_once_count_every_add_once(pg_url: str) -> None:
    """Two replicas (each its own connections) flush overlapping batches at the same time: no
    flush waits on the other in a cycle (a deadlock would fail one), every add and online count
    is summed once, and each minute keeps the highest level either wrote."""
    stores = [traffic_pg.PGTraffic(PGDatabase(pg_url)) for _ in range(2)]
    builds = [bytes([i]) * 32 for i in range(1, 9)]
    rounds = 20
    errors: list[BaseException] = []

    def replica(store: traffic_pg.PGTraffic, order: list[bytes], bias: int) -> None:
        try:
            for i in range(rounds):
                r = TrafficRecorder()
                r.sample([rel(mid, i + bias, 10 * i, i) for mid in order], T0 + 60 * (i % 4 + 1))
                for mid in order:
                    r.outcome("game", mid, {"reused": 1, "patches": 2}, T0 + 60 * (i % 4))
                r.announced("game", T0)
                store.write(r.take())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=replica, args=(stores[0], builds, 0)),
        threading.Thread(target=replica, args=(stores[1], builds[::-1], 1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    for mid in builds:
        _, rows = stores[0].series(mid)
        assert sum(row.adds["reused"] for row in rows) == 2 * rounds
        assert sum(row.adds["patches"] for row in rows) == 4 * rounds
        # minute k was sampled in rounds i with i % 4 == k: the highest is replica 2's last
        top = {row.minute - MIN0: row.levels["completed"] for row in rows if row.levels}
        assert top == {k: max(i for i in range(rounds) if i % 4 == k) + 1 for k in range(4)}
    assert stores[1].online_cells("game", T0) == [(int(T0) // 86400, 0, 2 * rounds)]
    for s in stores:
        s.db.close()


def test_registry_copy_moves_the_sqlite_series_into_postgres(tmp_path: Path, pg_url: str) -> None:
    """What `tracker registry copy` does with DIR/traffic.db: every minute, online cell and
    forecast arrives as it was, and the series goes on from there."""
    old = SQLiteTraffic(tmp_path / "traffic.db")
    r = TrafficRecorder()
    for i, mid in enumerate((M1, M2)):
        r.sample([rel(mid, 1 + i, 100, 50)], T0 + 60)
        r.sample([rel(mid, 3 + i, 400, 60)], T0 + 180)
        r.outcome("game", mid, {"reused": 30, "patches": 4}, T0 + 120)
        r.announced("game", T0 + 5)
        write(old, r)
    old.put_forecast(M1, "game", {"at": T0, "channel": "stable", "cdn_total": 5})
    old.put_forecast(M1, "game", {"at": T0 + 60, "channel": "beta", "cdn_total": 6})
    db = PGDatabase(pg_url)
    new = traffic_pg.PGTraffic(db)
    with db.tx("copy") as c:
        counts = traffic_pg.copy_traffic(c, tmp_path / "traffic.db")
    assert counts == {"traffic_builds": 2, "traffic_minutes": 4, "forecasts": 2}
    for mid in (M1, M2, M3):
        assert new.series(mid) == old.series(mid)
    assert new.online_cells("game", T0) == old.online_cells("game", T0)
    assert new.forecasts_since(0) == old.forecasts_since(0)
    r.sample([rel(M3, 1, 1, 1)], T0 + 60)  # a new build is numbered after the copied ones
    new.write(r.take())
    assert new.series(M3)[0] == MIN0
    old.close()
    db.close()


_OLD_SQLITE = """
CREATE TABLE traffic_builds (
    id INTEGER PRIMARY KEY, manifest BLOB NOT NULL UNIQUE, app TEXT NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL
);
CREATE TABLE traffic (
    build INTEGER NOT NULL, minute INTEGER NOT NULL,
    completed INTEGER, peers INTEGER, cdn INTEGER,
    reused INTEGER NOT NULL DEFAULT 0, patches INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (build, minute)
) WITHOUT ROWID;
CREATE TABLE online (
    app TEXT NOT NULL, day INTEGER NOT NULL, hour INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (app, day, hour)
);
CREATE TABLE forecasts (
    manifest BLOB PRIMARY KEY, app TEXT NOT NULL, at REAL NOT NULL, body TEXT NOT NULL
);
"""


def test_a_series_from_before_the_patch_split_reads_and_grows(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    """A DIR/traffic.db, or Redis minutes, written before patches were split by source: the
    old minutes read with no split (0), and the series goes on with it; `tracker registry
    copy` takes such a file into PostgreSQL as it is."""
    import sqlite3

    path = tmp_path / "traffic.db"
    with sqlite3.connect(path) as old:
        old.executescript(_OLD_SQLITE)
        old.execute("INSERT INTO traffic_builds VALUES (1, ?, 'game', ?, ?)", (M1, MIN0, MIN0))
        old.execute("INSERT INTO traffic VALUES (1, ?, 1, 100, 50, 30, 4)", (MIN0,))
    old.close()
    db = PGDatabase(pg_url)
    with db.tx("copy") as c:
        traffic_pg.copy_traffic(c, path)
    reg = RedisRegistry(redis_url, prefix="old:")
    red = traffic_redis.RedisTraffic(reg)
    reg._slow.hset(f"{red.p}m:{M1.hex()}:{MIN0 // 60}", str(MIN0), "1,100,50,30,4")
    reg._slow.hset(f"{red.p}first", M1.hex(), str(MIN0))
    reg._slow.zadd(f"{red.p}builds", {M1.hex(): MIN0})
    stores: list[TrafficStore] = [SQLiteTraffic(path), red, traffic_pg.PGTraffic(db)]
    for s in stores:
        levels = {"completed": 1, "peers": 100, "cdn": 50}
        assert s.series(M1) == (MIN0, [MinuteRow(MIN0, levels, {"reused": 30, "patches": 4})])
        r = TrafficRecorder()
        r.outcome("game", M1, {"patches": 6, "patches_cdn": 2, "patches_peers": 4}, T0)
        s.write(r.take())
        assert s.series(M1)[1][0].adds == {
            "reused": 30, "patches": 10, "patches_cdn": 2, "patches_peers": 4
        }  # fmt: skip
    stores[0].close()
    reg.close()


def test_postgres_keeps_the_forecasts_of_one_per_build_as_publish_events(pg_url: str) -> None:
    """The schema step that keys forecasts by event moves those recorded before it."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for step in MIGRATIONS[:4]:
            conn.execute(step)
        conn.execute("CREATE TABLE tracker_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO tracker_schema (version) VALUES (4)")
        body = json.dumps({"at": T0, "channel": "stable", "cdn_total": 5})
        conn.execute(
            "INSERT INTO traffic_forecasts (manifest, app, at, body) VALUES (%s, 'game', %s, %s)",
            (M1, T0, body),
        )
        assert migrate(conn) == len(MIGRATIONS)
    db = PGDatabase(pg_url)
    store = traffic_pg.PGTraffic(db)
    assert store.forecasts(M1) == [{"at": T0, "channel": "stable", "cdn_total": 5}]
    assert [(m, a) for m, a, _ in store.forecasts_since(0)] == [(M1, "game")]
    db.close()
