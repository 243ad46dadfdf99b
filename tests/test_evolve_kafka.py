"""Issue 11 on a real broker: continue_as_new across kill -9; children on two workers."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import evolve_workflows as ew
import pytest
from test_flow_kafka import Engine, World

pytestmark = pytest.mark.kafka


@pytest.fixture
def world(kafka_brokers: str, unique: Callable[[str], str], tmp_path: Path) -> Iterator[World]:
    w = World(kafka_brokers, unique("evolve"), tmp_path)
    w.env["KWF_WORKFLOWS"] = "flow_workflows,evolve_workflows"
    w.user_topics.update(ew.topic_names(w.prefix))
    w.create_topics()
    yield w
    w.close()


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for engine in started:
        engine.kill()


def test_continue_as_new_across_kill_9_loses_nothing_and_applies_nothing_twice(
        world: World, engines: list[Engine]) -> None:
    n, values = 6, 14
    tally = world.user_topics["tally"]
    engine = world.engine().start()
    engines.append(engine)
    for i in range(n):
        world.send(f"tally-{i}", 'new:evolve-tally:{"every": 3}')
        for v in range(values // 2):
            world.send(f"tally-{i}", json.dumps({"ref": "add", "value": v}))
    world.pump(lambda: len(world.records[tally]) >= n * 2, 60, engine)
    engine.kill()  # mid-stream: some threads have continued as new, some not yet
    for i in range(n):
        for v in range(values // 2, values):
            world.send(f"tally-{i}", json.dumps({"ref": "add", "value": v}))
        world.send(f"tally-{i}", json.dumps({"ref": "add", "value": "stop"}))
    engine = world.engine().start()
    engines.append(engine)
    world.pump(lambda: len(world.results()) == n, 90, engine)

    assert world.results() == {f"tally-{i}": values for i in range(n)}
    written: dict[str, list[Any]] = defaultdict(list)
    for rec in world.unique(tally):  # repeats (at-least-once) dropped; each must be identical
        written[str(rec.key)].append(rec.json())
    for i in range(n):
        assert written[f"tally-{i}"] == [{"n": v + 1, "v": v} for v in range(values)]
    statuses = defaultdict(list)
    for rec in world.unique(world.settings.events_topic):
        if rec.value is not None:
            statuses[rec.key].append(rec.json()["status"])
    # 14 values and a stop, a new run every 3 events: 4 continues per thread, none lost or doubled.
    assert all(s.count("continued") == 4 and s[-1] == "completed" for s in statuses.values())
