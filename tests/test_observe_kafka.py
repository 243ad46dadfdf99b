"""Observing a running engine on Kafka: its stderr, its metrics, tracebacks and dead letters.

The engine runs as deployed (``python -m bytewax.run dataflow``, see ``test_flow_kafka``). The
stderr test uses a broker of its own on port 19342, because it stops it for an outage.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_flow_kafka import REPO, Engine, World, engines  # noqa: F401 - a fixture

from kwf.kafka import LocalBroker

pytestmark = pytest.mark.kafka

OWN_BROKER_PORT = 19342
"""The outage test's own broker (and 19343 its controller): never the shared one."""


def lines(engine: Engine) -> list[dict[str, Any]]:
    """Every line the engine wrote, parsed; a line that is not a JSON object fails the test."""
    events = []
    for number, line in enumerate(engine.output().splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} of the engine's output is not JSON: {line!r}")
        assert isinstance(event, dict), f"line {number} is JSON but not an object: {line!r}"
        events.append(event)
    return events


def stop(engine: Engine, sig: int = signal.SIGINT) -> int:
    assert engine.proc is not None
    engine.proc.send_signal(sig)
    return engine.wait(30)


def results_and_dead_letters(world: World, results: int, dead: int) -> Callable[[], bool]:
    s = world.settings
    return lambda: (len(world.results()) >= results
                    and len(world.unique(s.dlq_topic)) >= dead)


def test_every_line_the_engine_writes_is_json_through_bad_records_an_outage_and_a_stop(
        tmp_path: Path, unique: Callable[[str], str], engines: list[Engine]) -> None:
    broker = LocalBroker(home=tmp_path / "kafka", port=OWN_BROKER_PORT,
                         controller_port=OWN_BROKER_PORT + 1)
    broker.start()
    try:
        world = World(broker.bootstrap, unique("obs"), tmp_path)
        world.create_topics()
        engine = world.engine().start()
        engines.append(engine)
        world.send("trip-1", 'new:ftrip:{"rest": 0}')
        world.send("bad-1", "not a record")
        world.send("bad-2", b"\xff\xfe".decode("latin-1"))
        world.send("nobody", '{"ref": "x", "value": 1}')
        world.send("cart-1", 'new:fcart:{"timeout": "never"}')  # fails: a traceback
        world.pump(results_and_dead_letters(world, 1, 3), 90, engine)

        # The outage (restarting a broker takes half a minute: the engine stops during it).
        broker.stop(timeout=20)
        time.sleep(8)
        assert engine.running(), engine.output()[-2000:]
        stop(engine)  # SIGINT; SIGTERM drains first where the engine's source supports it
    finally:
        broker.stop(timeout=20)
        world.close()

    events = lines(engine)
    names = Counter(e["event"] for e in events)
    assert names["engine_starting"] == 1 and names["engine_stopped"] == 1, names
    assert [e["signal"] for e in events if e["event"] == "engine_stopped"] == ["SIGINT"]
    assert all(e["process"] == 0 and "worker" in e and "level" in e for e in events)
    assert not [e for e in events if e.get("exception") or e["event"] in
                ("stderr", "engine_crashed", "thread_crashed")], names
    failed = [e for e in events if e["event"] == "workflow_failed"]
    assert failed and "flow_workflows.py" in failed[0]["traceback"], failed
    kafka = [e for e in events if e["event"] == "kafka_client_log"]
    assert kafka, "the outage left no librdkafka message"  # routed, and ...
    assert len(kafka) < 150, Counter((e["client"], e["facility"]) for e in kafka)  # ... limited
    errors = [e for e in events if e["event"] == "kafka_client_error"]
    assert len(errors) < 20, Counter(e["code"] for e in errors)


API_PORT = 23110
"""Bytewax's API server (its /metrics) for the metrics test."""


def scrape(port: int) -> dict[str, float]:
    """The engine's /metrics as {'name{labels}': value}; comments left out."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_a_running_engine_serves_kwf_metrics_a_traceback_header_and_whole_dead_letters(
        kafka_brokers: str, unique: Callable[[str], str], tmp_path: Path,
        engines: list[Engine]) -> None:
    world = World(kafka_brokers, unique("obs"), tmp_path)
    world.env.update(BYTEWAX_DATAFLOW_API_ENABLED="true",
                     BYTEWAX_DATAFLOW_API_PORT=str(API_PORT))
    world.create_topics()
    engine = world.engine().start()
    engines.append(engine)
    n = 7
    try:
        for i in range(n):
            world.send(f"trip-{i}", 'new:ftrip:{"rest": 0}')
        world.send("cart-1", 'new:fcart:{"timeout": "never"}')
        big_value, long_key = "v" * 900_001, "k" * 5_000
        world.send("big", big_value)
        world.send(long_key, "new:ftrip:{}")
        world.pump(results_and_dead_letters(world, n, 2), 90, engine)
        s = world.settings

        [error] = world.unique(s.error_topic)
        assert error.key == "cart-1" and error.value == json.dumps(
            "could not convert string to float: 'never'")
        trace = error.header("kwf-traceback")
        assert trace is not None and "flow_workflows.py" in trace and "in fcart" in trace
        assert trace.endswith("ValueError: could not convert string to float: 'never'")
        events = [r.json() for r in world.unique(s.events_topic) if r.key == "cart-1"]
        assert events[-1]["status"] == "failed" and events[-1]["traceback"] == trace

        dead = {r.header("kwf-error").split(":")[0]: r for r in world.unique(s.dlq_topic)}
        assert dead["too-large"].value == big_value and dead["bad-key"].key == long_key
        assert all(r.header("kwf-truncated") is None for r in dead.values())

        metrics = scrape(API_PORT)
    finally:
        world.close()
    assert metrics['kwf_threads_started_total{workflow="ftrip"}'] == n
    assert metrics['kwf_threads_ended_total{status="completed",workflow="ftrip"}'] == n
    assert metrics['kwf_threads_ended_total{status="failed",workflow="fcart"}'] == 1
    assert metrics['kwf_records_total{kind="new"}'] == n + 1
    assert metrics['kwf_records_total{kind="resume"}'] == 2 * n  # a car and a hotel each
    assert metrics['kwf_step_seconds_count{workflow="ftrip"}'] >= 3 * n
    assert metrics['kwf_dead_letters_total{code="too-large"}'] == 1
    assert metrics['kwf_dead_letters_total{code="bad-key"}'] == 1
    assert metrics['kwf_threads{state="tombstone"}'] == n + 1
    assert metrics["kwf_input_lag_seconds_count"] == 3 * n + 1
    assert any(name.startswith("bytewax_item_inp_count_total") for name in metrics)  # Bytewax's


CLUSTER = "127.0.0.1:23120;127.0.0.1:23121"
"""Timely's addresses for the two-process cluster test."""


def test_a_lost_cluster_peer_is_logged_as_what_it_is(
        kafka_brokers: str, unique: Callable[[str], str], tmp_path: Path,
        engines: list[Engine]) -> None:
    world = World(kafka_brokers, unique("obs"), tmp_path)
    world.create_topics()
    for process in (0, 1):
        engine = Engine(world.env, None, tmp_path / f"process-{process}.log")
        with engine.log.open("ab") as out:
            engine.proc = subprocess.Popen(
                [sys.executable, "-m", "bytewax.run", "dataflow", "-a", CLUSTER,
                 "-i", str(process)], cwd=REPO, env=world.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        engines.append(engine)
    survivor, lost = engines
    try:
        world.send("trip-1", 'new:ftrip:{"rest": 0}')
        world.pump(lambda: len(world.results()) == 1, 90, survivor)
    finally:
        world.close()
    lost.kill()
    survivor.wait(30)
    events = lines(survivor)
    [peer] = [e for e in events if e["event"] == "cluster_peer_lost"]
    assert peer["level"] == "error" and "restart them all" in peer["what_to_do"]
    assert not [e for e in events if e["event"] in ("engine_crashed", "stderr", "rust_panic")]
