"""``workflow-scheduler`` entries held by wheel slots (``kwf.engine.wheel.ScheduleSlot``): a
bounded number of Bytewax keys with a wakeup, whatever the number of scheduler keys, and the
same firings as ``kwf.testing.Engine`` (issue 13)."""

from __future__ import annotations

import pickle
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import flow_workflows as fw

from kwf.engine.flow import _ScheduleLogic, run_flow
from kwf.engine.wheel import ScheduleSlot
from kwf.protocol import Schedule
from kwf.testing import Engine
from kwf.wheel import SLOTS, slot_of

RESUME, SCHEDULER = "workflow-resume", "workflow-scheduler"
FUTURE = 4_000_000_000.0  # 2096: no wall-clock timer fires during a test


class _Clock:
    def __init__(self, now: float) -> None:
        self.at = now

    def now(self) -> float:
        return self.at

    def notify_at(self, due: float | None, owner: int | None = None) -> None:
        return None


def test_a_slot_fires_its_keys_in_due_order_and_forgets_cancelled_ones() -> None:
    slot = ScheduleSlot("slot-1")
    slot.on_schedule("a", Schedule("a", "x", 30.0))
    slot.on_schedule("b", Schedule("b", "y", 10.0))
    slot.on_schedule("a", Schedule("a", "z", 20.0))
    slot.on_schedule("b", Schedule("b", "gone", 5.0))
    slot.on_schedule("b", Schedule("b", "gone", None))  # "0": cancelled
    assert slot.wakeup() == 10.0
    assert [(r.key, r.value, r.timestamp) for r in slot.on_timer(25.0, RESUME)] == [
        ("b", "y", 10.0), ("a", "z", 20.0)]
    assert slot.dump() == {"a": {"x": 30.0}} and slot.wakeup() == 30.0
    again = ScheduleSlot("slot-1", slot.dump())  # as restored from its snapshot
    assert [(r.key, r.value) for r in again.on_timer(30.0, RESUME)] == [("a", "x")]
    assert not again and again.wakeup() is None


def test_a_snapshot_of_one_scheduler_key_from_before_the_slots_still_fires() -> None:
    logic = _ScheduleLogic(RESUME, _Clock(100.0), ("t1", {"x": 50.0, "y": 150.0}))  # type: ignore[arg-type]
    records, _ = logic.on_notify()
    assert [(r.key, r.value) for r in records] == [("t1", "x")]
    assert logic.snapshot() == ("t1", {"t1": {"y": 150.0}})


def test_many_scheduler_keys_share_the_slots_and_fire_as_in_the_engine(tmp_path: Path) -> None:
    now = time.time()
    n = 400
    records = [(SCHEDULER, f"k{i}|v{i}", "300" if i % 2 else str(10**9), now) for i in range(n)]
    records += [(SCHEDULER, "k1|v1", "0", now)]  # cancelled
    out = run_flow(records, workflows=fw.ALL, recovery_dir=tmp_path, linger=1.0,
                   epoch_interval=timedelta(milliseconds=200))
    fired = sorted((r.key, r.value) for r in out if r.topic == RESUME)

    engine = Engine(workflows=fw.ALL, start_time=now)
    for _, key, value, _ in records:
        engine.send(key, value, topic=SCHEDULER)
    engine.advance(1.0)
    expected = sorted((r.key, r.value) for r in engine.inputs(RESUME))
    assert fired == expected and len(fired) == n // 2 - 1

    with sqlite3.connect(tmp_path / "part-0.sqlite3") as db:
        rows = db.execute("SELECT state_key, ser_change FROM snaps WHERE step_id = "
                          "'kwf.scheduler.stateful_batch' AND ser_change IS NOT NULL").fetchall()
    held = {}
    for key, blob in rows:
        slot, entries = pickle.loads(blob)  # noqa: S301 - our own test store
        assert key == slot
        held.update(entries)
    assert len({key for key, _ in rows}) <= SLOTS < n  # keys holding a wakeup: bounded
    assert held == {f"k{i}": {f"v{i}": now + 10**6} for i in range(0, n, 2)}
    assert all(slot_of(k) in {key for key, _ in rows} for k in held)
