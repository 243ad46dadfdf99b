"""The durable state of one thread (its journal) and its byte encoding.

The journal is the serialized continuation: the start input and every applied event, in
order, are enough to re-create the coroutine by replay. It also keeps what the engine needs
without a live instance (the step and output counters, the next timers, the status), so that
Bytewax can rebuild every key at startup without replaying anything. A finished thread's
journal shrinks to a tombstone: status, result and counters, until ``expires``.

Encoding is cloudpickle over builtins only, behind a format number: never an object pickled
by module path, which stdlib pickle (Bytewax's snapshots) would tie to an import location.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, fields
from typing import Any

import cloudpickle

FORMAT = 1

RUNNING, COMPLETED, FAILED, CANCELLED = "running", "completed", "failed", "cancelled"

# Event kinds, stored as the first item of each event tuple.
RESUME, ERROR, TIMER, CANCEL = "resume", "error", "timer", "cancel"

Event = tuple[str, float, Any, Any]
"""``(kind, logical time, ref or None, value / error / cancel payload)``."""

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

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    def next_timer(self) -> float | None:
        return self.timers[0] if self.timers else None

    def to_tombstone(self, retention_s: float) -> None:
        """Drop what only replay needs; keep what recognises late records and continues counters."""
        self.arg = None
        self.events = []
        self.checks = []
        self.timers = ()
        self.expires = self.time + retention_s


_FIELDS = tuple(f.name for f in fields(Journal))


def encode(journal: Journal) -> bytes:
    """Bytes for a snapshot: a format number and the fields as a tuple of builtins."""
    data: bytes = cloudpickle.dumps((FORMAT, tuple(getattr(journal, f) for f in _FIELDS)))
    return data


def decode(data: bytes) -> Journal:
    """The journal from ``encode``; only ever called on our own snapshots."""
    version, values = pickle.loads(data)  # our own bytes, never a Kafka payload
    if version != FORMAT:
        msg = f"journal format {version} is not supported by this kwf (format {FORMAT})"
        raise ValueError(msg)
    return Journal(*values)
