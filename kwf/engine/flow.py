"""The Bytewax dataflow: Kafka records in, the per-key core, records out. Adapters only.

What a record means and what a thread does is decided by ``kwf.protocol.parse`` and
``kwf.thread`` (shared with ``kwf.testing.Engine``); this module only wires them into Bytewax:
sources, a parse step that dead-letters what it refuses, one ``op.stateful`` logic per thread
id, per timer wheel slot and per wheel slot of scheduler keys, wall-clock timers through
``notify_at`` (on those slots only), and one sink for every output. Snapshots are our own
bytes (or builtins), never objects pickled by module path, and a restored thread is not
replayed until it has work. Step ids below are part of the recovery format: renaming one
silently drops its state.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, cast

import bytewax.operators as op
import structlog
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.operators import KeyedStream
from bytewax.outputs import FixedPartitionedSink, Sink
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE
from typing_extensions import override

from kwf.config import ENGINE_GC_THRESHOLDS, KafkaSettingsError, Settings
from kwf.engine import logs, metrics
from kwf.engine.clock import InputClock
from kwf.engine.memory import start_trimming
from kwf.engine.wheel import DueLogic, ScheduleSlot, WheelLogic
from kwf.protocol import (
    Command,
    Incoming,
    ProtocolError,
    Record,
    Schedule,
    dead_letter,
    message_max_bytes,
    parse,
)
from kwf.registry import Registry, Workflow, WorkflowFn
from kwf.thread import Context, ThreadState
from kwf.wheel import Arm, slot_of

log = structlog.get_logger("kwf.engine.flow")

# Step ids: recovery state is keyed by them. Never rename.
STEP_RESUME_IN = "workflow-resume"
STEP_SCHEDULER_IN = "workflow-scheduler"
STEP_TEST_IN = "records"
STEP_THREAD = "thread"
STEP_SCHEDULER = "scheduler"
STEP_WHEEL = "wheel"
STEP_OUT = "out"

CHECK_TIMEOUT_S = 5.0
"""How long ``from_env`` waits for the brokers: the engine must refuse to start within 10 s."""


class _Item(NamedTuple):
    """What a stateful step receives: the key, the record (for DLQ headers and the input
    clock), and what it asks (a thread's command, or a scheduler entry)."""

    key: str
    rec: Incoming
    command: Command | Schedule


_Parsed = Record | _Item


def to_incoming(msg: Any) -> Incoming:
    """A Kafka message as an ``Incoming``: timestamp in seconds, source ``topic/partition/offset``."""
    if isinstance(msg, Incoming):
        return msg
    kind, ms = msg.timestamp or (TIMESTAMP_NOT_AVAILABLE, 0)
    stamp = ms / 1000 if kind != TIMESTAMP_NOT_AVAILABLE and ms >= 0 else time.time()
    return Incoming(msg.topic, msg.key, msg.value, stamp, msg.partition, msg.offset)


class _Worker(NamedTuple):
    ctx: Context
    clock: InputClock


class _Workers:
    """One ``Context`` per worker, made on first use, and one ``InputClock`` per process.

    Contexts are keyed by OS thread because a Bytewax worker is one thread: a cache shared by
    two workers could evict (and close) an instance that the other worker is stepping. The
    clock is shared because each worker applies only its own keys' records, while a partition
    is behind for every worker alike (``kwf.engine.clock`` says how partitions that other
    processes read hold timers back too).
    """

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.clock = InputClock()
        self._by_thread: dict[int, _Worker] = {}
        self._lock = threading.Lock()

    def evictions(self) -> int:
        return sum(w.ctx.cache.evictions for w in list(self._by_thread.values()))

    def get(self) -> _Worker:
        ident = threading.get_ident()
        worker = self._by_thread.get(ident)
        if worker is None:
            with self._lock:
                worker = self._by_thread.setdefault(
                    ident, _Worker(Context(self.registry, self.settings), self.clock))
        return worker


_ThreadSnap = tuple[bytes, float | None, bool]
"""A thread's snapshot: its journal's bytes, the wakeup its wheel slot holds (``armed``) and
whether it is a tombstone (for ``kwf_threads`` without decoding it). Older snapshots are the
bytes alone, or the first two."""


class _ThreadLogic(op.StatefulLogic[_Item, Record | Arm, _ThreadSnap]):
    """Bytewax's handle on one ``ThreadState``; every rule lives in ``kwf.thread``.

    It holds no Bytewax wakeup of its own, except once after a restore whose snapshot does not
    match the thread's wakeup (a snapshot from before the wheel): the wheel slots hold every
    timer (``kwf.wheel``), so Bytewax scans a bounded number of keys.

    A restart builds one per thread, so a restored one keeps its snapshot (``held``) and
    decodes it on its first record or timer: most threads of a restart wait for days, and the
    bytes are smaller than the decoded journal. ``armed`` in the snapshot is what the thread's
    slot holds, taken after the thread's last arm, so no wakeup is needed to check it.
    """

    __slots__ = ("ctx", "clock", "state", "held")  # one per thread: no __dict__

    def __init__(self, worker: _Worker, resume: _ThreadSnap | tuple[bytes, float | None]
                 | bytes | None) -> None:
        self.ctx, self.clock = worker
        self.state: ThreadState | None = None
        self.held: _ThreadSnap | None = None
        if isinstance(resume, tuple) and len(resume) == 3:
            self.held = resume
            self.ctx.journals += 1  # counted as ThreadState.restore will count it
            self.ctx.tombstones += resume[2]
            _restored()
        elif resume is not None:  # an older snapshot: decoded now, re-armed by notify_at
            data, armed = resume if isinstance(resume, tuple) else (resume, _UNKNOWN)
            self.state = ThreadState.restore(data, self.ctx)
            self.state.armed = armed

    def _thawed(self) -> ThreadState | None:
        held = self.held
        if held is not None:
            self.held = None
            self.ctx.journals -= 1
            self.ctx.tombstones -= held[2]
            self.state = ThreadState.restore(held[0], self.ctx)
            self.state.armed = held[1]
        return self.state

    def _done(self, records: list[Record | Arm]) -> tuple[list[Record | Arm], bool]:
        state = self.state
        if state is not None and (arm := state.arm()) is not None:
            records.append(arm)
        gone = state is None or state.journal is None
        return records, self.DISCARD if gone else self.RETAIN

    @override
    def on_item(self, value: _Item) -> tuple[list[Record | Arm], bool]:
        state = self._thawed()
        if state is None:
            state = self.state = ThreadState(value.key, self.ctx)
        out = state.on_command(value.rec, value.command)  # type: ignore[arg-type]  # branched
        return self._done(cast("list[Record | Arm]", out))  # no copy: it only grows here

    @override
    def on_notify(self) -> tuple[list[Record | Arm], bool]:
        self._thawed()
        return self._done([])  # restored out of step with its wheel slot: arm now

    @override
    def notify_at(self) -> datetime | None:
        state = self.state
        stale = state is not None and state.armed != state.wakeup()
        return datetime.now(timezone.utc) if stale else None

    @override
    def snapshot(self) -> _ThreadSnap:
        if self.held is not None:
            return self.held
        state = self.state
        data = state.snapshot() if state is not None else None
        if data is None or state is None or state.journal is None:  # discarded instead
            msg = "kwf: snapshot of a thread with no journal; it should have been discarded"
            raise RuntimeError(msg)
        return data, state.armed, state.journal.finished


FREEZE_EVERY = 10_000
"""Restored threads between two ``gc.freeze()``: see ``_restored``."""

_restores = [0]


def _restored() -> None:
    """Count a restored thread; every ``FREEZE_EVERY``, move every object alive to the
    collector's permanent generation. A full collection walks every tracked object: with
    200,000 restored threads, 0.34 s each, several times a minute while records arrive. These
    objects form no cycles, so reference counting still frees them when their thread goes."""
    _restores[0] += 1
    if _restores[0] % FREEZE_EVERY == 0:
        gc.freeze()


_UNKNOWN = float("nan")
"""``armed`` of a thread restored from a snapshot without it: never equal, so it arms again."""


class _ScheduleLogic(DueLogic[_Item, ScheduleSlot]):
    """The ``workflow-scheduler`` keys of one wheel slot (``ScheduleSlot``), fired like a slot."""

    def __init__(self, resume_topic: str, clock: InputClock,
                 resume: tuple[str, dict[str, Any]] | None) -> None:
        state = None
        if resume is not None:
            key, entries = resume
            if any(not isinstance(e, dict) for e in entries.values()):  # one key, before slots
                entries = {key: entries}
            state = ScheduleSlot(key, entries)
        super().__init__(resume_topic, clock, state)

    @override
    def _add(self, state: ScheduleSlot | None, value: _Item) -> ScheduleSlot:
        if state is None:
            state = ScheduleSlot(slot_of(value.key))
        state.on_schedule(value.key, value.command)  # type: ignore[arg-type]  # branched on it
        return state


def _parser(settings: Settings, registry: Registry) -> Any:
    limit = message_max_bytes(settings.kafka_config())  # what the dead-letter write may carry

    def parse_one(msg: Any) -> _Parsed:
        rec = to_incoming(msg)
        try:
            key, what = parse(rec, settings, registry)
        except ProtocolError as e:
            return dead_letter(rec, settings.dlq_topic, str(e), limit)
        except Exception as e:  # a bug of ours: dead-letter the record rather than crash-loop
            log.exception("internal_error", during="parse", source=rec.source)
            return dead_letter(rec, settings.dlq_topic, f"internal: {type(e).__name__}: {e}",
                               limit)
        return _Item(key, rec, what)

    return parse_one


def _is_record(out: tuple[str, Record | Arm]) -> bool:
    """A thread's output is a record to write, or an ``Arm`` for its wheel slot."""
    return isinstance(out[1], Record)


PROBE_S = 0.01
"""How often the input clock asks Kafka for the input's high watermarks (kwf.engine.clock)."""


def kafka_sources(settings: Settings, clock: InputClock) -> dict[str, Source[Any]]:
    """The two Kafka inputs, by step id: ``workflow-resume`` and ``workflow-scheduler``.

    Always from the beginning of a partition the recovery store has no offset for (never the
    end, which skips what arrived while the engine was down), and tailing. Both report to
    ``clock``; one probe per process asks Kafka for their watermarks.
    """
    from kwf.engine.clock import KafkaProbe
    from kwf.engine.source import GROUP, KafkaInput, request_drain

    from kwf.engine._startup import launch_from_argv

    launch = launch_from_argv()
    clock.peers = launch is not None and launch.processes > 1
    config = logs.kafka_client_config(settings)
    probe = KafkaProbe(clock, config, GROUP, PROBE_S, on_drain=request_drain)
    return {
        step: KafkaInput(config, topic, clock, probe, settings.batch_size)
        for step, topic in ((STEP_RESUME_IN, settings.resume_topic),
                            (STEP_SCHEDULER_IN, settings.scheduler_topic))
    }


def build_flow(settings: Settings, registry: Registry | None = None, *,
               source: Source[Any] | None = None, sink: Sink[Any] | None = None,
               trim: bool = False) -> Dataflow:
    """Build the engine's dataflow.

    Args:
        settings: topics, limits, brokers and the live-instance budget (per worker).
        registry: the workflows served; every registered one (and ``settings.default_workflow``)
            if None. Workflow modules must be imported before.
        source: one input of ``Incoming`` records (or Kafka messages) instead of the two Kafka
            topics; for ``run_flow``.
        sink: where every output goes instead of ``KafkaRecordSink``.
        trim: return freed memory to the OS after many evictions (a thread; the engine's
            process only).
    """
    if registry is None:
        registry = Registry(None, settings.default_workflow)
    workers = _Workers(registry, settings)
    if trim:
        start_trimming(workers.evictions)
    flow = Dataflow("kwf")  # the flow id prefixes every recovery key, like the step ids
    if source is not None:
        bind = getattr(source, "bind_clock", None)
        if bind is not None:  # a source that reports its partitions' progress (run_flow's)
            bind(workers.clock)
        raw: Stream[Any] = op.input(STEP_TEST_IN, flow, source)
    else:
        ins = [op.input(step, flow, src)
               for step, src in kafka_sources(settings, workers.clock).items()]
        raw = op.merge("inputs", *ins)
    parsed = op.map("parse", raw, _parser(settings, registry))  # one step: each costs a hop
    bad = op.branch("valid", parsed, lambda p: isinstance(p, Record))
    kind = op.branch("kind", bad.falses, lambda p: isinstance(p.command, Schedule))

    items = op.key_on("by-thread", kind.falses, lambda it: it.key)
    threads = op.stateful(STEP_THREAD, items, lambda resume: _ThreadLogic(workers.get(), resume))
    split = op.branch("thread-out", threads, _is_record)  # one call per output, not three
    records = cast("KeyedStream[Record]", split.trues)  # keyed by thread id
    arms = cast("Stream[Arm]", op.key_rm("arms", split.falses))
    slots = op.key_on("by-slot", arms, lambda arm: slot_of(arm.thread))
    wheel = op.stateful(STEP_WHEEL, slots,
                        lambda resume: WheelLogic(settings.resume_topic, workers.clock, resume))
    schedules = op.key_on("by-scheduler-slot", kind.trues, lambda it: slot_of(it.key))
    fired = op.stateful(STEP_SCHEDULER, schedules,
                        lambda resume: _ScheduleLogic(settings.resume_topic, workers.clock, resume))

    firings = op.key_rm("wheel-records", wheel)
    if sink is None:
        from kwf.engine.sink import KafkaRecordSink

        sink = KafkaRecordSink(logs.kafka_client_config(settings))
    if isinstance(sink, FixedPartitionedSink):  # keyed: a thread's records by its id, in order
        dead = op.key_on("dlq-records", bad.trues, lambda _: STEP_OUT)
        fires = op.key_on("wheel-by-thread", firings, lambda rec: str(rec.key))
        scheduled = op.key_on("scheduler-by-key", op.key_rm("scheduler-out", fired),
                              lambda rec: str(rec.key))
        op.output(STEP_OUT, op.merge("outputs", dead, records, fires, scheduled), sink)
    else:
        outputs = op.merge("outputs", bad.trues, op.key_rm("thread-records-out", records),
                           firings, op.key_rm("scheduler-records", fired))
        op.output(STEP_OUT, outputs, sink)
    return flow


def _configure_process() -> None:
    """What the engine process needs and a library must not impose: one log format on stderr
    (``kwf.engine.logs``), kwf's metrics (``kwf.engine.metrics``), and GC thresholds for many
    long-lived objects."""
    gc.set_threshold(*ENGINE_GC_THRESHOLDS)
    metrics.install()  # served by Bytewax's API server: BYTEWAX_DATAFLOW_API_ENABLED=true
    try:
        logs.configure()
    except ValueError as e:
        raise StartupError(str(e)) from None


def _drain_on_sigterm() -> None:
    """SIGTERM ends the input: Bytewax closes the epoch (snapshot written, outputs confirmed by
    the sink) and returns, and the process exits 0; the next start resumes from the stored
    offsets. Bytewax runs Python signal handlers from its run loop (``PyErr_CheckSignals`` every
    step with one worker, every millisecond on the main thread of a cluster process)."""
    import signal

    from kwf.engine.source import draining, request_drain

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if draining() and callable(previous):  # a second SIGTERM: stop now (kwf.engine.logs)
            previous(signum, frame)
            return
        log.info("engine_draining", signal=signum)
        request_drain()

    signal.signal(signal.SIGTERM, on_sigterm)


class StartupError(RuntimeError):
    """The engine cannot start as configured; the message says what to change."""


def from_env() -> Dataflow:
    """The engine as ``dataflow.py`` runs it: settings from ``KWF_*``, brokers checked first.

    Raises ``StartupError`` for unusable workflow settings, and ``kwf.kafka.KafkaSetupError``
    within ``CHECK_TIMEOUT_S`` when the brokers are unreachable or a topic is missing (Bytewax's
    Kafka source would hang for ever instead).
    """
    from kwf.engine.admin import check_brokers, required_topics
    from kwf.registry import load_modules

    _configure_process()
    try:
        settings = Settings.from_env()
    except (ValueError, TypeError) as e:
        raise StartupError(f"a KWF_* variable does not parse ({e}); see the README's "
                           "settings table") from e
    if settings.kafka_properties is not None and not settings.kafka_properties.is_file():
        raise StartupError(f"KWF_KAFKA_PROPERTIES={settings.kafka_properties} is not a file")
    if not settings.workflows:
        raise StartupError("KWF_WORKFLOWS is not set: name the modules that register your "
                           "workflows (a kwf checkout's examples: KWF_WORKFLOWS=workflows)")
    try:
        settings.kafka_config()
    except KafkaSettingsError as e:  # a TLS file that is not there
        raise StartupError(str(e)) from e
    try:
        load_modules(settings.workflows)
    except Exception as e:  # noqa: BLE001 - any failure of user code at import
        msg = (f"{e} (KWF_WORKFLOWS={','.join(settings.workflows)}); name importable modules, "
               "check PYTHONPATH, and run one with python -c 'import <module>' for the whole "
               "traceback")
        raise StartupError(msg) from e
    try:
        registry = Registry(None, settings.default_workflow)
    except ValueError as e:
        raise StartupError(f"{e}; fix KWF_DEFAULT_WORKFLOW") from e
    if not registry.workflows:
        msg = (f"the modules KWF_WORKFLOWS={','.join(settings.workflows)} register no workflow; "
               "decorate them with @kwf.workflow")
        raise StartupError(msg)
    topics = required_topics(settings)
    check_brokers(logs.kafka_client_config(settings), topics, timeout=CHECK_TIMEOUT_S)
    _drain_on_sigterm()
    log.info("engine_starting", brokers=settings.brokers, workflows=sorted(registry.workflows),
             default=registry.default, topics=topics, batch_size=settings.batch_size,
             max_live=settings.max_live)
    return build_flow(settings, registry, trim=True)


# -- in-process runs -----------------------------------------------------------------------------

_Text = str | bytes | None
RecordTuple = tuple[str, _Text, _Text] | tuple[str, _Text, _Text, float]


def run_flow(records: Sequence[RecordTuple | Any], *, settings: Settings | None = None,
             workflows: Iterable[Workflow | WorkflowFn] | None = None,
             default: str | None = None, recovery_dir: str | Path | None = None,
             epoch_interval: timedelta = timedelta(seconds=10), linger: float = 0.0,
             start_time: float | None = None, batch_size: int = 1) -> list[Record]:
    """Run the real dataflow in-process over ``(topic, key, value[, timestamp])`` records.

    Outputs are returned, not fed back (no Kafka in between): a record to ``workflow-resume``
    or ``workflow-scheduler`` is just an output here, except the timer wheel's firings, which
    loop back as Kafka would loop them (and are not returned, as ``Engine.outputs`` omits them). Timers use the wall clock, as in
    production, and Bytewax never fires a timer still pending when the input ends: give
    ``linger`` seconds to keep the input open after the last record.

    ``bytewax.testing.TestingSource.ABORT()`` items among the records stop the execution there
    (once per object); call again with the same list and ``recovery_dir`` to resume, as after a
    crash. Unlike ``TestingSource``, positions count records only, so sentinels do not shift
    what a resume skips.

    Args:
        records: the input; a record without timestamp gets ``start_time``.
        settings: topic names and limits (``Settings()`` if None).
        workflows, default: as for ``kwf.testing.Engine``.
        recovery_dir: a Bytewax recovery directory (created and initialised with one
            partition if it does not exist yet).
        epoch_interval: how often state is snapshotted, when ``recovery_dir`` is given.
        linger: seconds to keep the input open after the last record, for timers to fire.
        start_time: the default timestamp (seconds since the epoch); now if None.
        batch_size: records per input batch.
    """
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.testing import run_main

    from kwf._testing_source import ListSource, LoopbackSink

    settings = settings or Settings()
    registry = Registry(workflows, default or settings.default_workflow)
    stamp = time.time() if start_time is None else start_time
    out: list[Record] = []
    source = ListSource(records, stamp, linger=linger, batch_size=batch_size)
    flow = build_flow(settings, registry, sink=LoopbackSink(out, source, settings.resume_topic),
                      source=source)
    recovery = None
    if recovery_dir is not None:
        path = Path(recovery_dir)
        if not (path / "part-0.sqlite3").exists():
            path.mkdir(parents=True, exist_ok=True)
            init_db_dir(path, 1)  # type: ignore[no-untyped-call]  # bytewax ships no annotations
        recovery = RecoveryConfig(str(path))  # type: ignore[no-untyped-call]  # idem
    run_main(flow, epoch_interval=epoch_interval,  # type: ignore[no-untyped-call]  # idem
             recovery_config=recovery)
    return out
