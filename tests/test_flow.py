"""The real Bytewax dataflow, in-process: same outputs as ``kwf.testing.Engine``, recovery, timers.

How the comparison with ``Engine`` is kept honest:

- ``Engine`` feeds records written to ``workflow-resume``/``workflow-scheduler`` back into
  itself, the in-process flow does not (no Kafka in between). The compared workflows never
  write to those topics, and scheduler records in the inputs are delayed beyond every
  timestamp used, so no loopback ever happens on either side.
- The flow's timers run on the wall clock, the Engine's on a virtual one. Inputs are stamped in
  the far future (year 2096), so no wall-clock timer fires during a run; timers fire, in both,
  only where a record's timestamp passes them (a thread fires its due timers before applying
  a record). Engine also fires *other* threads' timers when its clock moves, so each run ends
  with a record per key at a later time (a stale ref: it writes nothing but fires due timers),
  and outputs are compared per thread, in order; dead letters as a set.
- Timestamps never decrease, as within one Kafka partition.
Timers on the wall clock and the scheduler are tested separately, against Engine results.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import flow_workflows as fw
import pytest
from bytewax.testing import TestingSource
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kwf.config import Settings
from kwf.engine.flow import run_flow
from kwf.protocol import Record
from kwf.testing import Engine
from kwf.wheel import slot_of
from workflows import approval, ecommerce, order, trip_booking

RESUME, SCHEDULER, DLQ = "workflow-resume", "workflow-scheduler", "workflow-dlq"
FUTURE = 4_000_000_000.0  # 2096: no wall-clock timer fires during a test
KEYS = ("t1", "t2", "t3")
EXAMPLES = [trip_booking.trip, ecommerce.cart, order.order, approval.approval]
WORKFLOWS = [*fw.ALL[:2], fw.fnotify, *EXAMPLES]
FLUSH = json.dumps({"ref": "flush", "value": None})

Rec = tuple[str, Any, Any, float]


def engine_outputs(records: list[Rec], workflows: list[Any] = WORKFLOWS, **kw: Any) -> list[Record]:
    eng = Engine(workflows=workflows, **kw)
    for topic, key, value, ts in records:
        eng.send(key, value, topic=topic, timestamp=ts)
    return eng.outputs()


def with_flush(records: list[Rec]) -> list[Rec]:
    """Append a stale resume per key, later than every timer the runs may have armed."""
    end = max((r[3] for r in records), default=FUTURE) + 100_000
    return records + [(RESUME, key, FLUSH, end) for key in KEYS]


def by_thread(outputs: list[Record]) -> tuple[dict[str, list[Record]], list[Record], list[Record]]:
    """Outputs per thread (in order), dead letters (sorted by source), and the rest (in order)."""
    threads: dict[str, list[Record]] = defaultdict(list)
    dead, rest = [], []
    for rec in outputs:
        thread = rec.header("kwf-thread")
        if rec.topic == DLQ:
            dead.append(rec)
        elif thread is not None:
            threads[thread].append(rec)
        else:
            rest.append(rec)
    return dict(threads), sorted(dead, key=lambda r: r.header("kwf-source") or ""), rest


def assert_same(flow_out: list[Record], engine_out: list[Record]) -> None:
    assert by_thread(flow_out) == by_thread(engine_out)


def dedup(outputs: list[Record]) -> list[Record]:
    """Drop repeated outputs by (kwf-thread, kwf-seq), dead letters by source; check repeats match."""
    seen: dict[tuple[str | None, str | None], Record] = {}
    kept = []
    for rec in outputs:
        ident = ((rec.header("kwf-thread"), rec.header("kwf-seq")) if rec.topic != DLQ
                 else (None, rec.header("kwf-source")))
        if ident in seen:
            assert seen[ident] == rec, f"two different outputs with the same identity {ident}"
            continue
        seen[ident] = rec
        kept.append(rec)
    return kept


# -- scripted, example-like runs ------------------------------------------------------------------

def resume(key: str, ref: str, value: Any = None, *, error: Any = None) -> str:
    return json.dumps({"ref": ref, "error": error} if error is not None else
                      {"ref": ref, "value": value})


def script(*steps: tuple[str, str] | tuple[str, str, str]) -> list[Rec]:
    """(key, value) or (topic, key, value) steps, one second apart from FUTURE."""
    out = []
    for i, step in enumerate(steps):
        topic, key, value = step if len(step) == 3 else (RESUME, *step)
        out.append((topic, key, value, FUTURE + i))
    return out


SCRIPTS = {
    "saga-completes": script(
        ("t1", 'new:ftrip:{"rest": 5}'), ("t1", resume("t1", "0:2", "h")),
        ("t1", resume("t1", "0:1", "c")), ("t2", 'new:ftrip:{"rest": 1}')),
    "saga-fails-and-compensates": script(
        ("t1", "new:ftrip:{}"), ("t1", resume("t1", "0:1", error="no car")),
        ("t1", resume("t1", "0:2", "late: stale"))),
    "cart-signals-and-abandonment": script(
        ("t1", 'new:fcart:{"timeout": 3}'), ("t1", resume("t1", "cart", {"op": "add", "item": "a"})),
        ("t2", 'new:fcart:{"timeout": 30}'), ("t1", resume("t1", "cart", {"op": "add", "item": "a"})),
        ("t2", resume("t2", "cart", {"op": "checkout"}))),
    "replace-init-cancel-unknown": script(
        ("t1", "new:ftrip:{}"), ("t1", "init:fcart:{}"), ("t1", "new:fcart:{}"),
        ("t2", "cancel:"), ("t1", 'cancel:{"why": "test"}'), ("t1", resume("t1", "cart", 1)),
        ("t3", "new:nope:{}"), ("t3", "bogus"), ("", "new:{}"), ("t3", "new:{}")),
    "example-workflows": script(
        ("t1", "new:trip:{}"), ("t1", resume("t1", "0:1", 1)), ("t1", resume("t1", "0:2", 2)),
        ("t1", resume("t1", "0:3", 3)),
        ("t2", 'new:cart:{"abandonedCartTimeoutMS": 2000}'),
        ("t2", resume("t2", "main", {"type": "updateEmail", "email": "a@b.c"})),
        ("t3", 'new:approval:{"subject": "x", "remindAfterS": 1, "expireAfterS": 4}')),
    "scheduler-records": script(
        (SCHEDULER, 't1|{"ref": "x"}', str(10**12)), (SCHEDULER, 't1|{"ref": "x"}', "0"),
        (SCHEDULER, "no-pipe", "5"), (SCHEDULER, "t2|y", "soon"), (SCHEDULER, "|y", "5")),
}


@pytest.mark.parametrize("max_live", [10_000, 1])
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_flow_gives_engine_outputs_on_scripts(name: str, max_live: int) -> None:
    """Per thread, the dataflow writes exactly what Engine writes, with live or replayed instances."""
    records = with_flush(SCRIPTS[name])
    flow_out = run_flow(records, workflows=WORKFLOWS, settings=Settings(max_live=max_live))
    assert flow_out, "the run produced nothing"
    assert_same(flow_out, engine_outputs(records))


# -- hypothesis-generated record sequences ----------------------------------------------------------

_names = st.sampled_from(["ftrip:", "fcart:", "fnotify:", "trip:", "cart:", "approval:", "nope:", ""])
_args = st.sampled_from(['{}', '{"rest": 30}', '{"timeout": 20}', '{"abandonedCartTimeoutMS": 5000}',
                         '{"throwAfterHotel": true}', "null", '{"bad', ""])
_starts = st.builds(lambda p, n, a: f"{p}:{n}{a}", st.sampled_from(["new", "init"]), _names, _args)
_resumes = st.builds(
    lambda ref, kind, v: json.dumps({"ref": ref, kind: v}),
    st.sampled_from(["0:1", "0:2", "0:3", "1:1", "1:2", "2:1", "cart", "main", "note", "decision", "x"]),
    st.sampled_from(["value", "error"]),
    st.sampled_from([1, "ok", None, "stop", {"op": "add", "item": "a"}, {"op": "checkout"},
                     {"type": "addToCart", "item": {"productId": "p", "quantity": 1}},
                     {"type": "updateEmail", "email": "a@b"}, {"type": "checkout"}]))
_odd = st.sampled_from(["cancel:", 'cancel:{"why": 1}', "garbage", '{"value": 1}', '{"ref": 5}', "[1]",
                        None, b"\xff", "new:true:{}", '{"ref": "0:1", "value": NaN}', "new:x" * 3])
_resume_records = st.tuples(st.just(RESUME),
                            st.sampled_from([*KEYS, *KEYS, "", None, b"\xff"]),
                            st.one_of(_starts, _resumes, _odd))
_scheduler_records = st.tuples(
    st.just(SCHEDULER), st.sampled_from(['t1|{"ref": "x"}', "t2|", "nopipe", "|x", None]),
    st.sampled_from([str(10**12), "0", None, "-5", "abc"]))


@st.composite
def record_sequences(draw: st.DrawFn) -> list[Rec]:
    """Records with non-decreasing timestamps from FUTURE; mostly resume records."""
    drawn = draw(st.lists(st.one_of(_resume_records, _resume_records, _resume_records,
                                    _scheduler_records), max_size=30))
    gaps = draw(st.lists(st.sampled_from([0, 0, 1, 3, 10, 100]), min_size=len(drawn),
                         max_size=len(drawn)))
    out, t = [], FUTURE
    for (topic, key, value), gap in zip(drawn, gaps):
        t += gap
        out.append((topic, key, value, t))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=record_sequences(), max_live=st.sampled_from([10_000, 1]))
def test_flow_gives_engine_outputs_on_any_records(records: list[Rec], max_live: int) -> None:
    """Malformed records included: the same dead letters, and per thread the same outputs."""
    records = with_flush(records)
    flow_out = run_flow(records, workflows=WORKFLOWS, settings=Settings(max_live=max_live))
    assert_same(flow_out, engine_outputs(records))


# -- wall-clock timers and the scheduler -----------------------------------------------------------

def test_timers_fire_on_the_wall_clock_as_engine_fires_them() -> None:
    """A 0.3 s rest and a 0.5 s cart timeout fire in the flow, with Engine's outputs and times."""
    now = time.time()
    records = [(RESUME, "t1", 'new:ftrip:{"rest": 0.3}', now), (RESUME, "t1", resume("t1", "0:1"), now),
               (RESUME, "t1", resume("t1", "0:2"), now), (RESUME, "t2", 'new:fcart:{"timeout": 0.5}', now)]
    started = time.monotonic()
    flow_out = run_flow(records, workflows=fw.ALL, linger=1.2)
    assert time.monotonic() - started < 5
    eng = Engine(workflows=fw.ALL, start_time=now)
    for topic, key, value, ts in records:
        eng.send(key, value, topic=topic, timestamp=ts)
    eng.advance(1.0)
    assert_same(flow_out, eng.outputs())
    results = {r.key: (r.json(), r.timestamp) for r in flow_out if r.topic == "workflow-result"}
    assert results["t1"][1] == pytest.approx(now + 0.3, abs=1e-6)
    assert results["t2"] == ({"status": "abandoned", "items": {}}, pytest.approx(now + 0.5, abs=1e-6))


def test_scheduler_sends_due_records_to_resume_on_the_wall_clock() -> None:
    """Two entries fire at their due times, a cancelled one never; the thread's alarm is written."""
    now = time.time()
    records = [(SCHEDULER, "t9|late", "400", now), (SCHEDULER, "t9|early", "200", now),
               (SCHEDULER, "t9|gone", "300", now), (SCHEDULER, "t9|gone", "0", now),
               (RESUME, "t1", 'new:falarm:{"ms": 250}', now)]
    flow_out = run_flow(records, workflows=fw.ALL, linger=1.0)
    fired = [(r.key, r.value, r.timestamp) for r in flow_out if r.topic == RESUME]
    assert fired == [("t9", "early", pytest.approx(now + 0.2, abs=1e-6)), ("t9", "late", pytest.approx(now + 0.4, abs=1e-6))]
    alarm = [r for r in flow_out if r.topic == SCHEDULER]
    assert [(r.key, r.value) for r in alarm] == [('t1|{"ref": "alarm", "value": "rang"}', "250")]


def test_expired_tombstone_is_deleted_from_the_events_topic() -> None:
    settings_ = Settings(tombstone_retention_s=0.3)
    now = time.time()
    flow_out = run_flow([(RESUME, "t1", "new:fnotify:{}", now), (RESUME, "t1", resume("t1", "note", "stop"), now)],
                        workflows=fw.ALL, settings=settings_, linger=1.0)
    last = flow_out[-1]
    assert (last.topic, last.key, last.value) == ("workflow-events", "t1", None)
    assert last.timestamp >= now + 0.3


# -- recovery ------------------------------------------------------------------------------------

def busy_records(n_threads: int = 6) -> list[Any]:
    """Sagas, carts and notifiers interleaved, with stale and bad records, far-future stamps."""
    steps: list[tuple[str, str]] = []
    for i in range(n_threads):
        steps += [(f"s{i}", 'new:ftrip:{"rest": 2}'), (f"c{i}", 'new:fcart:{"timeout": 500}'),
                  (f"n{i}", "new:fnotify:{}")]
    for i in range(n_threads):
        start = 3 * i  # the offset of s{i}'s new: record: its suspend ids are <start>:<n>
        steps += [(f"s{i}", resume("", f"{start}:1", i)),
                  (f"c{i}", resume("", "cart", {"op": "add", "item": i})),
                  (f"n{i}", resume("", "note", i)), (f"s{i}", resume("", f"{start}:2", i)),
                  (f"n{i}", resume("", "note", -i)), (f"x{i}", "garbage"),
                  (f"s{i}", resume("", f"{start}:2"))]
    for i in range(n_threads):
        steps += [(f"c{i}", resume("", "cart", {"op": "checkout"})), (f"n{i}", resume("", "note", "stop"))]
    return [(RESUME, key, value, FUTURE + 3 * j) for j, (key, value) in enumerate(steps)]


@pytest.mark.parametrize("epoch", [timedelta(0), timedelta(seconds=10)], ids=["epoch-0s", "epoch-10s"])
def test_aborted_and_resumed_flow_ends_as_an_uninterrupted_run(tmp_path: Path, epoch: timedelta) -> None:
    """Two crashes mid-stream: after dropping repeats (same kwf-seq, identical), nothing differs."""
    records = busy_records()
    reference = run_flow(records, workflows=fw.ALL, settings=Settings(max_live=2))
    crashing = list(records)
    crashing.insert(len(records) * 2 // 3, TestingSource.ABORT())
    crashing.insert(len(records) // 3, TestingSource.ABORT())
    outputs: list[Record] = []
    for _ in range(3):
        outputs += run_flow(crashing, workflows=fw.ALL, settings=Settings(max_live=2),
                            recovery_dir=tmp_path / "recovery", epoch_interval=epoch)
    if epoch:  # no epoch closed before a crash: everything before it was written twice
        assert len(outputs) > len(reference)
    assert by_thread(dedup(outputs)) == by_thread(reference)
    results = [r for r in reference if r.topic == "workflow-result"]
    assert len(results) == 18


def test_a_timer_armed_before_a_crash_fires_after_the_resume(tmp_path: Path) -> None:
    now = time.time()
    records = [(RESUME, "t1", 'new:ftrip:{"rest": 1.0}', now), (RESUME, "t1", resume("", "0:1"), now),
               (RESUME, "t1", resume("", "0:2"), now), TestingSource.ABORT()]
    first = run_flow(records, workflows=fw.ALL, recovery_dir=tmp_path, epoch_interval=timedelta(0))
    assert not [r for r in first if r.topic == "workflow-result"]
    second = run_flow(records, workflows=fw.ALL, recovery_dir=tmp_path, epoch_interval=timedelta(0),
                      linger=1.5)
    (result,) = [r for r in second if r.topic == "workflow-result"]
    assert result.timestamp == pytest.approx(now + 1.0, abs=1e-6)
    assert time.time() >= now + 1.0


def _globals_in(blob: bytes) -> list[str]:
    return [str(arg) for opcode, arg, _ in pickletools.genops(blob)
            if opcode.name in ("GLOBAL", "STACK_GLOBAL", "INST")]


def test_snapshots_hold_bytes_and_builtins_only(tmp_path: Path) -> None:
    """Bytewax pickles snapshots with stdlib pickle: no class may be stored by module path."""
    records = [(RESUME, "t1", "new:ftrip:{}", FUTURE), (SCHEDULER, 't1|{"ref": "x"}', str(10**12), FUTURE),
               (RESUME, "t2", 'new:fcart:{"timeout": 30}', FUTURE)]
    run_flow(records, workflows=fw.ALL, recovery_dir=tmp_path, epoch_interval=timedelta(0))
    with sqlite3.connect(tmp_path / "part-0.sqlite3") as db:
        rows = db.execute("SELECT step_id, state_key, ser_change FROM snaps "
                          "WHERE ser_change IS NOT NULL").fetchall()
    steps = {step for step, _, _ in rows}
    assert steps == {"kwf.records", "kwf.thread.stateful_batch", "kwf.scheduler.stateful_batch",
                     "kwf.wheel.stateful_batch"}
    for step, key, blob in rows:
        assert _globals_in(blob) == [], (step, key)
        state = pickle.loads(blob)
        if step == "kwf.thread.stateful_batch":  # the journal, and the wakeup its wheel slot holds
            journal, armed, finished = state
            assert isinstance(journal, bytes) and armed == (FUTURE + 30 if key == "t2" else None)
            assert finished is False
        elif step == "kwf.wheel.stateful_batch":  # the timer is held by a slot, not the thread
            assert state == (slot_of("t2"), {"t2": FUTURE + 30})
        elif step == "kwf.scheduler.stateful_batch":  # the scheduler keys of one wheel slot
            assert state == (slot_of("t1"), {"t1": {'{"ref": "x"}': FUTURE + 10**9}})


def test_engine_refuses_to_start_within_10_s_when_brokers_are_unreachable(tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "KWF_BROKERS": "127.0.0.1:1", "KWF_WORKFLOWS": "flow_workflows",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bytewax.run", "dataflow"], cwd=tests.parent,
                          env=env, capture_output=True, text=True, timeout=10, check=False)
    assert time.monotonic() - started < 10
    assert done.returncode != 0
    assert "unreachable" in done.stderr and "kwf kafka start" in done.stderr


def test_a_backlog_is_applied_before_the_timers_it_precedes() -> None:
    """Records already waiting (stamped before a deadline) win over the wall clock: after an
    outage every timer is due, yet replies sent in time must still count. (Without the input
    clock this flow abandons the carts that the Engine orders.)"""
    t0 = time.time() - 60  # the whole conversation happened a minute ago; the engine was down
    records: list[Any] = []
    for i in range(4):
        records.append((RESUME, f"c{i}", 'new:fcart:{"timeout": 1}', t0))
    for step in range(1, 4):
        for i in range(4):
            records.append((RESUME, f"c{i}", resume("", "cart", {"op": "add", "item": step}),
                            t0 + 0.8 * step))
    for i in range(4):
        records.append((RESUME, f"c{i}", resume("", "cart", {"op": "checkout"}), t0 + 3.0))
    flow_out = run_flow(records, workflows=fw.ALL)
    statuses = sorted(r.json()["status"] for r in flow_out if r.topic == "workflow-result")
    assert statuses == ["ordered"] * 4
    assert_same(flow_out, engine_outputs(records, fw.ALL))


def test_input_clock_holds_timers_until_every_partition_reached_its_watermark(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition reaches time t once its reader is past the high watermark it had at t; the
    clock is the wall clock held back to the least-reached partition, local or remote."""
    from kwf.engine.clock import InputClock

    monkeypatch.setattr(time, "time", lambda: 5000.0)
    clock = InputClock()
    assert clock.now() == 5000.0  # no partition reports: the wall clock
    clock.expect(["r/0", "r/1", "s/0"])
    assert clock.now() == float("-inf")  # nothing known yet: wait for the input
    clock.position("r/0", 10)
    clock.watermark("r/0", 4000.0, 10)  # caught up at 4000
    clock.position("r/1", 3)
    clock.watermark("r/1", 4100.0, 8)  # 5 records behind what it held at 4100
    clock.remote("s/0", 4200.0, 7, 7)  # another process read it past its watermark
    assert clock.now() == float("-inf")  # r/1 has reached nothing yet
    clock.position("r/1", 7)
    assert clock.now() == float("-inf")
    clock.position("r/1", 8)  # now past what it held at 4100
    assert clock.now() == 4000.0  # r/0 is the least reached
    clock.watermark("r/0", 4900.0, 12)  # two new records at r/0, not read yet
    assert clock.now() == 4000.0
    clock.position("r/0", 12)
    assert clock.now() == 4100.0
    clock.remote("r/0", 4999.0, 99, 0)  # read here: other processes' commits do not count
    assert clock.now() == 4100.0
    held = clock.notify_at(4150.0)
    assert held is not None and held.timestamp() == pytest.approx(5000.0 + clock.RECHECK_S)
    due = clock.notify_at(4050.0)
    assert due is not None and due.timestamp() == 4050.0  # reached: fire when due


def test_a_timer_ends_the_idle_wait_of_its_own_worker_only() -> None:
    """Workers share the process's clock; a due timer shortens the Kafka wait of the worker
    whose logic asked (``notify_at``), and another worker's wait neither ends nor consumes it."""
    from concurrent.futures import ThreadPoolExecutor

    from kwf.engine.clock import InputClock

    clock = InputClock()
    with ThreadPoolExecutor(1) as owner, ThreadPoolExecutor(1) as other:
        owner.submit(clock.wake_by, time.time() - 1).result()  # due already
        assert other.submit(clock.wait_s, 0.02).result() == 0.02
        assert owner.submit(clock.wait_s, 0.02).result() == 0.0
        assert owner.submit(clock.wait_s, 0.02).result() == 0.02  # once: it was served


def test_a_near_timer_makes_input_batches_small_until_it_is_done_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Big batches cost less per record, but a due timer waits for the batch in hand: while a
    timer key's callback is near (or held back), the sources hand out ``NEAR_TIMER_BATCH``.
    A key that asks again for a later time, or for none, no longer counts once it passed."""
    from kwf.engine.clock import InputClock

    now = [5000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    clock = InputClock()
    assert not clock.timer_near(0.1)
    clock.notify_at(5060.0, owner=1)  # a minute away
    assert not clock.timer_near(0.1)
    clock.notify_at(5000.05, owner=2)
    assert clock.timer_near(0.1)
    now[0] = 5000.06  # it fires; its key now asks for nothing
    clock.notify_at(None, owner=2)
    assert clock.timer_near(0.1)  # not forgotten until stale: the batch stays small a moment
    now[0] += clock.STALE_S
    assert not clock.timer_near(0.1)
    now[0] = 5059.95
    assert clock.timer_near(0.1)  # the other key's minute is up
    now[0] = 5060.01
    clock.expect(["r/0"])  # the input has not reached it: held back, rechecked soon
    held = clock.notify_at(5060.0, owner=1)
    assert held is not None and held.timestamp() == pytest.approx(now[0] + clock.RECHECK_S)
    now[0] = 5061.0
    assert not clock.timer_near(0.1)  # stale: its key did not ask again


def test_input_clock_keeps_a_remote_watermark_until_a_later_commit_passes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under steady traffic another process's last commit is behind the watermark of the same
    probe; a later commit past it reaches that probe's time, as a local reader's position does."""
    from kwf.engine.clock import InputClock

    monkeypatch.setattr(time, "time", lambda: 5000.0)
    clock = InputClock()
    clock.expect(["s/0"])
    clock.remote("s/0", 4100.0, 20, 15)  # 5 records behind what it held at 4100
    clock.remote("s/0", 4200.0, 30, 18)  # still behind: both kept
    assert clock.now() == float("-inf")
    clock.remote("s/0", 4300.0, 40, 25)  # past 20 (4100), not 30 (4200)
    assert clock.now() == 4100.0
    clock.remote("s/0", 4400.0, 50, 50)  # past everything it held by 4400
    assert clock.now() == 4400.0
