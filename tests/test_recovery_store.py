"""The recovery store's upkeep (``kwf.engine.recovery``) on stores the real dataflow wrote."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import flow_workflows as fw
import pytest

from kwf.config import Settings
from kwf.engine import recovery
from kwf.engine.flow import run_flow
from kwf.engine.recovery import MAX_PARTITIONS, SETTLED, compact, partitions_for, settle

RESUME = "workflow-resume"
THREAD_STEP = "kwf.thread.stateful_batch"


def _rows(store: Path) -> list[tuple[str, str, bool]]:
    with sqlite3.connect(store / "part-0.sqlite3") as db:
        return [(step, key, blob is None) for step, key, blob in db.execute(
            "SELECT step_id, state_key, ser_change FROM snaps ORDER BY step_id, state_key")]


STOP = json.dumps({"ref": "note", "value": "stop"})


def test_compact_drops_expired_tombstones_and_a_resume_continues_the_rest(tmp_path: Path) -> None:
    settings = Settings(tombstone_retention_s=0.2)
    now = time.time()
    first = [(RESUME, "gone", "new:fnotify:{}", now), (RESUME, "gone", STOP, now),
             (RESUME, "stays", "new:fnotify:{}", now)]
    run_flow(first, workflows=fw.ALL, settings=settings, recovery_dir=tmp_path,
             epoch_interval=timedelta(0), linger=1.5)
    before = _rows(tmp_path)
    assert (THREAD_STEP, "gone", True) in before  # Bytewax's NULL row: never deleted by it
    assert (THREAD_STEP, "stays", False) in before

    done = compact(tmp_path)
    after = _rows(tmp_path)
    assert done.dead_nulls == sum(null for _, _, null in before) > 0
    assert not any(null for _, _, null in after)
    assert (THREAD_STEP, "stays", False) in after and len(after) == len(before) - done.dead_nulls
    assert compact(tmp_path).dead_nulls == 0  # nothing more to do

    # the compacted store resumes: "stays" continues, "gone" is unknown as after its expiry
    second = [*first, (RESUME, "stays", STOP, now), (RESUME, "gone", STOP, now)]
    out = run_flow(second, workflows=fw.ALL, settings=settings, recovery_dir=tmp_path,
                   epoch_interval=timedelta(0))
    results = [(r.key, r.value) for r in out if r.topic == settings.result_topic]
    assert results == [("stays", "0")]
    dlq = [r for r in out if r.topic == settings.dlq_topic]
    assert [r.key for r in dlq] == ["gone"]
    assert "unknown-thread" in str(dlq[0].header("kwf-error"))


def test_compact_drops_rows_superseded_at_the_commit_epoch(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "part-0.sqlite3")
    db.executescript("""
        CREATE TABLE snaps (step_id TEXT NOT NULL, state_key TEXT NOT NULL,
          snap_epoch INTEGER NOT NULL, ser_change BLOB, PRIMARY KEY (step_id, state_key, snap_epoch));
        CREATE TABLE commits (part_index INTEGER PRIMARY KEY, commit_epoch INTEGER NOT NULL);
        INSERT INTO commits VALUES (0, 5);
        INSERT INTO snaps VALUES ('s', 'a', 1, x'01'), ('s', 'a', 4, x'02'), ('s', 'a', 7, x'03'),
                                 ('s', 'b', 6, x'04'), ('s', 'b', 8, x'05'), ('s', 'c', 2, NULL);
    """)
    db.commit()
    done = compact(tmp_path)
    left = db.execute("SELECT state_key, snap_epoch FROM snaps ORDER BY 1, 2").fetchall()
    db.close()
    # a@1 is superseded by a@4 within the commit epoch; a@4 stays (a restart may need it), and
    # b's rows are both after the commit epoch; c's lone NULL goes
    assert left == [("a", 4), ("a", 7), ("b", 6), ("b", 8)]
    assert (done.superseded, done.dead_nulls) == (1, 1)


def test_partitions_follow_the_expected_threads() -> None:
    assert [partitions_for(n) for n in (0, 5_000, 5_001, 1_000_000)] == [1, 1, 2, 200]
    assert partitions_for(10**9) == MAX_PARTITIONS


def _journals(store: Path) -> dict[str, int]:
    from kwf.cli._store import read_journals

    return {j.thread: len(j.events) for j in read_journals(store)}


def test_settled_rows_leave_snaps_and_come_back_for_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "SETTLE_CHUNK", 2)  # several transactions
    now = time.time()
    first = [(RESUME, "a", "new:fnotify:{}", now), (RESUME, "b", "new:fnotify:{}", now),
             (RESUME, "c", "new:fnotify:{}", now), (RESUME, "c", STOP, now)]
    run_flow(first, workflows=fw.ALL, recovery_dir=tmp_path, epoch_interval=timedelta(0))
    part = tmp_path / "part-0.sqlite3"
    journals = _journals(tmp_path)
    with sqlite3.connect(part) as db:
        (started,) = db.execute("SELECT commit_epoch FROM commits").fetchone()
        assert settle(part, started=started) == 0  # no commit since the start: loader may run
        assert settle(part, started=None) == 0  # nothing older than the commit epoch yet
        # the running engine's next epoch commits (run_flow writes every row at its last epoch)
        db.execute("UPDATE commits SET commit_epoch = commit_epoch + 1")
        db.commit()
    committed = started + 1

    moved = settle(part, started=None)
    with sqlite3.connect(part) as db:
        hot = db.execute("SELECT COUNT(*) FROM snaps WHERE snap_epoch < ?", (committed,)).fetchone()
        settled = {k for (k,) in db.execute(f"SELECT state_key FROM {SETTLED}")}
    assert moved > 0 and hot == (0,)
    assert {"a", "b", "c"} <= settled
    assert _journals(tmp_path) == journals  # the tools read both tables

    compact(tmp_path)  # the settled table is snaps again before Bytewax opens it
    with sqlite3.connect(part) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = ?", (SETTLED,)).fetchone() is None
    assert settled <= {key for _, key, _ in _rows(tmp_path)}
    second = [*first, (RESUME, "a", STOP, now), (RESUME, "c", STOP, now)]
    out = run_flow(second, workflows=fw.ALL, recovery_dir=tmp_path, epoch_interval=timedelta(0))
    assert [(r.key, r.value) for r in out if r.topic == Settings().result_topic] == [("a", "0")]
    assert not [r for r in out if r.topic == Settings().dlq_topic]  # c is still a tombstone
    assert _journals(tmp_path).keys() == journals.keys()


def test_the_settler_process_waits_for_a_new_commit_then_moves_the_rows(
        tmp_path: Path) -> None:
    now = time.time()
    run_flow([(RESUME, "a", "new:fnotify:{}", now)], workflows=fw.ALL, recovery_dir=tmp_path,
             epoch_interval=timedelta(0))
    part = tmp_path / "part-0.sqlite3"
    child = recovery.start_settler(tmp_path)  # this process plays the engine
    try:
        time.sleep(recovery.SETTLE_EVERY_S + 1)
        assert _rows(tmp_path)  # nothing committed since it started: the loader may still run
        with sqlite3.connect(part) as db:
            db.execute("UPDATE commits SET commit_epoch = commit_epoch + 1")
        deadline = time.monotonic() + 20
        while _rows(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _rows(tmp_path) == []  # all settled
        assert _journals(tmp_path).keys() == {"a"}
    finally:
        child.kill()
        child.wait()


def test_settling_keeps_the_newest_row_of_each_key_and_drops_discarded_keys(tmp_path: Path) -> None:
    part = tmp_path / "part-0.sqlite3"
    db = sqlite3.connect(part)
    db.executescript(f"""
        CREATE TABLE snaps (created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
          step_id TEXT NOT NULL, state_key TEXT NOT NULL, snap_epoch INTEGER NOT NULL,
          ser_change BLOB, PRIMARY KEY (step_id, state_key, snap_epoch)) STRICT;
        CREATE TABLE commits (part_index INTEGER PRIMARY KEY, commit_epoch INTEGER NOT NULL);
        INSERT INTO commits VALUES (0, 6);
        {recovery._SETTLED_TABLE};
        INSERT INTO {SETTLED} (step_id, state_key, snap_epoch, ser_change)
          VALUES ('s', 'x', 2, x'01'), ('s', 'y', 1, x'02'), ('s', 'w', 3, x'03');
        INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change)
          VALUES ('s', 'x', 5, NULL), ('s', 'y', 4, x'04'), ('s', 'z', 9, x'05'), ('s', 'v', 5, x'06');
    """)
    db.commit()
    assert settle(part, started=None) == 3  # the rows below the commit epoch
    settled = db.execute(f"SELECT state_key, snap_epoch FROM {SETTLED} ORDER BY 1").fetchall()
    hot = db.execute("SELECT state_key, snap_epoch FROM snaps").fetchall()
    # x was discarded at 5: gone; y superseded by its row at 4; w untouched; z after the commit
    assert settled == [("v", 5), ("w", 3), ("y", 4)] and hot == [("z", 9)]
    db.close()

    compact(tmp_path)
    with sqlite3.connect(part) as db:
        rows = db.execute("SELECT state_key, snap_epoch, ser_change FROM snaps ORDER BY 1").fetchall()
    assert rows == [("v", 5, b"\x06"), ("w", 3, b"\x03"), ("y", 4, b"\x04"), ("z", 9, b"\x05")]
