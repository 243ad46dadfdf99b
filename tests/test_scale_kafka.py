"""Many threads on a real broker: ``kill -9`` during a burst of timer firings and during a
restart, with the threads settled out of Bytewax's table (``kwf.engine.recovery``), loses
nothing (issue 13; ``bench/scale.py`` runs the big sizes)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter

import pytest

from kwf.engine.recovery import SETTLED
from test_flow_kafka import Engine, World, engines, world  # noqa: F401 - fixtures

pytestmark = pytest.mark.kafka


def test_kill_9_during_firings_and_during_restarts_loses_nothing(
        world: World, engines: list[Engine]) -> None:
    s, n = world.settings, 300
    carts = [f"cart-{i}" for i in range(n)]  # abandoned by their timers, all due together (8 s:
    # time for the settler to move every thread out of Bytewax's table first)
    notes = [f"note-{i}" for i in range(n)]  # wait for a signal through the restarts
    engine = world.engine().start()
    engines.append(engine)
    for key in carts:
        world.producer.produce(s.resume_topic, key=key, value='new:fcart:{"timeout": 8}')
    for key in notes:
        world.producer.produce(s.resume_topic, key=key, value="new:fnotify:{}")
    world.producer.flush(10)

    # kill -9 as soon as the firings start coming out
    world.pump(lambda: len(world.records[s.result_topic]) >= 1, 90, engine, answer=False)
    engine.kill()
    # the settler had moved the threads out of Bytewax's table: the next starts move them back
    with sqlite3.connect(world.tmp / "recovery" / "part-0.sqlite3") as db:
        (settled,) = db.execute(f"SELECT COUNT(*) FROM {SETTLED}").fetchone()
    assert settled >= n
    # restart, and kill -9 again while it restores
    engine = world.engine().start()
    engines.append(engine)
    time.sleep(1.5)
    engine.kill()
    for key in notes:
        world.producer.produce(s.resume_topic, key=key, value=json.dumps({"ref": "note",
                                                                           "value": "stop"}))
    world.producer.flush(10)
    engine = world.engine().start()
    engines.append(engine)
    world.pump(lambda: len(world.results()) == 2 * n, 120, engine, answer=False)

    results = world.results()
    assert {results[k]["status"] for k in carts} == {"abandoned"}
    assert {results[k] for k in notes} == {0}
    # each thread finished once: one result per thread (repeats are identical copies)
    per_thread = Counter(r.key for r in world.unique(s.result_topic))
    assert set(per_thread.values()) == {1}
    assert not world.records[s.dlq_topic], world.records[s.dlq_topic][:3]
