"""The durable state of one thread (its journal) and its byte encoding.

The journal is the serialized continuation: the start input and every applied event, in
order, are enough to re-create the coroutine by replay. It also keeps what the engine needs
without a live instance (the step and output counters, the next timers, the status), so that
Bytewax can rebuild every key at startup without replaying anything. A finished thread's
journal shrinks to a tombstone: status, result and counters, until ``expires``.

Encoding is pickle (protocol 5) over builtins only, behind a format number: never an object
pickled by module path, which would tie a snapshot to an import location. (Earlier versions
used cloudpickle, which writes the very same bytes for builtins, three times slower.)

Each step is journaled with its *origin*, the prefix of the suspend ids it creates: the Kafka
offset of the ``workflow-resume`` record that caused it (``"17"``: ids ``17:1``, ``17:2``), or,
for a step the engine starts without a record (a built-in durable timer), the origin of the
thread's last record-caused step and a count (``"17.1"``, ``"17.2"``: ids ``17.1:1``). All
records of a thread share a partition, so ids are unique within the partition, and replay
recreates them from the journal alone.

Format 1 (before origins) cannot be replayed: its ids were step numbers. ``decode`` reads it
anyway, so that restoring never fails; a running thread comes back ``refused`` (the engine
parks it as failed and says why), a finished one is a plain tombstone.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, fields
from typing import Any

FORMAT = 2
"""2: steps carry their origin (suspend ids from Kafka offsets). 1: ids from step numbers."""

RUNNING, COMPLETED, FAILED, CANCELLED = "running", "completed", "failed", "cancelled"
CONTINUED = "continued"
"""A run that called ``kwf.continue_as_new``: only ever seen in the status record of its last
step, since the thread's journal is replaced by the new run's in that same step."""

# Event kinds, stored as the first item of each event tuple.
RESUME, ERROR, TIMER, CANCEL = "resume", "error", "timer", "cancel"

Event = tuple[str, float, Any, Any, str]
"""``(kind, logical time, ref or None, value / error / cancel payload, origin)``."""

Check = tuple[int, int, tuple[str, ...]]
"""What a step produced: ``(output count, CRC of the outputs, pending ids)``; replay compares."""


@dataclass(slots=True)
class Journal:
    """One thread's durable state; see the module docstring."""

    thread: str
    workflow: str
    fingerprint: str
    arg: Any
    started: float
    base_step: int
    base_seq: int
    events: list[Event] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    step: int = 0
    seq: int = 0
    time: float = 0.0
    status: str = RUNNING
    timers: tuple[float, ...] = ()
    result: str | None = None
    """Tombstone: JSON of the result, or of the error text."""
    expires: float | None = None
    """Tombstone: when its state may be discarded."""
    origin: str = "0"
    """The start's origin: the offset of the ``new:`` / ``init:`` record."""
    refused: str | None = None
    """Why this journal cannot be replayed (written by an older kwf); the engine parks it."""
    parent: tuple[str, str | None] | None = None
    """A child's parent thread and the ref its end is sent to (None: nobody waits)."""
    patches: dict[str, int] = field(default_factory=dict)
    """``kwf.patched`` markers: patch id -> the step that first ran the patch-aware code."""

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    def next_timer(self) -> float | None:
        return self.timers[0] if self.timers else None

    def timer_origin(self) -> str:
        """The origin of a step with no record: ``<last record's offset>.<k>``, k from 1."""
        last = self.events[-1][4] if self.events else self.origin
        base, _, k = last.partition(".")
        return f"{base}.{int(k or 0) + 1}"

    def to_tombstone(self, retention_s: float) -> None:
        """Drop what only replay needs; keep what recognises late records and continues counters."""
        self.arg = None
        self.events = []
        self.checks = []
        self.timers = ()
        self.patches = {}
        self.expires = self.time + retention_s


_FIELDS = tuple(f.name for f in fields(Journal))


def encode(journal: Journal) -> bytes:
    """Bytes for a snapshot: a format number and the fields as a tuple of builtins."""
    return pickle.dumps((FORMAT, tuple(getattr(journal, f) for f in _FIELDS)), protocol=5)


def decode(data: bytes) -> Journal:
    """The journal from ``encode``; only ever called on our own snapshots.

    A format-1 journal is read, never replayed: a running thread comes back with ``refused``
    set. A format newer than this kwf's raises ``ValueError`` (downgrades are not supported).
    """
    version, values = pickle.loads(data)  # our own bytes, never a Kafka payload
    if version == FORMAT:
        return Journal(*values)
    if version != 1:
        msg = (f"journal format {version} is newer than this kwf's (format {FORMAT}); run the "
               "kwf version that wrote the recovery store")
        raise ValueError(msg)
    journal = Journal(*values)  # format 1 is format 2 without the last two fields
    journal.events = [(*event[:4], "") for event in journal.events]
    if not journal.finished:
        journal.refused = (
            f"thread {journal.thread!r} was journaled by an older kwf (journal format 1, suspend "
            f"ids from step numbers) and cannot be replayed by this one (format {FORMAT}, ids "
            "from Kafka offsets); finish such threads under the old version before upgrading, "
            "or start this one again with new:")
    return journal
