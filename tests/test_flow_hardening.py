"""Hardening of the dataflow and Kafka side, found by review: each test failed when written
(unless its docstring calls it a guard), and says what went wrong before the fix."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.testing import TestingSink, run_main
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

import kwf
from kwf._testing_source import ListSource
from kwf.config import Settings
from kwf.engine.flow import build_flow, run_flow
from kwf.engine.admin import create_topics
from kwf.instance import Instance
from kwf.journal import Journal
from kwf.protocol import Incoming, Record, Resume, parse_command
from kwf.registry import Registry
from kwf.service import ServiceRunner
from kwf.testing import Engine
from kwf.thread import Context, ThreadState

REPO = Path(__file__).resolve().parent.parent


@kwf.workflow("review-echo")
async def echo(arg: Any) -> Any:
    return arg


@kwf.workflow("review-wait")
async def wait(arg: Any) -> Any:
    return await kwf.suspend("answer")


@kwf.workflow("review-nap")
async def nap(arg: Any) -> Any:
    await asyncio.sleep(10)
    return await kwf.suspend("answer")


@kwf.workflow("review-deadline")
async def deadline(arg: Any) -> Any:
    try:
        return await asyncio.wait_for(kwf.suspend("answer"), 1.0)
    except TimeoutError:
        return "timed out"


RESUME = "workflow-resume"
FUTURE = 4_000_000_000.0  # 2096: no wall-clock timer fires during a test


def _engine_run(records: list[Any], workflows: list[Any]) -> list[Record]:
    eng = Engine(workflows=workflows)
    for topic, key, value, ts in records:
        eng.send(key, value, topic=topic, timestamp=ts)
    return eng.outputs()


def _settings(brokers: str, prefix: str) -> Settings:
    return Settings(brokers=brokers, **{f"{n}_topic": f"{prefix}-{n}" for n in
                                        ("resume", "scheduler", "result", "error", "events", "dlq")})


def _read_all(brokers: str, topic: str, timeout: float = 10.0) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "review",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.5):
                if msg.error() is None:
                    got.append(msg)
            if got:
                deadline = min(deadline, time.monotonic() + 1.0)
    finally:
        consumer.close()
    return got


# -- poison pills: a dead-lettered / accepted record the sink cannot write ---------------------------

@pytest.mark.kafka
def test_too_large_record_is_dead_lettered_without_stopping_the_engine(kafka_brokers, unique):
    """README: larger input values are dead-lettered (``too-large``) and bad input never stops
    the engine. An input of KWF_MAX_PAYLOAD_BYTES + 1 bytes is accepted by the broker (its limit
    is ~1 MiB), but its dead-letter copy (same value, plus headers) is over librdkafka's default
    message.max.bytes (1,000,000): the sink raises DeliveryError, and since the record is replayed
    after each restart, the engine crash-loops on it."""
    s = _settings(kafka_brokers, unique("rv-big"))
    create_topics({"bootstrap.servers": kafka_brokers}, s.engine_topics, 1, 1)
    records = [(s.resume_topic, "t1", b"x" * (s.max_payload_bytes + 1))]
    flow = build_flow(s, Registry([echo]), source=ListSource(records))
    run_main(flow)  # raises DeliveryError ("Message size too large") today
    dlq = _read_all(kafka_brokers, s.dlq_topic)
    assert [m.key() for m in dlq] == [b"t1"]


@pytest.mark.kafka
def test_a_long_thread_id_does_not_stop_the_engine(kafka_brokers, unique):
    """Keys are not bounded (KWF_MAX_PAYLOAD_BYTES counts the value only). A 400 KB thread id is
    a valid 400 KB Kafka record, but the thread's workflow-events record carries it three times
    (key, kwf-thread header, "thread" in the JSON): 1.2 MB, refused -> DeliveryError -> crash loop.
    Expected: such a key is dead-lettered (bad-key) like any other bad input."""
    s = _settings(kafka_brokers, unique("rv-key"))
    create_topics({"bootstrap.servers": kafka_brokers}, s.engine_topics, 1, 1)
    records = [(s.resume_topic, "k" * 400_000, "new:review-echo:1")]
    flow = build_flow(s, Registry([echo]), source=ListSource(records))
    run_main(flow)  # raises DeliveryError today


# -- the built-in scheduler and the input clock ----------------------------------------------------

class _Part(StatefulSourcePartition[Incoming, None]):
    def __init__(self, items: list[Any], clock: Any) -> None:
        self.items, self.i, self.awake, self.clock = items, 0, None, clock

    def next_batch(self) -> list[Incoming]:
        if self.i >= len(self.items):
            raise StopIteration
        item = self.items[self.i]
        if isinstance(item, float):  # a pause, in seconds
            now = datetime.now(UTC)
            if self.awake is None:
                self.awake = now + timedelta(seconds=item)
            elif now >= self.awake:
                self.awake, self.i = None, self.i + 1
            return []
        self.i += 1
        if all(isinstance(x, float) for x in self.items[self.i:]):
            self.clock.reached("p", float("inf"))  # the whole partition (all of it in Kafka) read
        topic, key, value, ts = item
        return [Incoming(topic, key, value, ts, 0, self.i)]

    def next_awake(self) -> datetime | None:
        return self.awake

    def snapshot(self) -> None:
        return None


class _PausingSource(FixedPartitionedSource[Incoming, None]):
    """Records with pauses (floats) between them: a partition that is behind, not idle. All its
    records are in Kafka from the start: it reaches the input clock once all are read."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.clock: Any = None

    def bind_clock(self, clock: Any) -> None:
        self.clock = clock
        clock.expect(["p"])

    def list_parts(self) -> list[str]:
        return ["p"]

    def build_part(self, step_id: str, for_part: str, resume: None) -> _Part:
        return _Part(self.items, self.clock)


def test_scheduler_entry_waits_for_a_cancel_already_in_its_partition():
    """InputClock: a timer due at t fires once *every* input partition, the scheduler's too, has
    been read past what it held at t. A workflow-scheduler partition that is behind (its cancel,
    stamped before the due time, is next in line) holds the entry back: the cancel is applied
    first and nothing is written, as ``kwf.testing.Engine`` does. (The old quiet-time clock was
    fed only by thread records and fired the entry.)"""
    t0 = time.time() - 100
    items = [
        ("workflow-resume", "x", '{"ref": "a"}', t0 + 50),  # the resume topic is up to date
        ("workflow-scheduler", "k|v", "1000", t0),          # due at t0 + 1
        0.2,                                                # the scheduler partition lags
        ("workflow-scheduler", "k|v", "0", t0 + 0.5),       # cancelled before it was due
        1.0,
    ]
    out: list[Record] = []
    run_main(build_flow(Settings(), Registry([echo]), source=_PausingSource(items),
                        sink=TestingSink(out)))
    assert [r for r in out if r.topic == "workflow-resume"] == []


# -- internal errors inside a thread step ------------------------------------------------------------

def _thread(workflow: Any) -> ThreadState:
    return ThreadState("t1", Context(Registry([workflow]), Settings()))


def _rec(value: str, t: float) -> Incoming:
    return Incoming(RESUME, "t1", value, t, 0, int(t))


def test_outputs_of_timers_fired_before_an_internal_error_are_not_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``on_command`` first fires the timers due by the record's time (each committed to the
    journal), then applies the record. When applying raised (a bug of ours), the timer step's
    records were dropped with it: kwf-seq had a hole, though the journal had moved on."""
    state = _thread(nap)
    state.on_command(_rec("new:review-nap:1", 0.0), parse_command("new:review-nap:1"))
    real_apply = Instance.apply

    def failing_apply(self: Instance, event: Any) -> Any:
        if event[0] == "resume":
            raise RuntimeError("injected")
        return real_apply(self, event)

    monkeypatch.setattr(Instance, "apply", failing_apply)
    out = state.on_command(_rec('{"ref": "answer", "value": 5}', 20.0), Resume("answer", 5))
    assert [r.topic for r in out] == ["workflow-events", "workflow-dlq"]
    assert out[0].header("kwf-seq") == "2" and state.journal.step == 1
    assert out[1].header("kwf-error").startswith("internal: RuntimeError: injected")


def test_an_internal_error_in_new_leaves_the_running_thread_unchanged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``_start`` replaced the journal before ``Instance.start`` ran; when that raised, the
    running thread was gone and every later record was dead-lettered as internal."""
    state = _thread(wait)
    state.on_command(_rec("new:review-wait:1", 10.0), parse_command("new:review-wait:1"))
    real_start = Instance.start.__func__  # type: ignore[attr-defined]

    def failing_start(cls: Any, workflow: Any, journal: Journal, settings: Any) -> Any:
        if journal.arg == "boom":
            raise RuntimeError("injected")
        return real_start(cls, workflow, journal, settings)

    monkeypatch.setattr(Instance, "start", classmethod(failing_start))
    [dead] = state.on_command(_rec('new:review-wait:"boom"', 11.0),
                              parse_command('new:review-wait:"boom"'))
    assert dead.topic == "workflow-dlq"
    out = state.on_command(_rec('{"ref": "answer", "value": 5}', 12.0), Resume("answer", 5))
    assert [r.value for r in out if r.topic == "workflow-result"] == ["5"]


def test_a_deeply_nested_start_argument_is_dead_lettered() -> None:
    """JSON nested past ``MAX_DEPTH`` is refused at the door: kept in a journal, it made
    pickling recurse too deep at snapshot time, a crash at every restart."""
    deep = "[" * 100 + "]" * 100
    out = run_flow([(RESUME, "t3", "new:review-wait:" + deep, FUTURE),
                    (RESUME, "t4", "new:review-wait:[[1]]", FUTURE)], workflows=[wait])
    dead = [r.header("kwf-error") or "" for r in out if r.topic == "workflow-dlq"]
    assert len(dead) == 1 and dead[0].startswith("bad-json: nested deeper than 64")
    assert any(r.header("kwf-thread") == "t4" for r in out)


# -- kwf run -----------------------------------------------------------------------------------------

def test_kwf_run_finds_workflow_modules_in_the_current_directory(tmp_path: Path):
    """``kwf run`` does ``os.chdir(ROOT)`` before exec'ing ``python -m bytewax.run dataflow``, so
    the engine no longer sees the user's working directory: KWF_WORKFLOWS naming a module there
    (or a relative KWF_KAFKA_PROPERTIES) fails, although ``from_env()`` run from that directory
    imports it. With an unreachable broker the engine must get past the import and then refuse
    to start for the broker."""
    (tmp_path / "review_mine.py").write_text(
        "import kwf\n@kwf.workflow('review-mine')\nasync def mine(arg):\n    return arg\n")
    env = {**os.environ, "KWF_BROKERS": "127.0.0.1:1", "KWF_WORKFLOWS": "review_mine"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-m", "kwf.cli", "run", "--state",
                           str(tmp_path / "state")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert "cannot import the workflow modules" not in done.stderr, done.stderr[-500:]
    assert "unreachable" in done.stderr


# -- demo services -----------------------------------------------------------------------------------

@pytest.mark.kafka
def test_service_runner_survives_a_record_that_is_not_utf8(kafka_brokers, unique):
    """ServiceRunner decodes key and value before filtering with ``accept``; one non-UTF-8 record
    on a request topic (another run's, on a shared broker) raises in the background thread, which
    dies silently: every later request, even of accepted threads, goes unanswered."""
    conf = {"bootstrap.servers": kafka_brokers}
    requests, resume = unique("rv-req"), unique("rv-resume")
    create_topics(conf, [requests, resume], 1, 1)
    runner = ServiceRunner(conf, {requests: lambda rec: {"ref": "answer", "value": "ok"}}, resume,
                           accept=lambda t: t.startswith("mine-")).start()
    try:
        producer = Producer(conf)
        producer.produce(requests, key=b"other-1", value=b"\xff\xfe not utf-8")
        producer.produce(requests, key=b"mine-1", value=b"please",
                         headers=[("kwf-thread", b"mine-1")])
        producer.flush(10)
        deadline = time.monotonic() + 10
        while runner.answered == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runner.answered == 1
    finally:
        runner.stop()


# -- several workers: the input clock ------------------------------------------------------------------
# Thread ids routed to different workers of two (Bytewax routes by a hash of the key; checked).
OWN, OTHERS = "n3", ("n0", "n1", "n2")


def _deadline_items() -> list[Any]:
    """A thread with a 1 s deadline, then a backlog of other threads' records all stamped before
    the deadline (0.2 s apart, so the partition is behind, never idle), then the reply, stamped
    before the deadline too: the deadline was met."""
    t0 = time.time() - 100
    items: list[Any] = [(RESUME, OWN, "new:review-deadline:1", t0)]
    for i in range(6):
        items += [0.2, (RESUME, OTHERS[i % 3], '{"ref": "x"}', t0 + 0.1 * i)]
    return [*items, (RESUME, OWN, '{"ref": "answer", "value": "ok"}', t0 + 0.7), 0.5]


def test_guard_one_worker_a_met_deadline_behind_a_backlog_is_met():
    """Guard (passes): with one worker the InputClock holds the timer until the reply is read."""
    out: list[Record] = []
    run_main(build_flow(Settings(), Registry([deadline]), source=_PausingSource(_deadline_items()),
                        sink=TestingSink(out)))
    assert [r.value for r in out if r.topic == "workflow-result"] == ['"ok"']


def test_two_workers_a_met_deadline_behind_a_backlog_is_met():
    """The InputClock is per process and fed by the source, not by the records a worker's threads
    get: with -w 2 the backlog of other threads' records goes to the other worker, yet the
    deadline waits until the partition is read, and the reply already waiting in it (stamped
    before the deadline) wins. (The old per-worker quiet-time clock fired the deadline: "timed
    out".) Runs last: cluster_main installs a process-wide panic hook."""
    from bytewax.testing import cluster_main

    out: list[Record] = []
    cluster_main(build_flow(Settings(), Registry([deadline]),
                            source=_PausingSource(_deadline_items()), sink=TestingSink(out)),
                 [], 0, worker_count_per_proc=2)
    assert [r.value for r in out if r.topic == "workflow-result"] == ['"ok"']
