"""The timer wheel: every thread's next wakeup (durable timer or tombstone expiry) in a few keys.

Why: Bytewax scans every key holding a wakeup (``notify_at``) on every activation, so a node
with a million threads waiting on timers, or finished and waiting to expire, would pay a
million checks per record. Instead each thread reports its wakeup to one of ``SLOTS`` wheel
slots (``Arm``), a slot holds the wakeups of its threads, and only slots hold a Bytewax
wakeup: at most ``SLOTS`` keys whatever the number of threads.

At the due time (held back by the engine's input clock) a slot writes a firing record to
``workflow-resume``, ``timer:<due>`` keyed by the thread (``protocol.Fire``), as the original's
scheduler does; the thread applies it like any record (``ThreadState.on_fire``). Firings are
at-least-once and may be stale; the thread's journal decides what is due, so a duplicate or a
stale firing changes nothing. ``kwf.testing.Engine`` and the dataflow both drive this class.

The protocol between a thread and its slot: ``ThreadState.armed`` is the wakeup the slot holds
for the thread. After each record the thread sends ``Arm(thread, wakeup)`` if its wakeup
changed (``None`` removes the entry); a slot forgets an entry when it fires it, and the thread
learns that from the firing (``armed`` equal to the firing's due time becomes ``None``).
"""

from __future__ import annotations

import heapq
import zlib
from typing import NamedTuple

from kwf.protocol import Record, timer_value

SLOTS = 64
"""Wheel slots: keys holding a Bytewax wakeup. Changing it is safe (an entry left in its old
slot fires once, stale), but each slot snapshots all its entries when touched: more slots,
smaller snapshots; fewer slots, fewer keys for Bytewax to scan."""


class Arm(NamedTuple):
    """A thread's next wakeup, for its wheel slot (``due`` None: no wakeup)."""

    thread: str
    due: float | None


def slot_of(thread: str) -> str:
    """The wheel slot holding ``thread``'s wakeup: a stable hash, the same in every process."""
    return f"slot-{zlib.crc32(thread.encode('utf-8', 'surrogatepass')) % SLOTS}"


class WheelState:
    """One wheel slot: thread → due time, and a heap to find the soonest (stale heap items are
    skipped lazily and dropped when they outnumber the entries)."""

    def __init__(self, key: str, entries: dict[str, float] | None = None) -> None:
        self.key = key
        self.entries = entries or {}
        self._heap = [(due, thread) for thread, due in self.entries.items()]
        heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def dump(self) -> dict[str, float]:
        """What the slot's snapshot holds (with its key): thread → due time."""
        return dict(self.entries)

    def on_arm(self, arm: Arm) -> None:
        self.set(arm.thread, arm.due)

    def set(self, key: str, due: float | None) -> None:
        """``key``'s due time is now ``due`` (None: it has none)."""
        if due is None:
            self.entries.pop(key, None)
            return
        if self.entries.get(key) == due:
            return
        self.entries[key] = due
        heapq.heappush(self._heap, (due, key))
        if len(self._heap) > 2 * len(self.entries) + 64:
            self._heap = [(t, k) for k, t in self.entries.items()]
            heapq.heapify(self._heap)

    def wakeup(self) -> float | None:
        heap, entries = self._heap, self.entries
        while heap and entries.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> tuple[float, str] | None:
        """The soonest entry if it is due by ``now``, removed; else None."""
        due = self.wakeup()
        if due is None or due > now:
            return None
        _, key = heapq.heappop(self._heap)
        del self.entries[key]
        return due, key

    def on_timer(self, now: float, resume_topic: str) -> list[Record]:
        """The firing records of every entry due by ``now``, in due order.

        Stamped ``now``, not with their due time: an input clock reading record timestamps
        would otherwise take each late firing for a partition still behind, and hold back the
        next timers until the partition went quiet.
        """
        out: list[Record] = []
        while (entry := self.pop_due(now)) is not None:
            due, thread = entry
            out.append(Record(resume_topic, thread, timer_value(due), (), now))
        return out
