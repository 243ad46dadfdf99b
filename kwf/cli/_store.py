"""Read-only access to an engine's recovery store: the journals of its threads.

The journal is the thread's history (DESIGN section 7), and Bytewax keeps it in the recovery
partitions (``part-*.sqlite3``, table ``snaps``). This module opens them read-only, so it is safe
while the engine runs, and decodes the newest snapshot of each thread. It never writes: a
recovery store is the engine's alone.
"""

from __future__ import annotations

import pickle
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kwf.journal import Journal, decode

THREAD_STEP = "kwf.thread.stateful_batch"
"""The recovery key of the per-thread step (flow id ``kwf``, step ``thread``)."""
SETTLED = "kwf_snaps"
"""The engine's table of settled rows beside Bytewax's ``snaps`` (``kwf.engine.recovery``;
the tools never import the engine)."""


class StoreError(RuntimeError):
    """The recovery store cannot be read; the message says what to check."""


def partitions(recovery_dir: str | Path) -> list[Path]:
    """The partition files of a recovery directory, or ``StoreError`` naming what is wrong."""
    root = Path(recovery_dir)
    if not root.is_dir():
        msg = f"no recovery directory {root}; pass the engine's -r directory (kwf run: STATE/recovery)"
        raise StoreError(msg)
    parts = sorted(root.glob("part-*.sqlite3"))
    if not parts:
        msg = f"{root} holds no part-*.sqlite3: it is not an initialised recovery directory"
        raise StoreError(msg)
    return parts


def _rows(part: Path, keys: Iterable[str] | None) -> Iterator[tuple[str, bytes]]:
    db = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=10.0)
    try:
        settled = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                             (SETTLED,)).fetchone()
        rows = "snaps" if settled is None else (  # rows the engine settled (kwf.engine.recovery)
            "(SELECT step_id, state_key, snap_epoch, ser_change FROM snaps "
            f"UNION ALL SELECT step_id, state_key, snap_epoch, ser_change FROM {SETTLED})")
        where, args = "step_id = ?", [THREAD_STEP]
        if keys is not None:
            wanted = list(keys)
            where += f" AND state_key IN ({','.join('?' * len(wanted))})"
            args += wanted
        query = ("SELECT state_key, ser_change FROM (SELECT state_key, ser_change, ROW_NUMBER() "
                 "OVER (PARTITION BY state_key ORDER BY snap_epoch DESC) AS newest "
                 f"FROM {rows} WHERE {where}) WHERE newest = 1")  # noqa: S608 - no input in it
        for key, data in db.execute(query, args):
            if data is not None:  # a tombstone row: the thread's state was discarded
                yield key, data
    except sqlite3.Error as e:
        msg = f"cannot read {part}: {e}"
        raise StoreError(msg) from e
    finally:
        db.close()


def read_journals(recovery_dir: str | Path, keys: Iterable[str] | None = None) -> Iterator[Journal]:
    """The newest journal of each thread in the store (only ``keys`` if given), in no order.

    A snapshot is Bytewax's pickle of what kwf gave it, the journal's bytes and the thread's
    wheel entry (bytes alone before the timer wheel): our own store, never Kafka input.
    """
    wanted = None if keys is None else set(keys)
    for part in partitions(recovery_dir):
        for _key, data in _rows(part, wanted):
            yield decode(_journal_bytes(data))


def snapshots(part: Path, accept: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """The newest snapshot bytes of each thread in one partition file, as ``journal.encode`` made
    them, for threads whose key ``accept`` takes (all if None).

    For callers that decode themselves, so that a snapshot this kwf cannot decode (an older
    journal format) is reported against its thread instead of ending the whole read.
    """
    for key, data in _rows(part, None):
        if accept is None or accept(key):
            yield key, _journal_bytes(data)


def _journal_bytes(data: bytes) -> bytes:
    """The journal's bytes from a stored snapshot: Bytewax's pickle of what kwf gave it, the
    journal's bytes and the thread's timer wheel entry (bytes alone before the wheel)."""
    snap = pickle.loads(data)  # noqa: S301 - the engine's own snapshot
    return snap[0] if isinstance(snap, tuple) else snap  # type: ignore[no-any-return]
