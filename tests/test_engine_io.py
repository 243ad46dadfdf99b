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
        assert seen - result.timestamp < 1.0  # fired (and read back) within a second of due
    finally:
        engine.kill()
        world.close()
