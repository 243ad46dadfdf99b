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
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("kwf.engine.recovery")

THREADS_PER_PARTITION = 10_000
"""Threads per recovery partition that keep Bytewax's loader pages cheap (about 10 ms each)."""

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


def partitions_for(expected_threads: int) -> int:
    """Recovery partitions to create for a node expected to hold ``expected_threads`` threads
    (waiting and finished within retention); fixed for ever once created."""
    return max(1, min(MAX_PARTITIONS, math.ceil(expected_threads / THREADS_PER_PARTITION)))


@dataclass(frozen=True)
class Compacted:
    """What ``compact`` removed, over all partitions."""

    partitions: int
    dead_nulls: int
    superseded: int
    seconds: float


def compact(recovery_dir: str | Path) -> Compacted:
    """Delete the rows no restart needs from every partition of ``recovery_dir``; a partition
    that cannot be compacted is logged and left as it is (a restart is only slower)."""
    start = time.monotonic()
    parts = sorted(Path(recovery_dir).glob("part-*.sqlite3"))
    nulls = superseded = 0
    for part in parts:
        db = sqlite3.connect(part, timeout=30.0)
        try:
            with db:
                nulls += db.execute(_DEAD_NULLS).rowcount
                row = db.execute("SELECT MIN(commit_epoch) FROM commits").fetchone()
                if row is not None and row[0] is not None:
                    superseded += db.execute(_SUPERSEDED, (row[0],)).rowcount
        except sqlite3.Error as e:  # only slower without it: Bytewax says if the file is bad
            log.warning("recovery_not_compacted", partition=str(part), reason=str(e))
        finally:
            db.close()
    done = Compacted(len(parts), nulls, superseded, time.monotonic() - start)
    log.info("recovery_compacted", dir=str(recovery_dir), partitions=done.partitions,
             dead_nulls=done.dead_nulls,
             superseded=done.superseded, seconds=round(done.seconds, 3))
    return done
