"""The engine's Kafka input clock through an outage: met deadlines stay met.

Replies land in Kafka before their deadline; then the engine is stalled (SIGSTOP), and in one
test the broker frozen too, until well after the deadline. When both come back, every timer is due on the
wall clock, yet each partition holds timers back until the engine has read what it held at the
timers' due time (``kwf.engine.clock``): the replies win. The old quiet-time guess took a
partition that delivered nothing for 0.5 s as caught up and abandoned these carts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_flow_kafka import Engine, World
from test_kafka_broker import free_ports

from kwf.kafka import LocalBroker

pytestmark = pytest.mark.kafka

OUTAGE_PORT = os.environ.get("KWF_TEST_OUTAGE_PORT")
"""A fixed port for the test's own broker (this port and the next); a free one if unset."""


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    if OUTAGE_PORT:
        port, controller = int(OUTAGE_PORT), int(OUTAGE_PORT) + 1
    else:
        port, controller = free_ports(2)
    broker = LocalBroker(home=tmp_path / "kafka", port=port, controller_port=controller)
    broker.start()
    yield broker
    pid = broker.status().pid
    if pid is not None:
        os.kill(pid, signal.SIGCONT)
    broker.stop(timeout=10)


def _met_deadlines_survive(world: World, outage: Callable[[], None],
                           recover: Callable[[], None]) -> None:
    """Six carts with a 4 s deadline; their checkouts reach Kafka in time; then ``outage()``
    until 2 s past every deadline (the engine stalled as well), then ``recover()``."""
    engine = world.engine().start()
    carts = [f"cart-{i}" for i in range(6)]
    try:
        events = world.settings.events_topic
        world.send("warm-up", "new:fnotify:{}")  # a fresh broker takes a while to serve producers
        world.pump(lambda: any(r.key == "warm-up" for r in world.records[events]), 90, engine)
        started = time.time()
        for key in carts:
            world.send(key, 'new:fcart:{"timeout": 4}')
        world.pump(lambda: {r.key for r in world.records[events]} >= set(carts), 3, engine)
        assert engine.proc is not None
        os.kill(engine.proc.pid, signal.SIGSTOP)  # stalled: it reads nothing from here on
        for key in carts:
            world.send(key, json.dumps({"ref": "cart", "value": {"op": "checkout"}}))
        assert time.time() < started + 4, "too slow to send the replies before the deadline"
        outage()
        time.sleep(max(0.0, started + 6 - time.time()))  # every deadline is past
        os.kill(engine.proc.pid, signal.SIGCONT)
        time.sleep(2)  # the engine runs; every timer is due on the wall clock
        recover()
        world.pump(lambda: len(world.results()) == len(carts), 60, engine)
        assert world.results() == {key: {"status": "ordered", "items": {}} for key in carts}
        assert engine.running()
    finally:
        if engine.proc is not None and engine.proc.poll() is None:
            os.kill(engine.proc.pid, signal.SIGCONT)
        engine.kill()
        world.close()


def test_replies_in_kafka_before_the_deadline_win_after_the_engine_stalled(
        kafka_brokers: str, unique: Callable[[str], str], tmp_path: Path) -> None:
    world = World(kafka_brokers, unique("stall"), tmp_path)
    world.create_topics()
    _met_deadlines_survive(world, lambda: None, lambda: None)


def test_replies_in_kafka_before_the_deadline_win_after_a_broker_outage(
        own_broker: LocalBroker, unique: Callable[[str], str], tmp_path: Path) -> None:
    """The broker is frozen (SIGSTOP: connections hang, as in a network partition) from just
    after the replies reached it until 2 s past the deadlines."""
    world = World(own_broker.bootstrap, unique("outage"), tmp_path)
    world.env.pop("KWF_KAFKA_PROPERTIES")  # librdkafka's defaults: deliveries wait out an outage
    world.create_topics()
    pid = own_broker.status().pid
    assert pid is not None
    _met_deadlines_survive(world, lambda: os.kill(pid, signal.SIGSTOP),
                           lambda: os.kill(pid, signal.SIGCONT))


def test_an_idle_engine_fires_a_timer_on_time_through_the_input_clock(
        kafka_brokers: str, unique: Callable[[str], str], tmp_path: Path) -> None:
    """Probing watermarks keeps an idle engine's clock close to the wall clock: a 1 s cart
    timeout is written about 1 s after the start (the result's timestamp is the due time)."""
    world = World(kafka_brokers, unique("idle"), tmp_path)
    world.create_topics()
    engine: Engine = world.engine().start()
    try:
        events = world.settings.events_topic
        world.send("warm-up", "new:fnotify:{}")  # the engine is up once it answers
        world.pump(lambda: any(r.key == "warm-up" for r in world.records[events]), 30, engine)
        world.send("cart", 'new:fcart:{"timeout": 1}')
        world.pump(lambda: len(world.results()) == 1, 30, engine)
        seen = time.time()
        (result,) = world.unique(world.settings.result_topic)
        assert result.json() == {"status": "abandoned", "items": {}}
        # Fired and read back within 2 s of due (about 20 ms on a quiet machine; a watermark
        # probe took a second once while the whole suite loaded the 2 cores). The quiet-time
        # guess this replaced held an idle engine's timers for seconds.
        assert seen - result.timestamp < 2.0
    finally:
        engine.kill()
        world.close()


def test_a_worker_blocks_in_kafka_only_briefly_while_another_hands_out_records(
        kafka_brokers: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker blocked in its Kafka wait sees nothing another worker routes to it until the
    wait ends; so while another worker of the process hands out records, an idle worker's wait
    is ``BUSY_WAIT_S``, not ``IDLE_WAIT_S``. Its own records, or a timer due sooner, come first."""
    from kwf.engine import source
    from kwf.engine.clock import InputClock, KafkaProbe

    clock = InputClock()
    config = {"bootstrap.servers": kafka_brokers}
    probe = KafkaProbe(clock, config, None, 0.01)
    a, b = (source._Shared(config, clock, probe) for _ in range(2))
    monkeypatch.setattr(source, "_by_thread", {1: a, 2: b})
    try:
        assert b.wait_s() == source.IDLE_WAIT_S  # nobody busy, no timer
        a.busy_until = time.monotonic() + source.BUSY_S  # a just handed records out
        assert b.wait_s() == source.BUSY_WAIT_S
        assert a.wait_s() == source.IDLE_WAIT_S  # its own activity is not a reason
        b.handed = 3
        assert b.wait_s() == 0.0  # it handed out records itself: look again at once
        b.handed = 0
        a.busy_until = time.monotonic() - 0.001
        assert b.wait_s() == source.IDLE_WAIT_S  # a's records are done with
        a.busy_until = time.monotonic() + source.BUSY_S
        clock.wake_by(time.time() + source.BUSY_WAIT_S / 2)  # a timer of this worker
        assert 0.0 <= b.wait_s() <= source.BUSY_WAIT_S / 2
    finally:
        a.consumer.close()
        b.consumer.close()
