"""Run workflows in-process, without Kafka: for unit tests, debuggers and notebooks.

``Engine`` applies records exactly as the dataflow does (the same ``protocol.parse``, the
same ``ThreadState`` and the same timer wheel), on a virtual clock, and loops records written
to ``workflow-resume`` and ``workflow-scheduler`` back into itself, as Kafka would. It numbers
the records it reads as Kafka would with one partition per topic: each topic's records take
offsets 0, 1, 2, ... in the order they are read, so suspend ids (``<offset>:<n>``) are those
the engine would make. Timers fire as the dataflow fires them, through ``timer:<due>`` records
on ``workflow-resume`` (see ``kwf.wheel``), numbered apart (partition 1) so that they do not
shift the offsets of the records a test sends; ``outputs()`` leaves them out, being kwf's own
plumbing. ``run_flow`` runs the real Bytewax dataflow over a list of records.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from kwf.config import Settings
from kwf.history import History, replay
from kwf.journal import CONTINUED, Journal
from kwf.protocol import Incoming, ProtocolError, Record, Schedule, dead_letter, dumps, parse
from kwf.registry import Registry, Workflow, WorkflowFn
from kwf.thread import Context, ScheduleState, ThreadState
from kwf.wheel import WheelState

if TYPE_CHECKING:
    from kwf._timeline import Timeline

__all__ = ["Engine", "Record", "run_flow"]

Handler = Callable[[Record], Any]


class Engine:
    """An in-process kwf engine with a virtual clock.

    >>> import kwf
    >>> @kwf.workflow("doc-nap")
    ... async def nap(arg):
    ...     import asyncio
    ...     await asyncio.sleep(arg["s"])
    ...     return "rested"
    >>> eng = Engine(workflows=[nap])
    >>> _ = eng.send("t1", 'new:{"s": 60}')
    >>> eng.status("t1")["timers"]
    [60.0]
    >>> _ = eng.advance(60)
    >>> eng.result("t1")
    'rested'

    Args:
        workflows: the workflows to serve (decorated functions); all registered ones if None.
        default: the workflow plain ``new:<json>`` starts (the only one if there is one).
        settings: topic names and limits; ``Settings()`` defaults if None.
        max_live: live instances kept; 0 rebuilds every thread by replay before each event.
        start_time: the virtual clock's start, in seconds since the epoch.
    """

    def __init__(self, workflows: Iterable[Workflow | WorkflowFn] | None = None,
                 default: str | None = None, *, settings: Settings | None = None,
                 max_live: int | None = None, start_time: float = 0.0) -> None:
        settings = settings or Settings()
        if max_live is not None:
            settings = replace(settings, max_live=max_live)
        self.settings = settings
        self.registry = Registry(workflows, default or settings.default_workflow)
        self.ctx = Context(self.registry, settings)
        self.clock = start_time
        self.threads: dict[str, ThreadState] = {}
        self.schedules: dict[str, ScheduleState] = {}
        self.wheel = WheelState("engine")  # one slot: no Bytewax here to scan keys
        self._outputs: list[Record] = []
        self._queue: deque[Incoming] = deque()
        self._handlers: dict[str, Handler] = {}
        self._inputs: list[Incoming] = []
        self._offsets: dict[str, itertools.count[int]] = {}
        self._finished: dict[str, Journal] = {}
        self._firings = itertools.count()

    # -- input ---------------------------------------------------------------------------
    def send(self, key: str | bytes | None, value: str | bytes | None, *,
             topic: str | None = None, timestamp: float | None = None) -> list[Record]:
        """Apply one record (the wire protocol, verbatim) and what it loops back; return the outputs.

        A ``timestamp`` ahead of the clock first advances the clock to it (due timers fire);
        without one, the record carries the current virtual time.
        """
        start = len(self._outputs)
        if timestamp is not None and timestamp > self.clock:
            self.advance_to(timestamp)
        self._enqueue(topic or self.settings.resume_topic, key, value,
                      self.clock if timestamp is None else timestamp)
        self._drain()
        return self._outputs[start:]

    def advance(self, seconds: float) -> list[Record]:
        """Move the virtual clock forward; due timers fire in time order. Returns the outputs."""
        return self.advance_to(self.clock + seconds)

    def advance_to(self, time: float) -> list[Record]:
        """Move the virtual clock to ``time`` (never backwards), firing due timers in order."""
        start = len(self._outputs)
        for thread in self.threads.values():  # threads restored from a journal by hand
            if (arm := thread.arm()) is not None:
                self.wheel.on_arm(arm)
        while True:
            due = min((t for t in self._wakeups() if t <= time), default=None)
            if due is None:
                break
            self.clock = max(self.clock, due)
            for key, state in list(self.schedules.items()):
                if (t := state.wakeup()) is not None and t <= due:
                    self._collect(state.on_timer(due, self.settings.resume_topic))
                    if not state.entries:
                        del self.schedules[key]
            for rec in self.wheel.on_timer(due, self.settings.resume_topic):
                # Numbered apart (partition 1), so that the offsets of the records a test
                # sends do not depend on how many timers fired in between.
                self._queue.append(Incoming(rec.topic, rec.key, rec.value, rec.timestamp,
                                            1, next(self._firings)))
            self._drain()
        self.clock = max(self.clock, time)
        return self._outputs[start:]

    def handle(self, topic: str, fn: Handler) -> None:
        """Answer every record written to ``topic`` with ``fn(record)``, as a service would.

        ``fn`` returns a full resume (``{"ref": ..., "value": ...}`` or ``"error"``), a plain
        value that resumes the ref the record names (its JSON ``"ref"``, else the record's
        value itself), or None for no answer. The answer goes to the thread that wrote the
        record, at the current virtual time.
        """
        self._handlers[topic] = fn

    # -- inspection ----------------------------------------------------------------------
    def outputs(self, topic: str | None = None) -> list[Record]:
        """Every record written so far, in order; only those of ``topic`` if given."""
        if topic is None:
            return list(self._outputs)
        return [r for r in self._outputs if r.topic == topic]

    def inputs(self, topic: str | None = None) -> list[Incoming]:
        """Every record read so far (sent, looped back, answered by a handler), in order, with
        the ``offset`` it got; only those of ``topic`` if given.

        >>> eng = Engine(workflows=[])
        >>> _ = eng.send("t1", "cancel:")
        >>> eng.inputs()[-1].offset, eng.inputs()[-1].source
        (0, 'workflow-resume/0/0')
        """
        if topic is None:
            return list(self._inputs)
        return [r for r in self._inputs if r.topic == topic]

    def status(self, key: str) -> dict[str, Any] | None:
        """The thread's latest ``workflow-events`` record, parsed (None if there is none)."""
        for rec in reversed(self._outputs):
            if rec.topic == self.settings.events_topic and rec.key == key:
                return rec.json()  # type: ignore[no-any-return]
        return None

    def result(self, key: str) -> Any:
        """The thread's latest ``workflow-result`` value, parsed; ``LookupError`` if none."""
        for rec in reversed(self._outputs):
            if rec.topic == self.settings.result_topic and rec.key == key:
                return rec.json()
        msg = f"thread {key!r} has no result; its status is {self.status(key)}"
        raise LookupError(msg)

    def error(self, key: str) -> str | None:
        """Why the thread failed, as Python prints it: the traceback of the workflow's frames
        (kwf's own left out) ending with the exception; None unless its latest status is
        ``failed``. The same text is the ``kwf-traceback`` header of its ``workflow-error``
        record and the ``traceback`` of its status record.
        """
        status = self.status(key)
        if status is None or status.get("status") != "failed":
            return None
        for rec in reversed(self._outputs):
            if rec.topic == self.settings.error_topic and rec.key == key:
                return rec.header("kwf-traceback") or f"{rec.header('kwf-error-type')}: {rec.json()}"
        return None

    def journal(self, key: str) -> Journal | None:
        """The thread's durable state, as a snapshot would hold it."""
        state = self.threads.get(key)
        return state.journal if state else None

    def history(self, key: str) -> History:
        """The thread's steps, replayed from its journal, with the outputs of each step.

        A finished thread's journal is a tombstone; the Engine keeps the full journal it had
        when it finished, so its history is whole here (the dataflow's store keeps only the
        tombstone). ``LookupError`` if the thread never ran.
        """
        journal = self.journal(key)
        if journal is None or journal.finished:
            journal = self._finished.get(key, journal)
        if journal is None:
            msg = f"no thread {key!r} in this Engine"
            raise LookupError(msg)
        return replay(journal, self.registry.workflows.get(journal.workflow), self.settings)

    def timeline(self, key: str) -> Timeline:
        """A picture of the thread's life (SVG); Jupyter shows it inline. See ``history``."""
        from kwf._timeline import Timeline

        return Timeline(self.history(key), self.settings)

    def evict(self) -> None:
        """Drop every live instance: the next event of each thread rebuilds it by replay."""
        for state in self.threads.values():
            state.evict()

    def close(self) -> None:
        """Dispose of every live instance now (their coroutines are closed, outputs dropped)."""
        self.evict()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - at interpreter exit, modules may be half torn down
            pass

    # -- the loop ------------------------------------------------------------------------
    def _wakeups(self) -> Iterable[float]:
        states: list[ScheduleState | WheelState] = [*self.schedules.values(), self.wheel]
        for state in states:
            t = state.wakeup()
            if t is not None:
                yield t

    def _enqueue(self, topic: str, key: str | bytes | None, value: str | bytes | None,
                 timestamp: float) -> None:
        offsets = self._offsets.get(topic)
        if offsets is None:
            offsets = self._offsets[topic] = itertools.count()
        self._queue.append(Incoming(topic, key, value, float(timestamp), 0, next(offsets)))

    def _drain(self) -> None:
        while self._queue:
            rec = self._queue.popleft()
            self._inputs.append(rec)
            try:
                key, command = parse(rec, self.settings, self.registry)
            except ProtocolError as e:
                self._collect([dead_letter(rec, self.settings.dlq_topic, str(e))])
                continue
            if isinstance(command, Schedule):
                state = self.schedules.setdefault(key, ScheduleState(key))
                state.on_schedule(command)
                if not state.entries:
                    del self.schedules[key]
                continue
            thread = self.threads.get(key)
            if thread is None:
                thread = self.threads[key] = _KeepingThread(key, self.ctx, self._finished)
            self._collect(thread.on_command(rec, command))
            if (arm := thread.arm()) is not None:
                self.wheel.on_arm(arm)
            if thread.journal is None:
                del self.threads[key]

    def _collect(self, records: Sequence[Record]) -> None:
        s = self.settings
        for rec in records:
            self._outputs.append(rec)
            if rec.topic in (s.resume_topic, s.scheduler_topic):
                self._enqueue(rec.topic, rec.key, rec.value, rec.timestamp)
            handler = self._handlers.get(rec.topic)
            if handler is not None:
                self._reply(rec, handler(rec))

    def _reply(self, rec: Record, answer: Any) -> None:
        if answer is None:
            return
        if not (isinstance(answer, dict) and "ref" in answer):
            try:
                sent = rec.json()
            except ValueError:
                sent = rec.value
            ref = sent["ref"] if isinstance(sent, dict) and "ref" in sent else rec.value
            answer = {"ref": ref, "value": answer}
        self._enqueue(self.settings.resume_topic, rec.header("kwf-thread") or rec.key,
                      dumps(answer), self.clock)


class _KeepingThread(ThreadState):
    """A thread that keeps a copy of its whole journal when it finishes, for ``history``."""

    def __init__(self, key: str, ctx: Context, finished: dict[str, Journal]) -> None:
        super().__init__(key, ctx)
        self._kept = finished

    def _stepped(self, out: list[Record], chain: int = 0) -> None:
        j = self.journal
        if j is not None and j.finished and j.status != CONTINUED:
            self._kept[self.key] = replace(j, events=list(j.events), checks=list(j.checks))
        super()._stepped(out, chain)


def run_flow(records: Sequence[tuple[str, str | bytes | None, str | bytes | None]
                               | tuple[str, str | bytes | None, str | bytes | None, float]],
             **kwargs: Any) -> list[Record]:
    """Run the real Bytewax dataflow in-process over ``(topic, key, value[, timestamp])`` records.

    Outputs are not fed back (there is no Kafka in between). See ``kwf.engine.flow.run_flow``.
    """
    from kwf.engine.flow import run_flow as _run_flow  # bytewax only when asked for

    return _run_flow(records, **kwargs)
