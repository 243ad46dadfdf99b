"""The example workflows end to end: a real broker, the engine as a subprocess, the demo services.

The engine runs as in production (``python -m bytewax.run dataflow -r DIR -s 1 -b 0``) with
its own topic names (``KWF_*_TOPIC``), so runs and tests never share engine topics. The
workflows' own topics (``saga-reserve-car``, ``getCart``...) are fixed by the workflow code and
shared, so everything read from them is filtered by this run's thread ids, and the services
skip other runs' threads. Each scenario also runs in ``kwf.testing.Engine`` with the same
services, and both must write the same records (order across topics aside).
"""

from __future__ import annotations

import re

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from kwf.config import Settings
from kwf.protocol import Record
from kwf.service import Handler, ServiceRunner, assign_at_end
from kwf.testing import Engine
from workflows import ecommerce, trip_booking
from workflows._services import OK, SILENT, Behaviour, Services, thread_of

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("completed", "failed", "cancelled")
WAIT_S = 90.0


def settings_env(settings: Settings) -> dict[str, str]:
    """``KWF_*`` variables that make ``Settings.from_env()`` equal ``settings``."""
    env = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            env[f"KWF_{f.name.upper()}"] = str(value)
    env["KWF_WORKFLOWS"] = ",".join(settings.workflows)
    return env


@dataclass
class KafkaEngine:
    """The engine subprocess, its settings and its log."""

    settings: Settings
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            pytest.fail(f"the engine exited with {self.process.returncode}:\n{tail}")


@pytest.fixture(scope="module")
def kafka_engine(kafka_brokers: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[KafkaEngine]:
    """One engine for this module, on topics of its own."""
    from bytewax.recovery import init_db_dir

    from kwf.engine.admin import ensure_topics

    run = uuid.uuid4().hex[:8]
    settings = Settings(
        brokers=kafka_brokers, resume_topic=f"ex-resume-{run}",
        scheduler_topic=f"ex-scheduler-{run}", result_topic=f"ex-result-{run}",
        error_topic=f"ex-error-{run}", events_topic=f"ex-events-{run}",
        dlq_topic=f"ex-dlq-{run}", partitions=2, workflows=("workflows",))
    ensure_topics(settings)
    assert (ROOT / "dataflow.py").exists(), "dataflow.py (the engine's entry point) is missing"
    tmp = tmp_path_factory.mktemp("engine")
    recovery = tmp / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    log = tmp / "engine.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "dataflow", "-r", str(recovery),
             "-s", "1", "-b", "0"],
            cwd=ROOT, env={**os.environ, **settings_env(settings)}, stdout=out,
            stderr=subprocess.STDOUT)
    engine = KafkaEngine(settings, process, log)
    yield engine
    process.send_signal(signal.SIGINT)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Collector:
    """Records written to ``topics`` from now on by threads with ids starting with ``prefix``."""

    def __init__(self, settings: Settings, topics: list[str], prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.records: list[Record] = []
        self.consumer = Consumer({**settings.kafka_config(), "group.id": "kwf-test",
                                  "enable.auto.commit": False})
        assign_at_end(self.consumer, topics)

    def poll(self) -> None:
        for msg in self.consumer.consume(500, timeout=0.2):
            key = msg.key().decode() if msg.key() else ""
            if msg.error() is None and key.startswith(self.prefix):
                value = msg.value().decode() if msg.value() is not None else None
                self.records.append(Record(msg.topic(), key, value, tuple(msg.headers() or ())))

    def wait_final(self, engine: KafkaEngine, threads: list[str]) -> None:
        """Poll until every thread's status is final; fail with what is missing."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            self.poll()
            if all(self.status(t) in FINAL for t in threads):
                end = time.monotonic() + 1.0  # results and errors may trail on other topics
                while time.monotonic() < end:
                    self.poll()
                return
            engine.check_alive()
        missing = {t: self.status(t) for t in threads if self.status(t) not in FINAL}
        pytest.fail(f"threads not finished within {WAIT_S} s: {missing}")

    def status(self, thread: str) -> str | None:
        events = [r for r in self.records
                  if r.topic == self.settings.events_topic and r.key == thread and r.value]
        return json.loads(events[-1].value)["status"] if events else None

    def close(self) -> None:
        self.consumer.close()


def send(settings: Settings, messages: list[tuple[str, str]]) -> dict[str, int]:
    """Produce the records; return the offset of each key's first record (its ``new:``)."""
    producer = Producer(settings.kafka_config())
    offsets: dict[str, int] = {}

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        offsets.setdefault(msg.key().decode(), msg.offset())

    for key, value in messages:
        producer.produce(settings.resume_topic, key=key.encode(), value=value.encode(),
                         on_delivery=delivered)
    producer.flush(30)
    return offsets


def compact(value: Any) -> str:
    """JSON as kwf (and JSON.stringify) writes it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def written(records: list[Record], settings: Settings) -> Counter[tuple[str, Any, Any]]:
    """What the threads wrote, as comparable items: engine topics by role, events left out."""
    roles = {settings.result_topic: "result", settings.error_topic: "error"}
    return Counter((roles.get(r.topic, r.topic), r.key, r.value) for r in records
                   if r.topic not in (settings.events_topic, settings.dlq_topic))


Written = Counter[tuple[str, Any, Any]]


def in_engine(workflow: Any, handlers: dict[str, Handler],
              messages: list[tuple[str, str]]) -> tuple[Written, dict[str, int]]:
    """The same scenario in ``kwf.testing.Engine``, on virtual time, with the same handlers;
    and the offset of each thread's start there."""
    eng = Engine(workflows=[workflow])
    for topic, handler in handlers.items():
        eng.handle(topic, handler)
    for key, value in messages:
        eng.send(key, value)
    eng.advance(3600)
    starts: dict[str, int] = {}
    for rec in eng.inputs(eng.settings.resume_topic):
        starts.setdefault(str(rec.key), rec.offset)
    return written(eng.outputs(), Settings()), starts


def by_start(got: Written, starts: dict[str, int]) -> Written:
    """``got`` with each thread's ids ``<its start's offset>:<n>`` written ``start:<n>``, to
    compare runs whose records sit at different offsets."""
    return Counter({(topic, key, value.replace(f"{starts[key]}:", "start:")
                     if isinstance(value, str) and key in starts else value): n
                    for (topic, key, value), n in got.items()})



def pick(prefix: str, ok: Callable[[str], bool]) -> str:
    """The first thread id ``<prefix><n>`` the predicate accepts (the services' draws decide)."""
    return next(t for t in (f"{prefix}{n}" for n in range(10_000)) if ok(t))


def test_trip_saga_four_outcomes_end_to_end(kafka_engine: KafkaEngine):
    s = kafka_engine.settings
    hotel, flight = Behaviour(fail=0.3, latency=0.01), Behaviour(silent=0.3, latency=0.01)
    services = Services(Behaviour(latency=0.01), {"saga-reserve-hotel": hotel,
                                                  "saga-reserve-flight": flight})
    prefix = f"trip-{uuid.uuid4().hex[:8]}-"

    def fates(t: str) -> tuple[str, str]:
        return (hotel.outcome("saga-reserve-hotel", t), flight.outcome("saga-reserve-flight", t))

    ok = pick(prefix + "ok", lambda t: fates(t) == (OK, OK))
    throw = pick(prefix + "throw", lambda t: fates(t) == (OK, OK))
    error = pick(prefix + "error", lambda t: fates(t)[0] == "fail")
    late = pick(prefix + "timeout", lambda t: fates(t) == (OK, SILENT))
    messages = [(ok, 'new:trip:{"timeoutMs": 5000}'),
                (throw, 'new:trip:{"throwAfterHotel": true, "timeoutMs": 5000}'),
                (error, 'new:trip:{"timeoutMs": 5000}'),
                (late, 'new:trip:{"timeoutMs": 3000}')]
    reserve = [f"saga-reserve-{k}" for k in trip_booking.KINDS]
    cancel = [f"saga-cancel-{k}" for k in trip_booking.KINDS]
    collector = Collector(s, [s.events_topic, s.result_topic, s.error_topic, s.dlq_topic,
                              *reserve, *cancel], prefix)
    handlers = {t: services.handlers()[t] for t in reserve}
    runner = ServiceRunner(s.kafka_config(), handlers, s.resume_topic,
                           delay=services.delay, accept=lambda t: t.startswith(prefix)).start()
    try:
        starts = send(s, messages)
        collector.wait_final(kafka_engine, [t for t, _ in messages])
    finally:
        runner.stop()
        collector.close()
    got = written(collector.records, s)
    o = starts[ok]  # ids are the offsets of the starts, byte for byte as kafka-workflow's
    assert got[("result", ok, f'{{"car":{{"id":"{o}:1"}},"hotel":{{"id":"{o}:2"}},'
                              f'"flight":{{"id":"{o}:3"}}}}')] == 1
    assert got[("error", throw, '"something is wrong"')] == 1
    assert got[("error", error, '"no hotel available"')] == 1
    assert got[("error", late, '"timeout"')] == 1
    for thread in (throw, late):
        o = starts[thread]
        assert {(topic, v) for topic, k, v in got if k == thread and "cancel" in topic} == {
            ("saga-cancel-car", f"{o}:1"), ("saga-cancel-hotel", f"{o}:2"),
            ("saga-cancel-flight", f"{o}:3")}
    assert not [r for r in collector.records if r.topic == s.dlq_topic]
    in_eng, eng_starts = in_engine(trip_booking.trip, handlers, messages)
    assert by_start(got, starts) == by_start(in_eng, eng_starts)


def test_cart_signals_reminder_and_abandonment_end_to_end(kafka_engine: KafkaEngine):
    s = kafka_engine.settings
    services = Services(Behaviour(latency=0.01))  # the shopper always comes back
    prefix = f"cart-{uuid.uuid4().hex[:8]}-"
    shopper, abandoned, back = prefix + "shop", prefix + "abandon", prefix + "back"

    def sig(thread: str, type_: str, **more: Any) -> tuple[str, str]:
        return thread, json.dumps({"ref": "main", "value": {"type": type_, **more}})

    item = {"productId": "p1", "quantity": 2}
    messages = [
        (shopper, "new:cart:{}"), sig(shopper, "addToCart", item=item), sig(shopper, "getCart"),
        sig(shopper, "checkout"), sig(shopper, "updateEmail", email="ada@example.com"),
        sig(shopper, "checkout"),
        (abandoned, 'new:cart:{"abandonedCartTimeoutMS": 1500}'),
        sig(abandoned, "updateEmail", email="gone@example.com"),
        (back, 'new:cart:{"abandonedCartTimeoutMS": 1500}'), sig(back, "addToCart", item=item),
        sig(back, "updateEmail", email="back@example.com"),
    ]
    topics = [ecommerce.REMINDER_TOPIC, ecommerce.CHECKOUT_ERROR_TOPIC, ecommerce.GET_CART_TOPIC]
    collector = Collector(s, [s.events_topic, s.result_topic, s.error_topic, s.dlq_topic,
                              *topics], prefix)
    shopper_service = services.handlers()[ecommerce.REMINDER_TOPIC]

    def only_back(rec: Record) -> Any:  # the other reminded shopper stays away
        return shopper_service(rec) if thread_of(rec) == back else None

    handlers = {ecommerce.REMINDER_TOPIC: only_back}
    runner = ServiceRunner(s.kafka_config(), handlers, s.resume_topic, delay=services.delay,
                           accept=lambda t: t.startswith(prefix)).start()
    try:
        send(s, messages)
        collector.wait_final(kafka_engine, [shopper, abandoned, back])
    finally:
        runner.stop()
        collector.close()
    got = written(collector.records, s)
    view = {"items": [item], "email": ""}
    assert got[(ecommerce.GET_CART_TOPIC, shopper, compact(view))] == 1
    assert got[(ecommerce.CHECKOUT_ERROR_TOPIC, shopper, "Must have email to check out!")] == 1
    assert got[("result", shopper, compact({**view, "email": "ada@example.com"}))] == 1
    assert got[(ecommerce.REMINDER_TOPIC, abandoned, "gone@example.com")] == 1
    assert got[("result", abandoned, '"abandoned"')] == 1
    assert got[(ecommerce.REMINDER_TOPIC, back, "back@example.com")] == 1
    assert got[("result", back, compact({"items": [item], "email": "back@example.com"}))] == 1
    assert not [r for r in collector.records if r.topic == s.dlq_topic]
    assert got == in_engine(ecommerce.cart, handlers, messages)[0]


def test_demo_summary_matches_engine_thread_by_thread(kafka_engine: KafkaEngine):
    """``kwf demo`` against the real engine: every thread ends, and each one's status and result
    are those ``Engine`` gives the same thread with the same services on virtual time. The
    workflows' clocks run at a third of the demo's pace, so a busy CI machine delaying a
    service's answer by a second does not turn an approval into an escalation."""
    from kwf.cli.demo import KINDS, run_demo, start_records
    from workflows._services import demo_services

    pace = 3.0
    report = run_demo(kafka_engine.settings, 8, timeout=WAIT_S, pace=pace)
    kafka_engine.check_alive()
    assert not report.stalled and report.finished == 8 * len(KINDS)
    eng = Engine()
    for topic, handler in demo_services().handlers().items():
        eng.handle(topic, handler)
    for thread, seen in report.threads.items():
        for value in start_records(seen.kind, thread, int(thread.rsplit("-", 1)[1]), pace):
            eng.send(thread, value)
    eng.advance(3600)
    expected = {t: eng.status(t)["status"] for t in report.threads}
    assert {t: seen.status for t, seen in report.threads.items()} == expected
    def timeless(result: Any) -> Any:
        """Approvals report how long they took (latency differs), and trips return their
        reservation ids, whose prefix is the Kafka offset of the start record (Engine's
        offsets are its own): compare what is left."""
        if isinstance(result, dict):
            return {k: timeless(v) for k, v in result.items() if k != "after"}
        if isinstance(result, str):
            return re.sub(r"^\d+(?:\.\d+)?:(\d+)$", r"<offset>:\1", result)
        return result

    for thread, seen in report.threads.items():
        if seen.status == "completed":
            assert timeless(seen.result) == timeless(eng.result(thread)), thread
    counts = report.counts()
    assert sum(counts["all"].values()) == len(report.threads)
    assert counts["all"]["running"] == 0
