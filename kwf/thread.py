"""The per-key core: what happens to one thread id, or one scheduler key, for each record and timer.

``ThreadState`` holds a thread's journal (durable) and its live instance (a cache that may be
evicted and rebuilt by replay), and applies the rules of DESIGN section 4: starts and
replacements, resumes, stale refs, tombstones, unknown threads, durable timers, and parking a
thread whose replay diverged. ``ScheduleState`` is the built-in ``workflow-scheduler``. Both
``kwf.testing.Engine`` and the Bytewax logic in ``kwf.engine.flow`` drive these classes, so that every
rule is written once.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from sys import intern

import structlog

from kwf import observe
from kwf.config import Settings
from kwf.errors import NonDeterminismError
from kwf.instance import Instance
from kwf.journal import (CANCEL, CONTINUED, ERROR, FAILED, RESUME, RUNNING, TIMER, Event, Journal,
                         decode, encode)
from kwf.protocol import (Cancel, Command, Fire, Incoming, Record, Resume, Schedule, Start,
                          StartChild, dead_letter, dumps, output_record)
from kwf.registry import Registry, UnknownWorkflow
from kwf.wheel import Arm

log = structlog.get_logger("kwf.thread")

_MAX_CONTINUE_CHAIN = 100
"""Runs that may continue as new in their very first step, one after the other, in one step."""


class LiveCache:
    """Bounds how many threads keep a live instance; the least recently used are evicted.

    Evicting keeps the journal, so the thread is rebuilt by replay on its next event. One cache
    serves one worker (or one ``Engine``).
    """

    def __init__(self, max_live: int) -> None:
        self.max_live = max_live
        self._lru: OrderedDict[str, ThreadState] = OrderedDict()
        self.evictions = 0
        """Instances evicted so far: the engine returns freed memory to the OS after many."""

    def touch(self, state: ThreadState) -> None:
        self._lru[state.key] = state
        self._lru.move_to_end(state.key)
        while len(self._lru) > self.max_live:
            _, oldest = self._lru.popitem(last=False)
            oldest.evict()
            self.evictions += 1

    def forget(self, state: ThreadState) -> None:
        if self._lru.get(state.key) is state:
            del self._lru[state.key]

    def __len__(self) -> int:
        return len(self._lru)


CONTEXTS: weakref.WeakSet[Context] = weakref.WeakSet()
"""Every ``Context`` alive in this process (one per worker): what metrics count threads in."""


@dataclass(eq=False)
class Context:
    """What every thread of one engine shares: the workflows, the settings, the live cache.

    ``journals`` counts the threads holding a journal (tombstones included) and
    ``tombstones`` the finished ones, for the metrics: live, journal-only, tombstone.
    """

    registry: Registry
    settings: Settings
    cache: LiveCache = field(init=False)
    journals: int = field(init=False, default=0)
    tombstones: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.cache = LiveCache(self.settings.max_live)
        CONTEXTS.add(self)


class ThreadState:
    """One thread id: its journal, its live instance, and the rules applied to its records."""

    __slots__ = ("key", "ctx", "journal", "instance", "_blocked", "armed")  # a million of them

    def __init__(self, key: str, ctx: Context, journal: Journal | None = None) -> None:
        self.key = key
        self.ctx = ctx
        self.journal = journal
        self.instance: Instance | None = None
        self._blocked = False  # its workflow is not served: wait for a record, not a timer
        self.armed: float | None = None
        """The wakeup the timer wheel holds for this thread (``kwf.wheel``); part of the snapshot."""

    @classmethod
    def restore(cls, data: bytes, ctx: Context) -> ThreadState:
        """From a snapshot; the instance is rebuilt lazily, on the next event or timer.

        Never raises for a journal of an older format: Bytewax rebuilds every key at startup,
        and an exception here would stop the engine at each restart. Such a thread is parked
        as failed at once (``wakeup``), saying why and what to do.
        """
        journal = decode(data)
        ctx.journals += 1
        ctx.tombstones += journal.finished
        # Shared, not one copy per thread: these repeat across a node's million journals.
        journal.workflow, journal.fingerprint = intern(journal.workflow), intern(journal.fingerprint)
        journal.status = intern(journal.status)
        return cls(journal.thread, ctx, journal)

    def snapshot(self) -> bytes | None:
        """The journal as bytes, or None once the thread's state may be discarded."""
        if self.journal is None:
            return None
        data = encode(self.journal)
        observe.stats.journal(len(data))
        return data

    def wakeup(self) -> float | None:
        """When ``on_timer`` should next run: a durable timer, or the tombstone's expiry."""
        j = self.journal
        if j is None or self._blocked:
            return None
        if j.refused is not None:
            return j.time  # park it now
        return j.expires if j.finished else j.next_timer()

    def arm(self) -> Arm | None:
        """After a record: what to tell the timer wheel, if the wakeup it holds is not current."""
        due = self.wakeup()
        if due == self.armed:
            return None
        self.armed = due
        return Arm(self.key, due)

    # -- events ------------------------------------------------------------------------------
    def on_fire(self, fire: Fire) -> list[Record]:
        """A firing of the timer wheel: timers due by then fire, an expired tombstone goes.

        The wheel forgot the entry it fired; if it was the one this thread armed, nothing is
        armed any more (``arm`` then sends the next wakeup). Stale firings change nothing.
        """
        if fire.due == self.armed:
            self.armed = None
        return self.on_timer(fire.due)

    def on_command(self, rec: Incoming, cmd: Command) -> list[Record]:
        """Apply a parsed ``workflow-resume`` record; never raises for a workflow's sake."""
        observe.stats.record(_kind(cmd), rec.timestamp)
        if isinstance(cmd, Fire):
            return self.on_fire(cmd)
        out: list[Record] = []  # filled as steps commit, so an error later loses none of them
        try:
            self._on_command(rec, cmd, out)
        except Exception as e:  # a bug of ours: keep the journal, drop the live object
            log.exception("internal_error", thread=self.key, source=rec.source)
            self.evict()
            out.append(dead_letter(rec, self.ctx.settings.dlq_topic,
                                   f"internal: {type(e).__name__}: {e}; the thread keeps its "
                                   "last committed step; resend the record after fixing the "
                                   "engine"))
        if self.instance is not None:  # ``_bound()``, inline
            self.ctx.cache.touch(self)
        return out

    def _on_command(self, rec: Incoming, cmd: Command, out: list[Record]) -> None:
        j, start = self.journal, isinstance(cmd, Start)
        if start and isinstance(cmd, StartChild) and self._refuse_child(rec, cmd, out):
            return
        if j is None and not start:
            out.append(dead_letter(rec, self.ctx.settings.dlq_topic,
                                   f"unknown-thread: no thread {self.key!r}; start it with new: "
                                   "or init:, or check the key"))
            return
        if start and cmd.only_if_new and j is not None:  # type: ignore[union-attr]  # a Start
            log.info("init_ignored", thread=self.key, reason="thread exists")
            return
        time = max(rec.timestamp, j.time) if j is not None else rec.timestamp
        try:  # timers due by the record's time fire first, as Engine's clock reaches the record
            self._fire_due(time, out)
            if start:
                self._start(cmd, rec, out)  # type: ignore[arg-type]  # a Start
                return
            j = self.journal
            if j is None or j.status != RUNNING:
                log.info("record_for_finished_thread_ignored", thread=self.key,
                         source=rec.source)
                return
            instance = self.instance if self.instance is not None else self._live()
        except _Unavailable as e:  # parked (its records), or its workflow is not served
            out += e.records
            if start:
                self._start(cmd, rec, out)  # type: ignore[arg-type]  # a Start
            elif e.reason is not None:
                out.append(dead_letter(rec, self.ctx.settings.dlq_topic, e.reason))
            return
        origin = str(rec.offset)
        if isinstance(cmd, Resume):
            event: Event = (ERROR if cmd.is_error else RESUME, time, cmd.ref,
                            cmd.error if cmd.is_error else cmd.value, origin)
        elif isinstance(cmd, Cancel):
            event = (CANCEL, time, None, cmd.payload, origin)
        else:  # a Fire is applied by on_fire, never here
            msg = f"thread {self.key!r}: {cmd!r} reached _on_command"
            raise TypeError(msg)
        records = instance.apply(event)
        if records is None:
            log.info("stale_record_ignored", thread=self.key, ref=getattr(cmd, "ref", None),
                     source=rec.source)
            return
        out += records
        self._stepped(out)
        self._fire_due(time, out)

    def on_timer(self, now: float) -> list[Record]:
        """Fire durable timers due by ``now``, or discard an expired tombstone."""
        j = self.journal
        if j is None:
            return []
        if j.finished:
            if j.expires is not None and j.expires <= now:
                self.journal = None
                self.ctx.journals -= 1
                self.ctx.tombstones -= 1
                # A null value deletes the thread from the compacted events topic.
                return [output_record(self.ctx.settings.events_topic, self.key, None,
                                      thread=self.key, seq=j.seq + 1, step=j.step, time=now)]
            return []
        out: list[Record] = []
        try:
            if j.refused is not None:
                self._live()  # parks it
            self._fire_due(now, out)
        except _Unavailable as e:
            out += e.records
        except Exception:
            log.exception("internal_error", thread=self.key, during="timer")
            self.evict()
            self._blocked = True
        self._bound()
        return out

    def _start(self, cmd: Start, rec: Incoming, out: list[Record]) -> None:
        old, time = self.journal, rec.timestamp
        workflow = self.ctx.registry.resolve(cmd.workflow)
        journal = Journal(
            thread=self.key, workflow=workflow.name, fingerprint=workflow.fingerprint,
            arg=cmd.arg, started=max(time, old.time) if old else time,
            base_step=old.step + 1 if old else 0, base_seq=old.seq if old else 0,
            origin=str(rec.offset), parent=cmd.link if isinstance(cmd, StartChild) else None)
        instance, records = Instance.start(workflow, journal, self.ctx.settings)
        # Only now, the new thread being whole, is the old one replaced.
        if old is not None and not old.finished:
            log.info("thread_replaced", thread=self.key, old_workflow=old.workflow,
                     new_workflow=workflow.name)
            observe.stats.thread_ended(old.workflow, "replaced")
        self.ctx.journals += old is None
        self.ctx.tombstones -= old is not None and old.finished
        observe.stats.thread_started(workflow.name)
        self.evict()
        self.journal, self.instance, self._blocked = journal, instance, False
        out += records
        self._stepped(out)
        self._fire_due(time, out)

    def _refuse_child(self, rec: Incoming, cmd: StartChild, out: list[Record]) -> bool:
        """Whether a ``child:`` start is not to run: a repeat of this child (ignored), or
        refused (another thread holds the id, or the workflow is unknown: dead-lettered, and
        the parent's await fails saying why)."""
        j = self.journal
        if j is not None and j.workflow == cmd.workflow and j.parent == cmd.link:
            log.info("child_start_repeated", thread=self.key, parent=cmd.parent)
            return True
        if j is not None:
            holder = f"for parent {j.parent[0]!r}" if j.parent else "started directly"
            reason = (f"child id {self.key!r} is already thread of workflow {j.workflow!r} "
                      f"({holder}, {j.status}); give kwf.child another id")
        else:
            try:
                self.ctx.registry.resolve(cmd.workflow)
                return False
            except UnknownWorkflow as e:
                reason = str(e)
        s = self.ctx.settings
        out.append(dead_letter(rec, s.dlq_topic, f"child-refused: {reason}"))
        if cmd.ref is not None:
            out.append(Record(s.resume_topic, cmd.parent, dumps({"ref": cmd.ref, "error": {
                "child": self.key, "workflow": cmd.workflow, "status": "refused",
                "error": reason}}), (("kwf-child", self.key),), rec.timestamp))
        return True

    def _fire_due(self, now: float, out: list[Record]) -> None:
        """Fire due timers, one step per due time, adding each step's records as it commits."""
        while (j := self.journal) is not None and j.status == RUNNING and j.timers:
            due = j.timers[0]  # ``j.next_timer()``: this runs twice for every record
            if due > now:
                break
            instance = self._live()
            records = instance.apply((TIMER, max(due, j.time), None, None, j.timer_origin()))
            if records is None:  # cannot happen while the journal lists a due timer
                msg = f"thread {self.key!r}: journal lists a timer at {due} the code does not have"
                raise RuntimeError(msg)
            observe.stats.timer_fired(due)
            out += records
            self._stepped(out)

    # -- the live instance ---------------------------------------------------------------------
    def _live(self) -> Instance:
        """The live instance, rebuilt by replay if it was evicted; else ``_Unavailable``."""
        if self.instance is not None:
            return self.instance
        j = self.journal
        assert j is not None
        if j.refused is not None:
            raise _Unavailable(self._park(j.refused, "JournalFormatError"), None)
        try:
            workflow = self.ctx.registry.resolve(j.workflow)
        except UnknownWorkflow:
            log.error("workflow_not_served", thread=self.key, workflow=j.workflow)
            self._blocked = True
            raise _Unavailable([], f"unknown-workflow: thread {self.key!r} runs workflow "
                                   f"{j.workflow!r}, which this engine does not serve; deploy "
                                   "it and resend") from None
        try:
            self.instance = Instance.rebuild(workflow, j, self.ctx.settings)
        except NonDeterminismError as e:
            raise _Unavailable(self._park(str(e)), None) from None
        self._blocked = False
        return self.instance

    def _park(self, reason: str, error_type: str = "NonDeterminismError") -> list[Record]:
        """Replay diverged or is refused: the thread fails, its journal is kept for inspection."""
        j = self.journal
        assert j is not None
        log.error("thread_parked", thread=self.key, workflow=j.workflow, reason=reason,
                  error_type=error_type)
        observe.stats.thread_ended(j.workflow, "parked")
        self.ctx.tombstones += 1
        s = self.ctx.settings
        j.status, j.result, j.refused = FAILED, dumps(reason), None
        j.expires = j.time + s.tombstone_retention_s
        status = dumps({"thread": self.key, "workflow": j.workflow, "status": FAILED,
                        "step": j.step, "pending": [], "timers": [], "updated": j.time,
                        "error": reason})
        records = []
        outputs: list[tuple[str, str, str | None, tuple[tuple[str, str], ...]]] = [
            (s.error_topic, self.key, j.result, (("kwf-error-type", error_type),)),
            (s.events_topic, self.key, status, ())]
        if j.parent is not None and j.parent[1] is not None:  # its parent waits: tell it
            outputs.append((s.resume_topic, j.parent[0], dumps({"ref": j.parent[1], "error": {
                "child": self.key, "workflow": j.workflow, "status": FAILED, "error": reason}}), ()))
        for topic, key, value, extra in outputs:
            j.seq += 1
            records.append(output_record(topic, key, value, thread=self.key, seq=j.seq,
                                         step=j.step, time=j.time, extra=extra))
        return records

    def _stepped(self, out: list[Record], chain: int = 0) -> None:
        """After a step: a run that continued as new is replaced by its new run (whose start
        step's records go to ``out``); a finished thread becomes a tombstone, its instance
        disposed."""
        j, instance = self.journal, self.instance
        assert j is not None and instance is not None
        if j.status == CONTINUED:
            self._continue(instance, out, chain)
        elif j.finished:
            instance.dispose()
            self.instance = None
            self.ctx.cache.forget(self)
            j.to_tombstone(self.ctx.settings.tombstone_retention_s)
            self.ctx.tombstones += 1
            observe.stats.thread_ended(j.workflow, j.status)

    def _continue(self, ended: Instance, out: list[Record], chain: int) -> None:
        """Start the new run of a thread whose run called ``kwf.continue_as_new``, in this step.

        The old journal is replaced by a fresh one (step and ``kwf-seq`` continue), so a
        snapshot holds either the old run before the record that made it continue, or the new
        run after it: nothing is lost or applied twice.
        """
        old = self.journal
        assert old is not None and ended.continued is not None
        arg, name = ended.continued
        ended.dispose()
        self.instance = None
        self.ctx.cache.forget(self)
        try:
            workflow = self.ctx.registry.resolve(name or old.workflow)
        except UnknownWorkflow as e:
            out += self._park(f"kwf.continue_as_new: {e}", "UnknownWorkflow")
            return
        if chain >= _MAX_CONTINUE_CHAIN:
            out += self._park(f"the run continued as new {chain} times in a row in its first "
                              "step; a run must wait for something before it continues",
                              "ContinueAsNew")
            return
        journal = Journal(thread=self.key, workflow=workflow.name,
                          fingerprint=workflow.fingerprint, arg=arg, started=old.time,
                          base_step=old.step + 1, base_seq=old.seq, parent=old.parent,
                          origin=old.timer_origin())  # ids never met by the old run's
        log.info("continued_as_new", thread=self.key, workflow=workflow.name,
                 previous_workflow=old.workflow, step=journal.base_step, events=len(old.events))
        observe.stats.thread_ended(old.workflow, CONTINUED)  # started minus ended: still one
        observe.stats.thread_started(workflow.name)
        instance, records = Instance.start(workflow, journal, self.ctx.settings)
        self.journal, self.instance = journal, instance
        out += records
        self._stepped(out, chain + 1)

    def _bound(self) -> None:
        """After a record or timer: a live instance counts against the live-instance budget.

        Done once per record, not per step, so a thread rebuilt for a record keeps its instance
        until the record is done (with ``max_live=0``, until then only).
        """
        if self.instance is not None:
            self.ctx.cache.touch(self)

    def evict(self) -> None:
        """Drop the live instance (closing its coroutines now); the journal stays."""
        if self.instance is not None:
            self.instance.dispose()
            self.instance = None
        self.ctx.cache.forget(self)


def _kind(cmd: Command) -> str:
    """A record's kind, for the metrics: new, init, resume, error, cancel or timer."""
    if type(cmd) is Resume:  # most records
        return "error" if cmd.is_error else "resume"
    if isinstance(cmd, Start):
        return "init" if cmd.only_if_new else "new"
    if isinstance(cmd, Resume):
        return "error" if cmd.is_error else "resume"
    if isinstance(cmd, Fire):
        return "timer"
    return "cancel" if isinstance(cmd, Cancel) else "other"


class _Unavailable(Exception):
    """No live instance can be had: ``records`` to emit, and a dead-letter reason if any."""

    def __init__(self, records: list[Record], reason: str | None) -> None:
        super().__init__(reason)
        self.records = records
        self.reason = reason


class ScheduleState:
    """The ``workflow-scheduler`` entries of one key prefix: ``b`` → due time."""

    def __init__(self, key: str, entries: dict[str, float] | None = None) -> None:
        self.key = key
        self.entries = entries or {}

    def on_schedule(self, schedule: Schedule) -> None:
        observe.stats.record("schedule", None)
        if schedule.due is None:
            self.entries.pop(schedule.value, None)
        else:
            self.entries[schedule.value] = schedule.due

    def wakeup(self) -> float | None:
        return min(self.entries.values()) if self.entries else None

    def on_timer(self, now: float, resume_topic: str) -> list[Record]:
        """Send each due entry to ``workflow-resume``, in due order, timestamped with its due time."""
        due = sorted((t, b) for b, t in self.entries.items() if t <= now)
        for _, b in due:
            del self.entries[b]
        return [Record(resume_topic, self.key, b, (("kwf-scheduled", repr(t)),), t)
                for t, b in due]

    def snapshot(self) -> dict[str, float] | None:
        return dict(self.entries) if self.entries else None
