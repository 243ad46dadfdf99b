"""The engine on a real broker: ``python -m bytewax.run dataflow`` in a subprocess, as deployed.

Each test gets its own topics (``unique``), a recovery directory, and plays the services
itself: it reads the engine's outputs and answers reservation requests on the resume topic.
Outputs are at-least-once, so every check first drops repeats by ``kwf-thread``/``kwf-seq``
(and checks that a repeat is identical to the first copy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flow_workflows as fw
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from kwf.config import Settings
from kwf.engine.admin import create_topics
from kwf.engine.sink import DeliveryError, KafkaRecordSink
from kwf.protocol import Record

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PARTITIONS = 2
CLUSTER_PORT = int(os.environ.get("KWF_TEST_CLUSTER_PORT", "24000"))
"""Two ports from here on 127.0.0.1 for the 2-process cluster test."""
# Fail a record for a missing topic within seconds, not librdkafka's 30 s / 5 min defaults.
FAST_FAILURE = {"topic.metadata.propagation.max.ms": "1500", "message.timeout.ms": "6000"}

pytestmark = pytest.mark.kafka


class Engine:
    """The engine as a subprocess; its output goes to a log file, quoted when a check fails."""

    def __init__(self, env: dict[str, str], recovery: Path | None, log: Path) -> None:
        self.env, self.recovery, self.log = env, recovery, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, workers: int = 1) -> Engine:
        args = [sys.executable, "-m", "bytewax.run", "dataflow", "-w", str(workers)]
        if self.recovery is not None:
            if not self.recovery.exists():
                self.recovery.mkdir(parents=True)
                subprocess.run([sys.executable, "-m", "bytewax.recovery", str(self.recovery), "1"],
                               check=True, env=self.env, cwd=REPO)
            args += ["-r", str(self.recovery), "-s", "1", "-b", "0"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, cwd=REPO, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        """``kill -9`` the engine (and only it: it leads its own process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class World:
    """One test's topics, engine settings, a producer for inputs and a reader of outputs."""

    def __init__(self, brokers: str, prefix: str, tmp: Path) -> None:
        self.brokers, self.prefix, self.tmp = brokers, prefix, tmp
        props = tmp / "kafka.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in FAST_FAILURE.items()))
        self.env = {
            **os.environ, "KWF_BROKERS": brokers, "KWF_WORKFLOWS": "flow_workflows",
            "KWF_TEST_PREFIX": prefix, "KWF_KAFKA_PROPERTIES": str(props),
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
            **{f"KWF_{name.upper()}_TOPIC": f"{prefix}-{name}"
               for name in ("resume", "scheduler", "result", "error", "events", "dlq")},
        }
        self.settings = Settings.from_env(self.env)
        self.user_topics = fw.topic_names(prefix)
        self.conf = {"bootstrap.servers": brokers}
        self.producer = Producer({**self.conf, "partitioner": "murmur2_random"})
        self.records: dict[str, list[Record]] = defaultdict(list)
        self._consumer: Consumer | None = None
        self._engines = 0

    def create_topics(self, *topics: str) -> None:
        create_topics(self.conf, topics or self.all_topics(), PARTITIONS, 1,
                      compacted={self.settings.events_topic})

    def all_topics(self) -> list[str]:
        return [*self.settings.engine_topics, *self.user_topics.values()]

    def engine(self, recovery: bool = True) -> Engine:
        self._engines += 1
        return Engine(self.env, self.tmp / "recovery" if recovery else None,
                      self.tmp / f"engine-{self._engines}.log")

    # -- input ---------------------------------------------------------------------------------
    def send(self, key: str | None, value: str | None, topic: str | None = None) -> int:
        """Produce one record and return its offset (in the partition its key chose)."""
        delivered: list[Any] = []
        self.producer.produce(topic or self.settings.resume_topic, value=value, key=key,
                              on_delivery=lambda err, msg: delivered.append((err, msg)))
        self.producer.flush(10)
        (err, msg), = delivered
        assert err is None, err
        return int(msg.offset())

    def reply(self, rec: Record, value: Any = "ok") -> None:
        self.send(str(rec.key), json.dumps({"ref": rec.value, "value": value}))

    # -- output --------------------------------------------------------------------------------
    def _reader(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer({**self.conf, "group.id": f"{self.prefix}-reader",
                                       "enable.auto.commit": "false"})
            topics = [t for t in self.all_topics() if t != self.settings.resume_topic]
            self._consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                                   for t in topics for p in range(PARTITIONS)])
        return self._consumer

    def pump(self, until: Callable[[], bool], timeout: float, engine: Engine | None = None,
             answer: bool = True) -> None:
        """Read outputs (answering reservations) until ``until()`` holds; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        reserve = {self.user_topics["reserve-car"], self.user_topics["reserve-hotel"]}
        while not until():
            if time.monotonic() > deadline:
                tail = engine.output()[-3000:] if engine else ""
                pytest.fail(f"timed out after {timeout} s; outputs so far: "
                            f"{ {t: len(r) for t, r in self.records.items()} }\nengine log:\n{tail}")
            for msg in self._reader().consume(500, 0.2):
                if msg.error():
                    continue
                _, ms = msg.timestamp()
                rec = Record(msg.topic(), msg.key().decode() if msg.key() else None,
                             msg.value().decode() if msg.value() is not None else None,
                             tuple((k, v.decode()) for k, v in msg.headers() or []), ms / 1000)
                self.records[rec.topic].append(rec)
                if answer and rec.topic in reserve:
                    self.reply(rec)

    def unique(self, topic: str) -> list[Record]:
        """The records of ``topic`` with repeats dropped; a repeat must equal the first copy."""
        seen: dict[tuple[str | None, str | None], Record] = {}
        for rec in self.records[topic]:
            ident = (rec.header("kwf-thread"), rec.header("kwf-seq"))
            if ident[1] is None:  # dead letters and scheduler records carry no kwf-seq
                ident = (rec.key if isinstance(rec.key, str) else None, rec.value if isinstance(rec.value, str) else None)
            first = seen.setdefault(ident, rec)
            assert first == rec, f"two different records share {ident}: {first} / {rec}"
        return list(seen.values())

    def results(self) -> dict[str, Any]:
        return {r.key: r.json() for r in self.unique(self.settings.result_topic)}

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


@pytest.fixture
def world(kafka_brokers: str, unique: Callable[[str], str], tmp_path: Path) -> Iterator[World]:
    w = World(kafka_brokers, unique("flow"), tmp_path)
    w.create_topics()
    yield w
    w.close()


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Engines a test started: killed at the end whatever happened."""
    started: list[Engine] = []
    yield started
    for engine in started:
        engine.kill()


def test_saga_cart_and_alarm_run_to_their_results_with_timers(world: World, engines: list[Engine]) -> None:
    engine = world.engine().start()
    engines.append(engine)
    trip = world.send("trip-1", 'new:ftrip:{"rest": 1}')
    world.send("cart-1", 'new:fcart:{"timeout": 1.5}')
    world.send("cart-1", json.dumps({"ref": "cart", "value": {"op": "add", "item": "tea"}}))
    world.send("cart-2", 'new:fcart:{"timeout": 60}')
    world.send("cart-2", json.dumps({"ref": "cart", "value": {"op": "checkout"}}))
    world.send("alarm-1", 'new:falarm:{"ms": 1000}')
    world.send("bad-1", "not a record")
    s = world.settings
    world.pump(lambda: len(world.results()) == 4 and world.records[s.dlq_topic], 60, engine)
    assert world.results() == {
        "trip-1": {"car": {"id": f"{trip}:1"}, "hotel": {"id": f"{trip}:2"}},
        "cart-1": {"status": "abandoned", "items": {"tea": 1}},
        "cart-2": {"status": "ordered", "items": {}},
        "alarm-1": "rang",
    }
    (dead,) = world.unique(s.dlq_topic)
    assert dead.header("kwf-error").startswith("bad-form")
    assert dead.header("kwf-source").startswith(f"{s.resume_topic}/")
    # A timer fires at its due time in logical time: the abandoned cart's result carries it.
    cart_events = [r for r in world.unique(s.events_topic) if r.key == "cart-1"]
    (cart_result,) = [r for r in world.unique(s.result_topic) if r.key == "cart-1"]
    assert cart_result.timestamp == pytest.approx(cart_events[1].timestamp + 1.5, abs=0.0015)
    assert engine.running()


def test_kill_9_mid_run_loses_no_workflow_and_no_event(world: World, engines: list[Engine]) -> None:
    """Killed while sagas wait on replies and timers; events keep coming while it is down."""
    s, n = world.settings, 8
    notes = {f"notifier-{i}": [f"{i}.{j}" for j in range(8)] for i in range(n)}
    engine = world.engine().start()
    engines.append(engine)
    starts = {}
    for i in range(n):
        starts[f"trip-{i}"] = world.send(f"trip-{i}", 'new:ftrip:{"rest": 1}')
        world.send(f"notifier-{i}", "new:fnotify:{}")
    for key, values in notes.items():
        for note in values[:4]:
            world.send(key, json.dumps({"ref": "note", "value": note}))
    notify = world.user_topics["notify"]
    world.pump(lambda: len(world.records[notify]) >= 5, 60, engine)
    engine.kill()
    # While the engine is down: more events, and sagas wait on timers and replies.
    for key, values in notes.items():
        for note in [*values[4:], "stop"]:
            world.send(key, json.dumps({"ref": "note", "value": note}))
    engine = world.engine().start(workers=2)  # and rescaled: state follows the thread id
    engines.append(engine)
    world.pump(lambda: len(world.results()) == 2 * n, 90, engine)

    results = world.results()
    for key, offset in starts.items():  # ids are the offsets of the starts, as kafka-workflow's
        assert results[key] == {"car": {"id": f"{offset}:1"}, "hotel": {"id": f"{offset}:2"}}
    assert all(results[key] == len(values) for key, values in notes.items())
    written: dict[str, list[Any]] = defaultdict(list)
    for rec in world.unique(notify):
        written[str(rec.key)].append(rec.json())
    for key, values in notes.items():
        assert written[key] == [{"note": v, "n": k} for k, v in enumerate(values, 1)], key
    final = {}
    for rec in world.unique(s.events_topic):
        final[rec.key] = rec.json()["status"]
    assert set(final.values()) == {"completed"}


def test_ids_are_the_offsets_of_the_records_that_caused_them_across_a_kill_9(
        world: World, engines: list[Engine]) -> None:
    """Each step of ``fids`` writes a fresh auto id: ``<offset>:1`` of the record that caused the
    step, ``<offset>.1:1`` for a timer's step after it; the same after kill -9 and a restart."""
    notify = world.user_topics["notify"]

    def ids(key: str) -> list[str | bytes | None]:
        return [r.value for r in world.unique(notify) if r.key == key]

    def resume(key: str, ref: str, value: str) -> int:
        return world.send(key, json.dumps({"ref": ref, "value": value}))

    engine = world.engine().start()
    engines.append(engine)
    world.send("ids-a", "garbage")  # dead-lettered: the start is not at offset 0
    a0 = world.send("ids-a", "new:fids:{}")
    a1 = resume("ids-a", f"{a0}:1", "go")
    world.pump(lambda: len(ids("ids-a")) >= 2, 60, engine)
    engine.kill()
    a2 = resume("ids-a", f"{a1}:1", "nap")  # while the engine is down
    b0 = world.send("ids-b", "new:fids:{}")
    engine = world.engine().start()
    engines.append(engine)
    world.pump(lambda: len(ids("ids-a")) >= 3 and len(ids("ids-b")) >= 1, 60, engine)
    resume("ids-a", f"{a2}.1:1", "stop")
    resume("ids-b", f"{b0}:1", "stop")
    world.pump(lambda: len(world.results()) == 2, 60, engine)
    assert a0 > 0
    assert ids("ids-a") == [f"{a0}:1", f"{a1}:1", f"{a2}.1:1"]
    assert ids("ids-b") == [f"{b0}:1"]
    assert world.results() == {"ids-a": 4, "ids-b": 1}


def test_an_undeliverable_record_stops_the_engine_and_is_written_after_the_fix(
        world: World, engines: list[Engine]) -> None:
    notify = world.user_topics["notify"]
    engine = world.engine().start()
    engines.append(engine)
    world.send("n1", "new:fnotify:{}")
    world.send("n1", json.dumps({"ref": "note", "value": "one"}))
    world.pump(lambda: len(world.records[notify]) == 1, 60, engine)

    admin = AdminClient(world.conf)
    admin.delete_topics([notify])[notify].result()
    deadline = time.monotonic() + 30
    while notify in admin.list_topics(timeout=5).topics:
        assert time.monotonic() < deadline, "the topic was not deleted"
        time.sleep(0.2)
    world.send("n1", json.dumps({"ref": "note", "value": "two"}))
    rc = engine.wait(timeout=40)
    assert rc != 0
    assert "Kafka refused 1 of" in engine.output() and notify in engine.output()

    world.create_topics(notify)
    engine = world.engine().start()
    engines.append(engine)
    world.send("n1", json.dumps({"ref": "note", "value": "three"}))
    world.send("n1", json.dumps({"ref": "note", "value": "stop"}))
    world._consumer = None  # the notify topic is new: read it again from its beginning
    world.records.clear()
    world.pump(lambda: "n1" in world.results(), 60, engine)
    assert world.results()["n1"] == 3
    written = [r.json() for r in world.unique(notify)]
    # "one" was delivered before; it comes again if its epoch had not been committed.
    assert written[-2:] == [{"note": "two", "n": 2}, {"note": "three", "n": 3}]
    assert written[:-2] in ([], [{"note": "one", "n": 1}])


def test_engine_refuses_to_start_when_a_topic_is_missing(world: World) -> None:
    env = {**world.env, "KWF_DLQ_TOPIC": f"{world.prefix}-no-such-topic"}
    engine = Engine(env, None, world.tmp / "refused.log")
    started = time.monotonic()
    rc = engine.start().wait(timeout=10)
    assert time.monotonic() - started < 10
    assert rc != 0
    assert f"{world.prefix}-no-such-topic" in engine.output()
    assert "kwf topics create" in engine.output()


def test_sink_delivers_keys_values_headers_and_timestamps(world: World) -> None:
    topic = world.user_topics["cart"]
    part = KafkaRecordSink(world.conf).build_part("out", "out-0", None)
    part.write_batch([Record(topic, "k", "v", (("kwf-seq", "1"), ("raw", b"\x00")), 1_700_000_000.5),
                      Record(topic, b"kb", None, (), 0.0)])
    part.snapshot()  # the epoch closes: every record acknowledged
    world.pump(lambda: len(world.records[topic]) == 2, 20, answer=False)
    first, second = sorted(world.records[topic], key=lambda r: str(r.key))
    assert (first.key, first.value, first.timestamp) == ("k", "v", 1_700_000_000.5)
    assert first.header("kwf-seq") == "1" and first.header("raw") == "\x00"
    assert (second.key, second.value) == ("kb", None)


def test_sink_raises_when_a_record_cannot_be_delivered(world: World) -> None:
    """Produced without waiting; the epoch's snapshot (before it can commit) raises."""
    part = KafkaRecordSink({**world.conf, **FAST_FAILURE}).build_part("out", "out-0", None)
    started = time.monotonic()
    part.write_batch([Record(f"{world.prefix}-absent", "k", "v")])
    assert time.monotonic() - started < 1  # write_batch does not wait for the broker
    with pytest.raises(DeliveryError, match=f"{world.prefix}-absent"):
        part.snapshot()
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_exits_0_and_the_restart_loses_and_repeats_nothing(
        world: World, engines: list[Engine], workers: int) -> None:
    """SIGTERM under load: the engine closes the epoch (snapshot written, outputs confirmed) and
    exits 0; the next start resumes from the stored offsets, so every workflow completes, no
    event is applied twice, and nothing the first run wrote is written again."""
    n = 6
    notes = {f"notifier-{i}": [f"{i}.{j}" for j in range(30)] for i in range(n)}
    engine = world.engine().start(workers)
    engines.append(engine)
    for key in notes:
        world.send(key, "new:fnotify:{}")
    for j in range(30):
        for key, values in notes.items():
            world.producer.produce(world.settings.resume_topic, key=key,
                                   value=json.dumps({"ref": "note", "value": values[j]}))
    world.producer.flush(10)
    notify = world.user_topics["notify"]
    world.pump(lambda: len(world.records[notify]) >= 20, 60, engine)
    assert engine.proc is not None
    started = time.monotonic()
    os.kill(engine.proc.pid, signal.SIGTERM)
    assert engine.wait(20) == 0, engine.output()[-3000:]
    assert time.monotonic() - started < 10
    assert "engine_draining" in engine.output()
    world.pump(lambda: False if time.monotonic() - started < 2 else True, 10, answer=False)
    before = len(world.records[notify])
    for key in notes:
        world.send(key, json.dumps({"ref": "note", "value": "stop"}))
    engine = world.engine().start(workers)
    engines.append(engine)
    world.pump(lambda: len(world.results()) == n, 60, engine)
    assert world.results() == {key: len(values) for key, values in notes.items()}
    written: dict[str, list[Any]] = defaultdict(list)
    for rec in world.unique(notify):
        written[str(rec.key)].append(rec.json())
    for key, values in notes.items():
        assert written[key] == [{"note": v, "n": k} for k, v in enumerate(values, 1)], key
    # A drained epoch is committed: the restart repeats none of the first run's records.
    assert len(world.records[notify]) == len(world.unique(notify)) >= before


def test_sigterm_to_one_process_drains_the_whole_cluster(
        world: World, engines: list[Engine], tmp_path: Path) -> None:
    """Two processes, SIGTERM to one: it marks its committed offsets, the other sees the mark
    through its input clock's probe and drains too; both exit 0 and a restart loses nothing."""
    addresses = f"127.0.0.1:{CLUSTER_PORT};127.0.0.1:{CLUSTER_PORT + 1}"
    init = tmp_path / "init"
    init.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(init), "2"], check=True,
                   env=world.env, cwd=REPO)
    for i in range(2):  # one recovery partition per process, as one volume per pod
        (tmp_path / f"rec-{i}").mkdir()
        for f in init.glob(f"part-{i}.sqlite3*"):
            f.rename(tmp_path / f"rec-{i}" / f.name)

    def start() -> list[subprocess.Popen[bytes]]:
        procs = []
        for i in range(2):
            args = [sys.executable, "-m", "bytewax.run", "dataflow", "-w", "1", "-i", str(i),
                    "-a", addresses, "-r", str(tmp_path / f"rec-{i}"), "-s", "1", "-b", "0"]
            with (tmp_path / f"cluster-{i}.log").open("ab") as out:
                procs.append(subprocess.Popen(args, cwd=REPO, env=world.env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        return procs

    def logs() -> str:
        return "\n".join((tmp_path / f"cluster-{i}.log").read_text()[-2000:] for i in range(2))

    procs = start()
    try:
        for i in range(4):
            world.send(f"notifier-{i}", "new:fnotify:{}")
            world.send(f"notifier-{i}", json.dumps({"ref": "note", "value": "a"}))
        notify = world.user_topics["notify"]
        world.pump(lambda: len(world.unique(notify)) == 4, 60)
        os.kill(procs[1].pid, signal.SIGTERM)
        codes = [p.wait(20) for p in procs]
        assert codes == [0, 0], logs()
        for i in range(4):
            world.send(f"notifier-{i}", json.dumps({"ref": "note", "value": "stop"}))
        procs = start()
        world.pump(lambda: len(world.results()) == 4, 60)
        assert world.results() == {f"notifier-{i}": 1 for i in range(4)}
        assert len(world.records[notify]) == len(world.unique(notify)) == 4
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
