"""The job queue: order, slots, gates, the transition table, races, and a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pnode.errors import UsageError
from p2pnode.service.job import JobKind, JobState, JobStateError, Priority, Progress
from p2pnode.service.queue import MAX_FINISHED, Discard, Queue, Start, Stop, Wanted
from p2pnode.service.statedir import DamagedStateError

INST, U, V = JobKind.INSTALL, JobKind.UPDATE, JobKind.VERIFY


def started(w: Wanted) -> list[str]:
    return [a.job for a in w.actions if isinstance(a, Start)]


def test_max_active_one_runs_jobs_one_after_the_other_and_priority_changes_the_order() -> None:
    q = Queue(max_active=1)
    a = q.submit("g1", INST, now=0)
    b = q.submit("g2", INST, now=0)
    c = q.submit("g3", INST, now=0)
    assert started(q.next_actions(1, window_open=False)) == ["j1"]  # first come, first started
    q.set_priority(c.id, Priority.HIGH)
    assert q.next_actions(2, window_open=False).actions == ()  # the slot is taken
    assert q.finished(a.id, 1, now=3)
    assert started(q.next_actions(3, window_open=False)) == [c.id]  # high before normal
    assert q.finished(c.id, 1, now=4)
    assert started(q.next_actions(4, window_open=False)) == [b.id]
    assert [j.state for j in q.jobs] == [
        JobState.INSTALLED,
        JobState.DOWNLOADING,
        JobState.INSTALLED,
    ]


def test_move_to_top_beats_other_high_jobs() -> None:
    q = Queue(max_active=1)
    q.submit("g0", INST, now=0)
    q.next_actions(0, window_open=True)
    q.submit("g1", INST, now=0, priority=Priority.HIGH)
    low = q.submit("g2", INST, now=0, priority=Priority.LOW)
    q.move_to_top(low.id)
    assert [j.id for j in q.waiting()] == [low.id, "j2"]
    assert low.priority is Priority.HIGH


def test_verify_jobs_start_verifying() -> None:
    q = Queue(max_active=2)
    v = q.submit("g1", V, now=0)
    assert q.next_actions(0, window_open=True).actions == (Start(v.id, 1),)
    assert v.state is JobState.VERIFYING
    assert q.report(v.id, 1, phase=JobState.DOWNLOADING)  # repair fetches what is damaged
    assert v.state is JobState.DOWNLOADING
    with pytest.raises(ValueError, match="finished/failed"):
        q.report(v.id, 1, phase=JobState.INSTALLED)


def test_pause_stops_resume_requeues_and_progress_is_kept() -> None:
    q = Queue(max_active=1)
    j = q.submit("g1", INST, now=0)
    q.next_actions(0, window_open=True)
    p = Progress(500, 1000, 100.0, (("cdn", 300), ("peers", 200)))
    assert q.report(j.id, 1, progress=p)
    q.pause(j.id)
    w = q.next_actions(1, window_open=True)
    assert w.actions == (Stop(j.id, 1),)
    assert j.state is JobState.PAUSED and j.progress.bytes_done == 500 and j.progress.rate == 0
    assert not q.report(j.id, 1, progress=Progress(600))  # the stopped worker's late word
    q.resume(j.id)
    assert q.next_actions(2, window_open=True).actions == (Start(j.id, 2),)
    assert not q.finished(j.id, 1, now=3)  # the first attempt's worker cannot finish it
    assert q.finished(j.id, 2, now=3)
    assert j.progress.bytes_done == 1000


def test_cancel_stops_then_discards_and_an_idle_cancel_only_discards() -> None:
    q = Queue(max_active=1)
    a = q.submit("g1", INST, now=0)
    b = q.submit("g2", INST, now=0)
    q.next_actions(0, window_open=True)
    q.cancel(a.id, now=1)
    q.cancel(b.id, now=1)
    w = q.next_actions(1, window_open=True)
    assert w.actions == (Stop(a.id, 1), Discard(a.id), Discard(b.id))
    assert a.finished == 1 and b.state is JobState.CANCELLED


def test_a_worker_that_finished_before_it_saw_the_pause_did_finish() -> None:
    q = Queue()
    j = q.submit("g1", INST, now=0)
    q.next_actions(0, window_open=True)
    q.pause(j.id)
    assert q.finished(j.id, 1, now=1)
    assert j.state is JobState.INSTALLED


def test_failure_then_retry() -> None:
    q = Queue()
    j = q.submit("g1", INST, now=0)
    q.next_actions(0, window_open=True)
    assert q.failed(j.id, 1, "every mirror failed")
    assert j.state is JobState.FAILED and j.error == "every mirror failed"
    assert not q.failed(j.id, 1, "again")
    q.resume(j.id)
    assert j.error is None
    assert started(q.next_actions(1, window_open=True)) == [j.id]


@pytest.mark.parametrize(
    ("state", "call"),
    [
        (JobState.INSTALLED, "pause"),
        (JobState.INSTALLED, "resume"),
        (JobState.INSTALLED, "cancel"),
        (JobState.CANCELLED, "cancel"),
        (JobState.QUEUED, "resume"),
        (JobState.DOWNLOADING, "resume"),
        (JobState.PAUSED, "pause"),
        (JobState.FAILED, "pause"),
    ],
)
def test_illegal_transitions_raise_and_change_nothing(state: JobState, call: str) -> None:
    q = Queue()
    j = q.submit("g1", INST, now=0)
    j.state = state
    with pytest.raises(JobStateError, match=f"cannot {call} job j1: it is {state.value}"):
        if call == "cancel":
            q.cancel(j.id, now=0)
        else:
            getattr(q, call)(j.id)
    assert j.state is state
    assert q.next_actions(0, window_open=False).actions in ((), (Start("j1", 1),))


def test_reordering_a_finished_job_is_refused() -> None:
    q = Queue()
    j = q.submit("g1", INST, now=0)
    q.cancel(j.id, now=0)
    for call in (lambda: q.set_priority(j.id, Priority.LOW), lambda: q.move_to_top(j.id)):
        with pytest.raises(JobStateError):
            call()


def test_unknown_job_and_bad_max_active() -> None:
    q = Queue()
    with pytest.raises(UsageError, match="no job 'j9'"):
        q.pause("j9")
    for bad in (0, 65, True, 1.5):
        with pytest.raises(UsageError, match="max_active"):
            q.max_active = bad  # type: ignore[assignment]


def test_one_unfinished_job_per_entry_and_updates_fold() -> None:
    q = Queue()
    u = q.submit("g1", U, now=0, target="build-5", auto=True)
    same = q.submit("g1", U, now=1, target="build-6", critical=True)
    assert same is u and u.target == "build-6" and u.critical and not u.auto
    with pytest.raises(JobStateError, match="already has job j1"):
        q.submit("g1", V, now=2)
    with pytest.raises(UsageError, match="cannot be critical"):
        q.submit("g2", INST, now=2, critical=True)
    q.cancel(u.id, now=3)
    assert q.submit("g1", V, now=4).id == "j2"


def test_auto_updates_wait_for_a_window_without_blocking_others() -> None:
    q = Queue(max_active=2)
    auto = q.submit("g1", U, now=0, auto=True)
    user = q.submit("g2", U, now=0)
    w = q.next_actions(0, window_open=False)
    assert started(w) == [user.id] and w.deadline is None  # the schedule knows when it opens
    assert started(q.next_actions(1, window_open=True)) == [auto.id]


def test_deferral_holds_an_update_until_its_time() -> None:
    q = Queue(max_active=1)
    u = q.submit("g1", U, now=0)
    i = q.submit("g2", INST, now=0)
    q.defer(u.id, until=100)
    w = q.next_actions(0, window_open=True)
    assert started(w) == [i.id] and w.deadline is None  # no slot left to wait for
    q.finished(i.id, 1, now=10)
    w = q.next_actions(10, window_open=True)
    assert w.actions == () and w.deadline == 100
    assert started(q.next_actions(100, window_open=True)) == [u.id]
    with pytest.raises(JobStateError, match="install job"):
        q.defer(q.submit("g3", INST, now=0).id, until=200)


def test_deferring_a_running_update_puts_it_back_in_line() -> None:
    q = Queue()
    u = q.submit("g1", U, now=0)
    q.next_actions(0, window_open=True)
    q.defer(u.id, until=50)
    w = q.next_actions(1, window_open=True)
    assert w.actions == (Stop(u.id, 1),) and w.deadline == 50 and u.state is JobState.QUEUED


def test_a_critical_update_overtakes_takes_a_slot_and_ignores_window_and_deferral() -> None:
    q = Queue(max_active=1)
    normal = q.submit("g1", INST, now=0)
    low = q.submit("g3", INST, now=0, priority=Priority.LOW)
    q.next_actions(0, window_open=False)
    crit = q.submit("g2", U, now=1, auto=True)
    q.defer(crit.id, until=10**9)
    q.submit("g2", U, now=1, critical=True, auto=True)  # the tracker says: critical
    w = q.next_actions(2, window_open=False)
    assert w.actions == (Stop(normal.id, 1), Start(crit.id, 1))
    assert normal.state is JobState.QUEUED and crit.not_before is None
    with pytest.raises(JobStateError, match="critical"):
        q.defer(crit.id, until=5)
    q.finished(crit.id, 1, now=3)
    assert q.next_actions(3, window_open=False).actions == (Start(normal.id, 2),)  # resumes
    assert low.state is JobState.QUEUED


def test_critical_jobs_do_not_preempt_each_other() -> None:
    q = Queue(max_active=1)
    a = q.submit("g1", U, now=0, critical=True)
    q.next_actions(0, window_open=False)
    q.submit("g2", U, now=0, critical=True)
    assert q.next_actions(1, window_open=False).actions == ()
    assert a.state is JobState.DOWNLOADING


def test_lowering_max_active_preempts_the_worst_ranked() -> None:
    q = Queue(max_active=3)
    jobs = [q.submit(f"g{n}", INST, now=0, priority=p) for n, p in enumerate(Priority)]
    q.next_actions(0, window_open=True)
    q.max_active = 1
    w = q.next_actions(1, window_open=True)
    assert w.actions == (Stop(jobs[2].id, 1), Stop(jobs[1].id, 1))
    assert [j.id for j in q.active()] == [jobs[0].id]


def test_finished_history_is_bounded() -> None:
    q = Queue(max_active=1)
    for n in range(MAX_FINISHED + 5):
        j = q.submit(f"g{n}", INST, now=n)
        q.cancel(j.id, now=n)
    assert len(q.jobs) == MAX_FINISHED
    assert q.jobs[0].id == "j6"
    with pytest.raises(JobStateError, match="not finished"):
        q.forget(q.submit("x", INST, now=0).id)
    q.forget("j6")
    assert len(q.jobs) == MAX_FINISHED


def test_a_restart_puts_running_jobs_back_in_line_without_loss_or_doubling(tmp_path: Path) -> None:
    q = Queue(max_active=2)
    a = q.submit("g1", INST, now=0)
    b = q.submit("g2", U, now=0, critical=True)
    c = q.submit("g3", V, now=0)
    q.next_actions(0, window_open=True)
    q.report(a.id, 1, progress=Progress(10, 20, 5.0, (("peers", 10),)))
    q.pause(c.id)
    path = tmp_path / "queue.json"
    q.save(path)  # ... then kill -9
    again = Queue.load(path)
    assert [j.id for j in again.jobs] == ["j1", "j2", "j3"]
    assert [j.state for j in again.jobs] == [JobState.QUEUED, JobState.QUEUED, JobState.PAUSED]
    assert again.get(a.id).progress == Progress(10, 20, 0.0, (("peers", 10),))
    w = again.next_actions(1, window_open=True)
    assert w.actions == (Start(b.id, 2), Start(a.id, 2))  # new attempts: old reports are stale
    assert again.submit("g4", INST, now=2).id == "j4"
    assert Queue.load(tmp_path / "none.json", max_active=3).max_active == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.update(format=2),
        lambda d: d.update(max_active=0),
        lambda d: d.update(next_id="3"),
        lambda d: d.pop("jobs"),
        lambda d: d["jobs"].append(d["jobs"][0]),
        lambda d: d["jobs"][0].update(state="sleeping"),
        lambda d: d["jobs"][0].update(priority="urgent"),
        lambda d: d["jobs"][0].update(id="j99"),
        lambda d: d["jobs"][1].update(entry="g1"),
        lambda d: d["jobs"][0]["progress"].update(bytes_done=-1),
        lambda d: d["jobs"][0]["progress"].update(by_source=[1]),
        lambda d: d["jobs"][0].update(created=None),
        lambda d: d["jobs"][0].update(critical="yes"),
    ],
)
def test_a_damaged_queue_file_is_refused_naming_it(tmp_path: Path, damage: object) -> None:
    q = Queue()
    q.submit("g1", INST, now=0)
    q.submit("g2", INST, now=0)
    doc = json.loads(json.dumps(q.to_json()))
    damage(doc)  # type: ignore[operator]
    path = tmp_path / "queue.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DamagedStateError, match=r"queue\.json"):
        Queue.load(path)
