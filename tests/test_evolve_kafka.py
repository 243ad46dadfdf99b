"""Issue 11 on a real broker: continue_as_new across kill -9; children on two workers."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import evolve_workflows as ew
import pytest
from test_flow_kafka import Engine, World, engines  # noqa: F401 - a fixture

pytestmark = pytest.mark.kafka


@pytest.fixture
def world(kafka_brokers: str, unique: Callable[[str], str], tmp_path: Path) -> Iterator[World]:
    w = World(kafka_brokers, unique("evolve"), tmp_path)
    w.env["KWF_WORKFLOWS"] = "flow_workflows,evolve_workflows"
    w.user_topics.update(ew.topic_names(w.prefix))
    w.create_topics()
    yield w
    w.close()


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


def test_a_saga_of_children_one_cancelled_completes_on_two_workers(
        world: World, engines: list[Engine]) -> None:
    """Parents and children meet only through Kafka, on whichever worker owns each id."""
    n, book = 6, world.user_topics["book"]
    engine = world.engine().start(workers=2)
    engines.append(engine)
    for i in range(n):
        world.send(f"trip-{i}", 'new:evolve-ktrip:{"flightWaitS": 2}')
    answered: set[str] = set()

    def answer_and_check() -> bool:
        for rec in world.unique(book):  # confirm car and hotel, never the flight
            what = rec.json().get("reserve")
            if what in ("car", "hotel") and rec.key not in answered:
                answered.add(str(rec.key))
                world.send(str(rec.key), json.dumps({"ref": "confirm", "value": "ok"}))
        return len([k for k in world.results() if "/" not in k]) == n

    world.pump(answer_and_check, 90, engine, answer=False)
    results = world.results()
    for i in range(n):
        assert results[f"trip-{i}"] == {"booked": [{"booked": "car"}, {"booked": "hotel"}],
                                         "flight": "cancelled"}
    world.pump(lambda: sum("undo" in r.json() for r in world.unique(book)) == n, 30, engine,
               answer=False)
    status: dict[str, Any] = {}
    for rec in world.unique(world.settings.events_topic):
        if rec.value is not None:
            status[str(rec.key)] = rec.json()
    kids = {k: s for k, s in status.items() if "/" in k}
    assert len(kids) == 3 * n
    assert all(s["parent"]["thread"] == k.split("/")[0] for k, s in kids.items())
    assert sorted(s["status"] for s in kids.values()) == ["cancelled"] * n + ["completed"] * 2 * n
    undone = [(r.key, r.json()["undo"]) for r in world.unique(book) if "undo" in r.json()]
    assert sorted(w for _, w in undone) == ["flight"] * n and len(set(undone)) == n
    assert not world.unique(world.settings.dlq_topic)
