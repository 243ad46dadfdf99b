"""One live run of a workflow thread: start it, apply an event, rebuild it from its journal.

An ``Instance`` owns a ``WorkflowLoop`` and the coroutine of ``main``. Each step sets the
logical time, settles what the event names, runs the loop until the workflow waits again, and
returns the step's records. Live, it appends the event and a check of what the step produced to
the journal; replaying, it suppresses outputs and compares the check instead, so that code that
changed since the journal was written is caught (``NonDeterminismError``) instead of resumed in
a wrong state. It never talks to Kafka and never reads the wall clock.
"""

from __future__ import annotations

import json
import random
import time as _time
import zlib
from typing import Any, Iterable

import structlog

from kwf import config, observe
from kwf.api import Suspend
from kwf.config import Settings
from kwf.errors import NonDeterminismError, RemoteError
from kwf.journal import (CANCELLED, COMPLETED, CONTINUED, ERROR, FAILED, RESUME, RUNNING, TIMER,
                         Check, Event, Journal)
from kwf.loop import WorkflowLoop, _Future
from kwf.protocol import (MAX_KEY_BYTES, Record, child_value, dumps, output_record,
                          status_json)
from kwf.registry import Workflow, check_name

log = structlog.get_logger("kwf.instance")

_CLOSE_ATTEMPTS = 100
_UNCLOSABLE: list[Any] = []
"""Coroutines that kept awaiting after ``GeneratorExit`` 100 times: held, never finalized."""

_UNDISPOSED: set[Instance] = set()
"""Every instance not yet disposed, held strongly: its coroutines must never reach the garbage
collector, whose finalizers would run their ``finally`` blocks later, inside another thread's
step. Owners dispose explicitly; one that forgets leaks memory, never outputs."""


class Instance:
    """The live coroutine of one thread, with its loop, pending suspends and counters."""

    __slots__ = ("workflow", "journal", "settings", "thread_id", "loop", "_rng", "pending", "step",
                 "seq", "status", "replaying", "disposed", "_n", "_origin", "_out", "_count",
                 "_crc", "_topics", "_result", "_error", "_tasks_kept", "_markers", "_problem",
                 "_limit_error", "children", "continued", "main")  # one per live thread

    def __init__(self, workflow: Workflow, journal: Journal, settings: Settings,
                 replaying: bool = False) -> None:
        self.workflow = workflow
        self.journal = journal
        self.settings = settings
        self.thread_id = journal.thread
        self.loop = WorkflowLoop(  # type: ignore[abstract]
            journal.started, journal.thread, workflow.location)
        self.loop.instance = self
        self._rng: random.Random | None = None
        self.pending: dict[str, _Future] = {}
        self.step = journal.base_step
        self.seq = journal.base_seq
        self.status = RUNNING
        self.replaying = replaying
        self.disposed = False
        self._n = 0
        self._origin = journal.origin  # the prefix of auto suspend ids in the current step
        self._out: list[Record] = []
        self._count = 0
        self._crc = 0
        self._topics: list[str] = []
        self._result: str | None = None
        self._error: tuple[str, str] | None = None  # a failure's message and traceback
        self._tasks_kept = 0
        self._markers: dict[str, int] | None = None  # made on first use, as ``children``
        self._problem: str | None = None  # a replay divergence found inside workflow code
        self._limit_error: Exception | None = None
        self.children: dict[str, str] | None = None
        """Children awaited: the parent's ref -> the child's thread id (shown in the status)."""
        self.continued: tuple[Any, str | None] | None = None
        """``kwf.continue_as_new(arg, workflow)`` was called: the new run's argument and workflow."""
        self.main = self.loop.create_task(workflow.fn(_fresh(journal.arg)), name=journal.thread)
        _UNDISPOSED.add(self)

    @property
    def rng(self) -> random.Random:
        """The thread's seeded random source (``kwf.random``), made on first use: its 2.5 KB of
        state would otherwise cost every live thread, most of which never draw."""
        if self._rng is None:
            seed = f"{self.journal.thread}/{self.journal.base_step}"
            self._rng = random.Random(zlib.crc32(seed.encode()))
        return self._rng

    # -- building ------------------------------------------------------------------------
    @classmethod
    def start(cls, workflow: Workflow, journal: Journal, settings: Settings) -> tuple[Instance, list[Record]]:
        """Run a new thread's first step (``journal`` holds no events yet)."""
        began = _time.perf_counter()
        inst = cls(workflow, journal, settings)
        try:
            records = inst._step(None)
        except BaseException:
            inst.dispose()
            raise
        observe.stats.step(workflow.name, _time.perf_counter() - began)
        return inst, records  # type: ignore[return-value]  # a start always runs

    @classmethod
    def rebuild(cls, workflow: Workflow, journal: Journal, settings: Settings) -> Instance:
        """Re-create the live coroutine by replaying the journal, outputs suppressed.

        Raises ``NonDeterminismError`` (after disposing of the half-built instance) when a step
        does not reproduce what the journal recorded.
        """
        began = _time.perf_counter()
        inst = cls(workflow, journal, settings, replaying=True)
        try:
            inst._step(None)
            inst._verify(journal.checks[0], "start")
            for event, check in zip(journal.events, journal.checks[1:]):
                if inst._step(event) is None:
                    inst._diverged(f"the journal applied {_describe(event)}, but the code has "
                                   "nothing waiting for it")
                inst._verify(check, _describe(event))
        except BaseException:
            inst.dispose()
            raise
        inst.replaying = False
        observe.stats.replay(workflow.name, _time.perf_counter() - began, len(journal.events))
        return inst

    # -- applying --------------------------------------------------------------------------
    def apply(self, event: Event) -> list[Record] | None:
        """Apply one event live; None when nothing waits for it (stale: nothing changes)."""
        began = _time.perf_counter()
        records = self._step(event)
        if records is not None:
            observe.stats.step(self.workflow.name, _time.perf_counter() - began)
        return records

    def _step(self, event: Event | None) -> list[Record] | None:
        """One step, live or replayed: the start (``event`` None) or an event; None if stale."""
        if event is None:
            self._begin(self.journal.started)
        elif not self._settle(event):
            return None
        self.loop.run_until_idle()
        return self._commit(event)

    def _settle(self, event: Event) -> bool:
        kind, time, ref, payload, origin = event
        future: _Future | None = None
        if kind in (RESUME, ERROR):
            future = self.pending.get(ref)
            if future is None or future.done():
                return False
        elif kind == TIMER:
            due = self.loop.next_timer()
            if due is None or due > time:
                return False
        elif self.main.done():  # CANCEL
            return False
        self.step += 1
        self._origin = origin
        self._begin(time)
        if not self.replaying and len(self.journal.events) >= self.settings.max_journal_events:
            self._over_limit()
            return True
        if kind == RESUME:  # fresh copies: workflow code may mutate what it gets, not the journal
            future.set_result(_fresh(payload))  # type: ignore[union-attr]  # checked above
        elif kind == ERROR:
            future.set_exception(RemoteError(_fresh(payload)))  # type: ignore[union-attr]
        elif kind == TIMER:
            self.loop.fire_timers(time)
        else:
            self.main.cancel(payload)
        return True

    def _over_limit(self) -> None:
        """The journal is full: the thread fails (cleanup runs) instead of applying the event."""
        self._limit_error = RuntimeError(
            f"thread {self.thread_id!r}: its journal reached {len(self.journal.events)} events "
            f"(KWF_MAX_JOURNAL_EVENTS={self.settings.max_journal_events}); a workflow that runs "
            "indefinitely must call kwf.continue_as_new(state) every so many events, which "
            "starts it again with a fresh journal")
        self.main.cancel()

    def _begin(self, time: float) -> None:
        loop = self.loop
        if time > loop._time:  # ``loop.set_time(time)``, inline
            loop._time = time
        self._n = 0
        if self._out:  # left by a step that failed; ``_commit`` hands the list over
            self._out = []
        self._count = 0
        self._crc = 0
        if self.replaying:
            self._topics = []

    def _commit(self, event: Event | None) -> list[Record]:
        """End the step: finish if main ended, tidy, emit the status record, journal the step."""
        if self.status == RUNNING and (self.main.done() or self.continued is not None):
            self._finish()
        pending, children = self.pending, self.children
        for settled in [k for k, f in pending.items() if f.done()]:
            del pending[settled]
            if children:
                children.pop(settled, None)
        loop = self.loop
        if len(loop.tasks) > 2 * self._tasks_kept + 4:  # tidy now and then, not every step
            loop.tasks = [t for t in loop.tasks if not t.done()]
            self._tasks_kept = len(loop.tasks)
        timers = tuple(loop.timer_dues()) if self.status == RUNNING and loop._timers else ()
        if self._error is None:
            self._emit(self.settings.events_topic, self.thread_id, self._status_json(timers))
        else:  # the traceback names this machine's files: outside the check, so replay agrees
            status = self._status_json(timers, self._error[0])
            self._emit(self.settings.events_topic, self.thread_id,
                       self._status_json(timers, *self._error), checked=status)
        if not self.replaying:
            j = self.journal
            if event is not None:
                j.events.append(event)
                if len(j.events) == self.settings.journal_warn_events:
                    observe.stats.journal_long(self.workflow.name)
                    log.warning("journal_long", thread=self.thread_id, workflow=self.workflow.name,
                                events=len(j.events), limit=self.settings.max_journal_events,
                                hint="call kwf.continue_as_new(state) every so many events")
            if self._markers:
                j.patches.update(self._markers)
                self._markers = None
            j.checks.append(self._check())
            j.step, j.seq, j.time, j.status, j.timers, j.result = (
                self.step, self.seq, self.loop.time(), self.status, timers, self._result)
        out, self._out = self._out, []  # the records are the caller's, not kept till next step
        return out

    def _check(self) -> Check:
        return (self._count, self._crc, tuple(self.pending))

    def _finish(self) -> None:
        """Main ended: cancel what it left running, close the rest, then send the result.

        A run that continues as new has every task cancelled, main too if it caught the
        exception: their cleanup runs in this step, then the thread starts its new run.
        """
        for task in self.loop.tasks:
            if (task is not self.main or self.continued is not None) and not task.done():
                task.cancel()
        self.loop.run_until_idle()
        self._close_tasks()
        if self.continued is not None:
            if self.main.done() and not self.main.cancelled():
                self.main.exception()  # retrieved: ContinueAsNew is how the run ended
            self.status = CONTINUED
            return
        main = self.main
        error: BaseException | None = self._limit_error
        if main.cancelled() and error is None:
            self.status = CANCELLED
            self._notify_parent(error="the thread was cancelled")
            return
        if error is None:
            error = main.exception()
        if error is None:
            try:
                value = dumps(main.result())
            except (TypeError, ValueError, RecursionError) as e:
                error = TypeError(f"the workflow's result is not JSON: {e}")
            else:
                if len(value) > self.settings.max_payload_bytes:
                    error = ValueError(f"the workflow's result is {len(value)} bytes of JSON, "
                                       "over KWF_MAX_PAYLOAD_BYTES; return a reference instead")
        if error is None:
            self.status = COMPLETED
            self._result = value
            self._emit(self.settings.result_topic, self.thread_id, value)
            self._notify_parent(value=value)
            return
        self.status = FAILED
        message = str(error)[:10_000]  # an error text must not be refused by Kafka
        trace = observe.workflow_traceback(error)
        self._result = text = dumps(message)
        self._error = (message, trace)
        self._emit(self.settings.error_topic, self.thread_id, text,
                   (("kwf-error-type", type(error).__qualname__), ("kwf-traceback", trace)))
        self._notify_parent(error=str(error)[:10_000])
        log.info("workflow_failed", thread=self.thread_id, workflow=self.workflow.name,
                 step=self.step, error=message, error_type=type(error).__qualname__,
                 traceback=trace)

    # -- what workflow code calls ----------------------------------------------------------
    def _auto_id(self) -> str:
        """The next deterministic id of this step, skipping any a named suspend holds."""
        self._n += 1
        id = f"{self._origin}:{self._n}"
        while id in self.pending and not self.pending[id].done():
            self._n += 1
            id = f"{self._origin}:{self._n}"
        return id

    def suspend(self, id: str | None) -> Suspend:
        if id is None:
            self._n += 1  # ``_auto_id()``, inline for the common case: the id is free
            id = f"{self._origin}:{self._n}"
            if id in self.pending:
                self._n -= 1
                id = self._auto_id()
        else:
            previous = self.pending.get(id)
            if previous is not None and not previous.done():
                msg = (f"thread {self.thread_id!r} step {self.step}: suspend id {id!r} is still "
                       "pending; await or cancel it before suspending on it again")
                raise ValueError(msg)
        future = self.loop.create_future()
        self.pending[id] = future
        return Suspend(id, future)

    def continue_as_new(self, arg: Any, workflow: str | None) -> None:
        """Check and keep the new run's start; the caller raises ``ContinueAsNew``."""
        try:
            text = dumps(arg)
        except (TypeError, ValueError, RecursionError) as e:
            msg = f"kwf.continue_as_new: the argument is not JSON ({e}); pass the state as JSON"
            raise TypeError(msg) from None
        if len(text) > self.settings.max_payload_bytes:
            msg = (f"kwf.continue_as_new: the argument is {len(text)} bytes of JSON, over "
                   "KWF_MAX_PAYLOAD_BYTES; carry a reference to the data instead")
            raise ValueError(msg)
        if workflow is not None:
            check_name(workflow)
        if self.continued is None:
            self.continued = (json.loads(text), workflow)

    def _notify_parent(self, *, value: str | None = None, error: str | None = None) -> None:
        """A child that ends sends its result, or why it did not complete, to its parent's ref."""
        link = self.journal.parent
        if link is None or link[1] is None:
            return
        parent, ref = link
        if error is None:
            text = f'{{"ref":{dumps(ref)},"value":{value}}}'
        else:
            text = dumps({"ref": ref, "error": {
                "child": self.thread_id, "workflow": self.workflow.name, "status": self.status,
                "error": error}})
        self._emit(self.settings.resume_topic, parent, text)

    def start_child(self, name: str, arg: Any, id: str | None, awaited: bool) -> tuple[str, Suspend | None]:
        """Write a ``child:`` start; the child's id and, if awaited, the suspend for its end."""
        try:
            dumps(arg)
        except (TypeError, ValueError, RecursionError) as e:
            msg = f"kwf.child({name!r}): the argument is not JSON ({e})"
            raise TypeError(msg) from None
        check_name(name)
        if id is not None and not (isinstance(id, str) and id):
            msg = f"kwf.child({name!r}): id must be a non-empty string, got {id!r}"
            raise ValueError(msg)
        ref = self.suspend(None) if awaited else None
        child_id = id or f"{self.thread_id}/{ref.id if ref is not None else self._auto_id()}"
        value = child_value(name, arg, self.thread_id, ref.id if ref is not None else None)
        size = len(value.encode()) + len(child_id.encode())
        if size > self.settings.max_payload_bytes or len(child_id.encode()) > MAX_KEY_BYTES:
            if ref is not None:
                ref._future.cancel()
            msg = (f"kwf.child({name!r}): the start record is {size} bytes (or the id is over "
                   f"{MAX_KEY_BYTES} bytes), over KWF_MAX_PAYLOAD_BYTES; pass a reference")
            raise ValueError(msg)
        self._emit(self.settings.resume_topic, child_id, value)
        if ref is not None:
            if self.children is None:
                self.children = {}
            self.children[ref.id] = child_id
        return child_id, ref

    def cancel_child(self, child_id: str) -> None:
        """Cancel a child: ``cancel:`` to its thread (its compensations run there)."""
        self._emit(self.settings.resume_topic, child_id, "cancel:")

    def journal_length(self) -> int:
        """Events this run has applied so far: the journal's length at this point of its history."""
        return self.step - self.journal.base_step

    def patched(self, patch_id: str) -> bool:
        """True where the thread ran patch-aware code: live always (a marker is recorded), on
        replay where the journal's marker is at or before this step."""
        markers = self._markers
        step = self.journal.patches.get(patch_id, markers.get(patch_id) if markers else None)
        if step is not None:
            return step <= self.step
        if self.replaying:
            return False
        if markers is None:
            markers = self._markers = {}
        markers[patch_id] = self.step
        return True

    def deprecate_patch(self, patch_id: str) -> None:
        """The code assumes the patch: a replay that reaches here without its marker diverges."""
        if self.patched(patch_id) or self._problem is not None:
            return
        self._problem = (f"kwf.deprecate_patch({patch_id!r}) was reached, but this thread took "
                         f"the old path at step {self.step} (its journal has no {patch_id!r} "
                         f"marker there); keep kwf.patched({patch_id!r}) and its old branch until "
                         "no such thread is live")

    def output(self, value: str | None, topic: str, key: str | None,
               headers: Iterable[tuple[str, str]] | None) -> None:
        if self.disposed:
            log.debug("output_dropped_after_disposal", thread=self.thread_id, topic=topic)
            return
        if topic not in config.output_topics:
            msg = (f"kwf.output to {topic!r} from thread {self.thread_id!r}: the topic is not "
                   f"declared; add it with kwf.config.output_topics |= {{{topic!r}}}")
            raise ValueError(msg)
        if value is not None and not isinstance(value, str):
            msg = (f"kwf.output value must be str or None, got {type(value).__name__}; "
                   "use kwf.output_json for other values")
            raise TypeError(msg)
        extra = tuple(headers) if headers else ()
        if not (key is None or isinstance(key, str)) or extra and not all(
                isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], str)
                and isinstance(h[1], (str, bytes)) for h in extra):
            msg = "kwf.output key must be str or None, headers (str, str | bytes) pairs"
            raise TypeError(msg)
        # Refused here, the workflow fails; refused by Kafka, the engine would stop, restart,
        # and be refused again. (encode() raises UnicodeEncodeError, a ValueError, on what
        # UTF-8 cannot carry, such as lone surrogates, which are never ASCII.)
        size = 0 if value is None else len(value) if value.isascii() else len(value.encode())
        if key is not None:
            size += len(key) if key.isascii() else len(key.encode())
        for name, data in extra:
            size += len(name.encode()) + len(data.encode() if isinstance(data, str) else data)
        if size > self.settings.max_payload_bytes:
            msg = (f"kwf.output of {size} bytes to {topic!r} is over the limit of "
                   f"{self.settings.max_payload_bytes} (KWF_MAX_PAYLOAD_BYTES); send a reference "
                   "to the data instead")
            raise ValueError(msg)
        self._emit(topic, self.thread_id if key is None else key, value, extra)

    def _emit(self, topic: str, key: str, value: str | None,
              extra: tuple[tuple[str, str], ...] = (), checked: str | None = None) -> None:
        """Output a record; the journal's check covers topic, key and value (or ``checked``,
        the value without what may differ on replay), never headers."""
        self.seq += 1
        self._count += 1
        text = value if checked is None else checked
        self._crc = zlib.crc32(f"{topic}\0{key}\0{text!r}".encode(), self._crc)
        if self.replaying:
            self._topics.append(topic)
        else:
            self._out.append(output_record(topic, key, value, thread=self.thread_id,
                                           seq=self.seq, step=self.step,
                                           time=self.loop.time(), extra=extra))

    def _status_json(self, timers: tuple[float, ...], error: str | None = None,
                     trace: str | None = None) -> str:
        running = self.status == RUNNING
        if error is None and self.journal.parent is None and not (self.children and running):
            text = status_json(self.thread_id, self.workflow.name, self.status, self.step,
                               self.pending if running else (), timers, self.loop.time())
            if text is not None:
                return text
        status: dict[str, Any] = {
            "thread": self.thread_id, "workflow": self.workflow.name, "status": self.status,
            "step": self.step, "pending": list(self.pending) if self.status == RUNNING else [],
            "timers": list(timers), "updated": self.loop.time(),
        }
        if error is not None:
            status["error"] = error
        if trace is not None:
            status["traceback"] = trace
        if self.journal.parent is not None:  # only then: other threads' records are unchanged
            status["parent"] = {"thread": self.journal.parent[0], "ref": self.journal.parent[1]}
        if self.children and self.status == RUNNING:
            status["children"] = dict(self.children)
        return dumps(status, flat=True)

    # -- replay checks ---------------------------------------------------------------------
    def _verify(self, recorded: Check, what: str) -> None:
        if self._problem is not None:
            self._diverged(self._problem)
        if self._check() == recorded:
            return
        count, _, pending = recorded
        self._diverged(
            f"after {what} the journal recorded {count} outputs and pending {list(pending)}; "
            f"the code now made {self._count} outputs (to {self._topics}) and pending "
            f"{list(self.pending)}")

    def _diverged(self, what: str) -> None:
        was, now = self.journal.fingerprint, self.workflow.fingerprint
        why = (f"the code changed since the thread started (fingerprint {was} -> {now})"
               if was != now else "the code behaves differently on replay: does it read the "
               "wall clock, global random state or I/O instead of kwf.now()/kwf.random()?")
        msg = (f"thread {self.thread_id!r} step {self.step}: replay of {self.workflow.location} "
               f"diverged: {what}; {why}")
        raise NonDeterminismError(msg, self.step)

    # -- disposal --------------------------------------------------------------------------
    def _close_tasks(self) -> None:
        """Close every unfinished coroutine now, newest first, with outputs dropped.

        A ``finally`` (or a ``TaskGroup`` exit) may await: ``GeneratorExit`` is thrown again
        at each new await until the frame is gone. A coroutine that still will not end is
        kept for ever in ``_UNCLOSABLE`` rather than left to the garbage collector; disposal
        never raises, since it may run inside another thread's step (LRU eviction).
        """
        unfinished = [task for task in reversed(self.loop.tasks) if not task.done()]
        if unfinished:  # else (a thread that ended) there is nothing to run the loop for
            dropping, self.disposed = self.disposed, True
            with self.loop.running():
                for task in unfinished:
                    if not task.done():  # closing one may have ended another
                        task._log_destroy_pending = False  # type: ignore[attr-defined]
                        self._close(task.get_coro())
            self.disposed = dropping
        self.loop.tasks = []

    def _close(self, coro: Any) -> None:
        for _ in range(_CLOSE_ATTEMPTS):
            if getattr(coro, "cr_frame", None) is None:
                return
            try:
                coro.throw(GeneratorExit)
            except (GeneratorExit, StopIteration):
                return
            except BaseException as e:  # a finally that raises: it ended all the same
                log.warning("workflow_close_error", thread=self.thread_id, error=repr(e))
                return
        log.error("workflow_close_refused", thread=self.thread_id, coroutine=repr(coro),
                  attempts=_CLOSE_ATTEMPTS)
        _UNCLOSABLE.append(coro)

    def dispose(self) -> None:
        """Close the coroutines now, so no ``finally`` runs later under another thread."""
        if self.disposed:
            return
        self._close_tasks()
        self.disposed = True
        self.pending.clear()
        self.loop.close()
        _UNDISPOSED.discard(self)


def _fresh(value: Any) -> Any:
    """A copy of a JSON value (dicts and lists are the only mutable parts), cheaply."""
    if type(value) is dict:
        return {k: _fresh(v) for k, v in value.items()}
    if type(value) is list:
        return [_fresh(v) for v in value]
    return value


def _describe(event: Event) -> str:
    kind, time, ref, _, _ = event
    return f"{kind} {ref!r} at {time}" if ref is not None else f"{kind} at {time}"
