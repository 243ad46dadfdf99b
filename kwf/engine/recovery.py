"""The recovery store's upkeep: how many partitions to create, and what may leave the table.

Bytewax 0.21.1 keeps every key's snapshots in the ``snaps`` table of its recovery partitions
(``part-*.sqlite3``) and restarts by paging through it, 1,000 rows a page, where every page
recomputes "newest row per key" over the whole partition and sorts it (``recovery.rs``
``SerializedSnapshotLoader::select``; ``bench/scale.py`` measures it). A restart therefore
costs about ``rows² / (1000 × partitions)``: the two levers are fewer rows and more partitions.
No index helps: SQLite materialises the grouping subquery and sorts the joined rows, blobs
included, whatever indexes exist (checked with ``EXPLAIN QUERY PLAN`` and timings, see the
README's "Many threads per node").

Rows that may leave the table without changing what any restart loads:

- a ``NULL`` row (a key's state discarded: an expired tombstone, a finished scheduler key)
  that is the oldest row of its key. Bytewax never deletes these. Whatever the resume epoch,
  the loader then finds either this ``NULL`` (no state) or nothing (no state): the same.
- a row superseded by a newer row of its key at or before the partition's commit epoch:
  exactly what Bytewax's own garbage collection deletes at each commit, done here in case the
  engine stopped before its last one.

``compact`` runs at engine start (``kwf.engine.engine_flow``, once the directory is locked and
before Bytewax opens it); both rules would hold beside a running engine too.

**Settled rows leave ``snaps`` while the engine runs** (``start_settler``). Bytewax's garbage
collection at every commit (``RecoveryCommitter::commit``) groups the whole ``snaps`` table of
the partition and probes its index once per key: about 5 µs per row, so with 200,000 threads
about a second of the worker's time per epoch, and with 2 million more than an epoch lasts.
Once the loader is done (the partition committed past the epoch it started from), a row older
than the commit epoch is final: no restart can resume before the commit, and Bytewax never
writes that epoch again. The settler moves such rows, newest per key, to kwf's table
``kwf_snaps`` in the same file (in a child process: see ``start_settler``), so ``snaps``
holds only what changed in the last epochs and the garbage collection stays cheap whatever
the number of threads. ``compact`` moves them back before Bytewax opens the store, so its
loader sees exactly the rows it would have seen (a store is only read through kwf:
``kwf.cli._store`` reads both tables).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("kwf.engine.recovery")

THREADS_PER_PARTITION = 5_000
"""Threads per recovery partition. A restart costs about rows² / (1000 × partitions) row reads;
each partition costs one commit per epoch (about 1 ms, kept small by the settler)."""

MAX_PARTITIONS = 256
"""Partitions beyond this cost more in per-epoch commits than they save at restart."""

_DEAD_NULLS = """
DELETE FROM snaps WHERE ser_change IS NULL AND NOT EXISTS (
  SELECT 1 FROM snaps AS older WHERE older.step_id = snaps.step_id
  AND older.state_key = snaps.state_key AND older.snap_epoch < snaps.snap_epoch)
"""

_SUPERSEDED = """
DELETE FROM snaps WHERE snap_epoch <= ?1 AND EXISTS (
  SELECT 1 FROM snaps AS newer WHERE newer.step_id = snaps.step_id
  AND newer.state_key = snaps.state_key AND newer.snap_epoch > snaps.snap_epoch
  AND newer.snap_epoch <= ?1)
"""


SETTLED = "kwf_snaps"
"""kwf's table of settled rows: Bytewax's ``snaps`` schema, the newest row of each key older
than a commit epoch (none for a key whose newest is ``NULL``)."""

_SETTLED_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SETTLED} (
  created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, step_id TEXT NOT NULL,
  state_key TEXT NOT NULL, snap_epoch INTEGER NOT NULL, ser_change BLOB,
  PRIMARY KEY (step_id, state_key, snap_epoch)) STRICT
"""
# The same definition as Bytewax 0.21.1's ``snaps`` (recovery.rs migrations): at start the
# settled table becomes ``snaps`` by a rename instead of a copy of every row.

_COLUMNS = "created_at, step_id, state_key, snap_epoch, ser_change"

_MOVING = f"""
CREATE TEMP TABLE moving AS SELECT rowid AS rid, {_COLUMNS} FROM snaps
WHERE snap_epoch < ?1 ORDER BY rowid LIMIT ?2
"""

_MOVING_INDEX = "CREATE INDEX temp.moving_key ON moving (step_id, state_key, snap_epoch)"

_SETTLE = [
    # older rows of the moved keys go (Bytewax's GC left one row per key below the commit);
    # driven by the chunk, through the primary key: never a scan of the settled table
    f"""DELETE FROM {SETTLED} WHERE rowid IN (SELECT k.rowid FROM temp.moving AS m
        JOIN {SETTLED} AS k ON k.step_id = m.step_id AND k.state_key = m.state_key
        AND k.snap_epoch < m.snap_epoch)""",
    # the newest moved row of each key, unless NULL (state discarded: the key leaves)
    f"""INSERT INTO {SETTLED} ({_COLUMNS}) SELECT {_COLUMNS} FROM temp.moving AS n
        WHERE n.ser_change IS NOT NULL AND NOT EXISTS (SELECT 1 FROM temp.moving AS m WHERE
        m.step_id = n.step_id AND m.state_key = n.state_key AND m.snap_epoch > n.snap_epoch)
        AND NOT EXISTS (SELECT 1 FROM {SETTLED} AS k WHERE k.step_id = n.step_id
        AND k.state_key = n.state_key AND k.snap_epoch >= n.snap_epoch)""",
    "DELETE FROM snaps WHERE rowid IN (SELECT rid FROM temp.moving)",
]

SETTLE_CHUNK = 500
"""Rows moved per transaction (a few ms each): Bytewax waits at most 5 s for the write lock,
then panics (``recovery.rs`` unwraps ``SQLITE_BUSY``)."""


def partitions_for(expected_threads: int) -> int:
    """Recovery partitions to create for a node expected to hold ``expected_threads`` threads
    (waiting and finished within retention); fixed for ever once created."""
    return max(1, min(MAX_PARTITIONS, math.ceil(expected_threads / THREADS_PER_PARTITION)))


@dataclass(frozen=True)
class Compacted:
    """What ``compact`` did, over all partitions."""

    partitions: int
    dead_nulls: int
    superseded: int
    seconds: float
    unsettled: int = 0
    """Rows of ``snaps`` merged into the settled table, which then became ``snaps``."""


def compact(recovery_dir: str | Path) -> Compacted:
    """Give Bytewax back its whole ``snaps`` table (the settled rows included) and delete the
    rows no restart needs, in every partition of ``recovery_dir``, before Bytewax opens it.

    An error merging the settled rows back stops the start (Bytewax would not see those
    threads); an error only in the clean-up is logged (a restart is only slower)."""
    start = time.monotonic()
    parts = sorted(Path(recovery_dir).glob("part-*.sqlite3"))
    nulls = superseded = unsettled = 0
    for part in parts:
        db = _connect(part)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                merged = _unsettle(db)
                unsettled += merged or 0
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            # Rows settled while the engine ran need no clean-up: only those that were not
            hot = "" if merged is None else (
                " AND (step_id, state_key) IN (SELECT step_id, state_key FROM temp.hot)")
            try:
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    nulls += db.execute(_DEAD_NULLS + hot).rowcount
                    epoch = _commit_epoch(db)
                    if epoch is not None:
                        superseded += db.execute(_SUPERSEDED + hot, (epoch,)).rowcount
            except sqlite3.Error as e:  # only slower without it
                log.warning("recovery_not_compacted", partition=str(part), reason=str(e))
        finally:
            db.close()
    done = Compacted(len(parts), nulls, superseded, time.monotonic() - start, unsettled)
    log.info("recovery_compacted", dir=str(recovery_dir), partitions=done.partitions,
             unsettled=done.unsettled, dead_nulls=done.dead_nulls,
             superseded=done.superseded, seconds=round(done.seconds, 3))
    return done


def _has_settled(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                      (SETTLED,)).fetchone() is not None


def _unsettle(db: sqlite3.Connection) -> int | None:
    """Make ``snaps`` the union of both tables again (inside the caller's transaction): the
    few rows of ``snaps`` join the settled ones, and the settled table takes its name.
    Returns the settled rows, or None when there is no settled table."""
    if not _has_settled(db):
        return None
    merged = db.execute(f"INSERT INTO {SETTLED} ({_COLUMNS}) SELECT {_COLUMNS} "  # noqa: S608
                        "FROM snaps WHERE true ON CONFLICT DO NOTHING").rowcount
    db.execute("CREATE TEMP TABLE IF NOT EXISTS hot (step_id TEXT, state_key TEXT)")
    db.execute("DELETE FROM temp.hot")
    db.execute("INSERT INTO temp.hot SELECT DISTINCT step_id, state_key FROM snaps")
    db.execute("DROP TABLE snaps")
    db.execute(f"ALTER TABLE {SETTLED} RENAME TO snaps")
    return int(merged)


def _commit_epoch(db: sqlite3.Connection) -> int | None:
    row = db.execute("SELECT MIN(commit_epoch) FROM commits").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def settle(part: Path | str, started: int | None) -> int:
    """Move the final rows of one partition from ``snaps`` to ``kwf_snaps``, once the partition
    has committed past ``started`` (its commit epoch when the engine started: until then
    Bytewax's loader may still be paging through ``snaps``). Returns the rows moved.

    Bytewax's garbage collection, in the same transaction as its commit, left at most one row
    below the commit epoch per key: that row supersedes the key's settled row, and a ``NULL``
    one (state discarded) removes the key."""
    db = _connect(part)
    try:
        return _settle_on(db, started)
    finally:
        db.close()


def _connect(part: Path | str) -> sqlite3.Connection:
    """A connection for kwf's own moves. ``synchronous = NORMAL`` (no fsync per commit in WAL
    mode): a move lost to a power cut leaves the state before it, which holds the same
    threads, so only Bytewax's own writes need every commit on disk."""
    db = sqlite3.connect(part, timeout=30.0, isolation_level=None)
    db.execute("PRAGMA synchronous = NORMAL")
    return db


def _settle_on(db: sqlite3.Connection, started: int | None) -> int:
    epoch = _commit_epoch(db)  # read without the write lock first: most passes find nothing
    if epoch is None or (started is not None and epoch <= started) or db.execute(
            "SELECT 1 FROM snaps WHERE snap_epoch < ? LIMIT 1", (epoch,)).fetchone() is None:
        return 0
    moved = 0
    while True:
        db.execute("BEGIN IMMEDIATE")  # the write lock: Bytewax's writes wait for it
        try:
            epoch = _commit_epoch(db)
            assert epoch is not None  # commits only move forward
            db.execute(_SETTLED_TABLE)
            db.execute("DROP TABLE IF EXISTS temp.moving")
            db.execute(_MOVING, (epoch, SETTLE_CHUNK))
            db.execute(_MOVING_INDEX)
            for statement in _SETTLE:
                db.execute(statement)
            chunk = int(db.execute("SELECT COUNT(*) FROM temp.moving").fetchone()[0])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        moved += chunk
        if chunk < SETTLE_CHUNK:
            return moved


SETTLE_EVERY_S = 2.0
"""How often the settler looks for rows to move (a commit happens every epoch, ``-s``)."""


def start_settler(recovery_dir: Path | str) -> subprocess.Popen[bytes]:
    """Start the settler beside the engine: a child process, never a thread.

    Bytewax links its own copy of SQLite. Two copies in one process do not see each other's
    POSIX locks, so a connection of Python's ``sqlite3`` closed while Bytewax has the file open
    drops Bytewax's locks and deletes the WAL it is writing to (its snapshots are lost: seen in
    ``bench/scale.py``; sqlite.org/howtocorrupt.html, 2.2). ``compact`` is safe in-process only
    because it runs before Bytewax opens the files. The child dies with the engine (Linux:
    ``PR_SET_PDEATHSIG``; elsewhere within ``SETTLE_EVERY_S``), so a restart's ``compact``
    never races it. Call it before Bytewax opens the store: it reads each partition's commit
    epoch here (in-process, safe then), which tells the child when Bytewax's loader is done.
    """
    started = {part.name: _started_epoch(part)
               for part in sorted(Path(recovery_dir).glob("part-*.sqlite3"))}
    # -P: the script's directory (kwf/engine) is not put on sys.path; nothing of kwf imported
    return subprocess.Popen([sys.executable, "-P", __file__, str(recovery_dir), str(os.getpid()),
                             json.dumps(started)], stdin=subprocess.DEVNULL)


def _die_with_parent(parent: int) -> None:
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        ctypes.CDLL(name).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # died before prctl took effect
        sys.exit(0)


def _settle_all(parts: dict[Path, int | None], dbs: dict[Path, sqlite3.Connection]) -> int:
    """One pass over the partitions (connections kept open between passes); a partition that
    fails is logged and retried later."""
    moved = 0
    for part, started in parts.items():
        if os.getppid() != _PARENT[0]:  # the engine is gone: a restart may be compacting
            sys.exit(0)
        try:
            db = dbs.get(part) or dbs.setdefault(part, _connect(part))
            moved += _settle_on(db, started)
        except sqlite3.Error as e:  # only slower GC without it; the next pass retries
            log.warning("recovery_not_settled", partition=str(part), reason=str(e))
    return moved


def _started_epoch(part: Path) -> int | None:
    db = sqlite3.connect(part, timeout=30.0)
    try:
        return _commit_epoch(db)
    except sqlite3.Error:  # not initialised: Bytewax creates its tables when it opens it
        return None
    finally:
        db.close()


_PARENT = [os.getppid()]


def _settler_main(recovery_dir: str, parent: int, started: dict[str, int | None]) -> None:
    _PARENT[0] = parent
    _die_with_parent(parent)
    structlog.configure(  # JSON lines on stderr like the engine's (kwf.engine.logs), info and up
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(20),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    parts = {Path(recovery_dir) / name: epoch for name, epoch in started.items()}
    dbs: dict[Path, sqlite3.Connection] = {}
    while os.getppid() == parent:
        time.sleep(SETTLE_EVERY_S)
        start = time.monotonic()
        moved = _settle_all(parts, dbs)
        if moved > 10_000:  # after a start: every row moves once
            log.info("recovery_settled", rows=moved, seconds=round(time.monotonic() - start, 3))


if __name__ == "__main__":
    _settler_main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
