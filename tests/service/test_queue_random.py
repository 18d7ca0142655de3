"""Random sequences of queue operations against the invariants the daemon relies on.

A model of the workers (which (job, attempt) pairs the daemon is running, from the Start and
Stop actions and the outcomes reported) is kept next to the queue; after every decision the
queue's view must match it: never more than ``max_active`` workers, never two workers for one
job, never a job lost, a critical update never waiting behind a non-critical running job, and
a save and reload that changes nothing but putting running jobs back in line.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import UsageError
from p2pnode.service.job import ACTIVE, FINISHED, JobKind, JobState, Priority, Progress
from p2pnode.service.queue import Discard, Queue, Start, Stop

OPS = [
    "submit",
    "submit",
    "submit",
    "pause",
    "resume",
    "cancel",
    "priority",
    "top",
    "defer",
    "progress",
    "finished",
    "failed",
    "max_active",
    "decide",
    "decide",
    "decide",
    "restart",
]


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_random_operations_keep_the_invariants(data: st.DataObject) -> None:
    q = Queue(max_active=data.draw(st.integers(1, 3)))
    running: set[tuple[str, int]] = set()
    ghosts: set[tuple[str, int]] = set()  # stopped workers, whose late reports may still come
    ever: set[str] = set()
    now = 0.0
    for _ in range(data.draw(st.integers(1, 60))):
        op = data.draw(st.sampled_from(OPS))
        ids = [j.id for j in q.jobs]
        ident = data.draw(st.sampled_from(ids)) if ids else "j1"
        try:
            if op == "submit":
                kind = data.draw(st.sampled_from([*JobKind, JobKind.UPDATE]))
                job = q.submit(
                    data.draw(st.sampled_from([f"g{n}" for n in range(8)])),
                    kind,
                    now=now,
                    priority=data.draw(st.sampled_from(list(Priority))),
                    critical=kind is JobKind.UPDATE and data.draw(st.booleans()),
                    auto=data.draw(st.booleans()),
                )
                ever.add(job.id)
            elif op == "pause":
                q.pause(ident)
            elif op == "resume":
                q.resume(ident)
            elif op == "cancel":
                q.cancel(ident, now=now)
            elif op == "priority":
                q.set_priority(ident, data.draw(st.sampled_from(list(Priority))))
            elif op == "top":
                q.move_to_top(ident)
            elif op == "defer":
                q.defer(ident, now + data.draw(st.floats(0, 100)))
            elif op in ("progress", "finished", "failed") and (running or ghosts):
                # A worker reports: a live one, or one the queue already stopped.
                job_id, attempt = data.draw(st.sampled_from(sorted(running | ghosts)))
                job = q.get(job_id)
                was = job.state
                if op == "progress":
                    ok = q.report(job_id, attempt, progress=Progress(1, 2, 1.0))
                elif op == "finished":
                    ok = q.finished(job_id, attempt, now=now)
                else:
                    ok = q.failed(job_id, attempt, "boom")
                if (job_id, attempt) in ghosts:
                    # Only a finish of the same attempt, stopped by a pause or cancel, counts.
                    assert not ok or (
                        op == "finished"
                        and job.attempt == attempt
                        and was in (JobState.PAUSED, JobState.CANCELLED)
                    )
                elif ok and op != "progress":
                    running.discard((job_id, attempt))
            elif op == "max_active":
                q.max_active = data.draw(st.integers(1, 3))
            elif op == "decide":
                now += data.draw(st.floats(0, 50))
                wanted = q.next_actions(now, window_open=data.draw(st.booleans()))
                for action in wanted.actions:
                    if isinstance(action, Start):
                        assert all(job != action.job for job, _ in running), "two workers"
                        assert (action.job, action.attempt) not in ghosts, "attempt reused"
                        running.add((action.job, action.attempt))
                    elif isinstance(action, Stop):
                        running.discard((action.job, action.attempt))
                        ghosts.add((action.job, action.attempt))
                    else:
                        assert isinstance(action, Discard)
                        assert q.get(action.job).state in (JobState.CANCELLED, JobState.INSTALLED)
                check(q, running)
                if wanted.deadline is not None:
                    assert wanted.deadline > now
            elif op == "restart":
                doc = json.loads(json.dumps(q.to_json()))
                q2 = Queue.from_json(doc, Path("queue.json"))
                assert [j.id for j in q2.jobs] == [j.id for j in q.jobs]
                for a, b in zip(q.jobs, q2.jobs, strict=True):
                    want = JobState.QUEUED if a.state in ACTIVE else a.state
                    assert (b.state, b.entry, b.kind, b.attempt) == (
                        want,
                        a.entry,
                        a.kind,
                        a.attempt,
                    )
                    assert b.progress.bytes_done == a.progress.bytes_done
                q, running, ghosts = q2, set(), set()  # kill -9: every worker died with it
        except UsageError:
            pass  # refused, as the API would answer 4xx: the invariants still hold below
        assert {j.id for j in q.jobs} == ever  # nothing lost, nothing invented
        unfinished = [j.entry for j in q.jobs if j.state not in FINISHED]
        assert len(unfinished) == len(set(unfinished))


def check(q: Queue, running: set[tuple[str, int]]) -> None:
    active = q.active()
    assert len(active) <= q.max_active
    # Once the actions are carried out, the workers the daemon runs are exactly the queue's
    # slots: each pause, cancel and preemption came with its Stop, each Start with a slot.
    assert running == {(j.id, j.attempt) for j in active}
    if any(j.critical for j in q.waiting()):
        assert all(j.critical for j in active) and len(active) == q.max_active
