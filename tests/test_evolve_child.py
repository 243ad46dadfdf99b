"""Child workflows: ``kwf.child`` and ``kwf.start_child`` (issue 11, item 4).

Every test runs live and with replay before every event (``make_engine``); parent and child
talk only through ``workflow-resume`` records, which ``Engine`` loops back as Kafka would.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import kwf

TOPIC = "evolve-child-out"
kwf.config.output_topics |= {TOPIC}


@kwf.workflow("evolve-book")
async def book(arg: Any) -> Any:
    """A child: reserve ``what``, wait for "confirm"; undo if cancelled, fail on "fail"."""
    kwf.output_json({"reserve": arg["what"]}, TOPIC)
    try:
        value = await kwf.suspend("confirm")
    except asyncio.CancelledError:
        kwf.output_json({"undo": arg["what"]}, TOPIC)
        raise
    if value == "fail":
        msg = f"{arg['what']} is unavailable"
        raise RuntimeError(msg)
    if value == "again":
        kwf.continue_as_new({"what": arg["what"] + "+"})
    return {"booked": arg["what"]}


@kwf.workflow("evolve-trip")
async def trip(arg: Any) -> Any:
    """A parent: a saga of children, one per kind; ``deadline`` seconds for all of them."""
    tasks = [kwf.child(arg.get("workflow", "evolve-book"), {"what": kind}) for kind in arg["kinds"]]
    try:
        if "deadline" in arg:
            return await kwf.race([kwf.all(tasks), asyncio.sleep(arg["deadline"])]) or "late"
        return await kwf.all(tasks)
    except kwf.ChildFailed as e:
        return {"child": e.child, "workflow": e.workflow, "status": e.status, "error": e.error}


@kwf.workflow("evolve-parent")
async def parent(arg: Any) -> Any:
    """Try what a test asks: a child with a given id or argument, or fire and forget."""
    if arg["do"] == "bad-arg":
        try:
            kwf.child("evolve-book", {"what": {1, 2}})
        except TypeError as e:
            return {"refused-at-call": str(e)}
    if arg["do"] == "forget":
        child_id = kwf.start_child("evolve-book", {"what": "gift"})
        return {"started": child_id}
    try:
        return await kwf.child("evolve-book", {"what": "x"}, id=arg.get("id"))
    except kwf.ChildFailed as e:
        return {"status": e.status, "error": e.error}


def confirm(eng: Any, child: str, value: Any = "ok") -> None:
    eng.send(child, json.dumps({"ref": "confirm", "value": value}))


def written(eng: Any) -> list[Any]:
    return [r.json() for r in eng.outputs(TOPIC)]


def children(eng: Any, key: str) -> dict[str, str]:
    return eng.status(key).get("children", {})


def test_a_saga_of_children_completes_with_their_results_and_shows_the_links(make_engine):
    eng = make_engine(trip, book)
    eng.send("p1", 'new:evolve-trip:{"kinds": ["car", "hotel"]}')
    kids = children(eng, "p1")
    assert sorted(kids.values()) == [f"p1/{ref}" for ref in sorted(kids)]  # <parent>/<ref>
    for ref, kid in kids.items():
        assert eng.status(kid)["parent"] == {"thread": "p1", "ref": ref}
        assert eng.status(kid)["status"] == "running"
    for kid in kids.values():
        confirm(eng, kid)
    assert eng.result("p1") == [{"booked": "car"}, {"booked": "hotel"}]
    assert "children" not in eng.status("p1")


def test_a_failed_child_fails_the_await_and_the_others_are_cancelled_and_undone(make_engine):
    eng = make_engine(trip, book)
    eng.send("p1", 'new:evolve-trip:{"kinds": ["car", "hotel", "flight"]}')
    car, hotel, flight = sorted(children(eng, "p1").values())
    confirm(eng, car)
    confirm(eng, hotel, "fail")
    assert eng.result("p1") == {"child": hotel, "workflow": "evolve-book", "status": "failed",
                                "error": "hotel is unavailable"}
    assert {"undo": "flight"} in written(eng) and {"undo": "car"} not in written(eng)
    assert eng.status(flight)["status"] == "cancelled"


def test_cancelling_the_await_cancels_the_child_whose_compensation_runs(make_engine):
    eng = make_engine(trip, book)
    eng.send("p1", 'new:evolve-trip:{"kinds": ["car"], "deadline": 60}')
    (car,) = children(eng, "p1").values()
    eng.advance(60)  # the deadline wins the race: the child is cancelled
    assert eng.result("p1") == "late"
    assert written(eng) == [{"reserve": "car"}, {"undo": "car"}]
    assert eng.status(car)["status"] == "cancelled"
    confirm(eng, car)  # too late: ignored by the finished child, nothing reaches the parent
    assert eng.result("p1") == "late"


def test_cancelling_the_parent_cancels_its_children(make_engine):
    eng = make_engine(trip, book)
    eng.send("p1", 'new:evolve-trip:{"kinds": ["car", "hotel"]}')
    eng.send("p1", "cancel:")
    assert eng.status("p1")["status"] == "cancelled"
    assert sorted(w["undo"] for w in written(eng) if "undo" in w) == ["car", "hotel"]


def test_a_child_that_continues_as_new_still_answers_its_parent(make_engine):
    eng = make_engine(trip, book)
    eng.send("p1", 'new:evolve-trip:{"kinds": ["car"]}')
    (car,) = children(eng, "p1").values()
    confirm(eng, car, "again")
    assert eng.status(car)["parent"]["thread"] == "p1"
    confirm(eng, car)
    assert eng.result("p1") == [{"booked": "car+"}]


def test_an_unknown_child_workflow_is_refused_and_the_await_says_why(make_engine):
    eng = make_engine(trip, book)
    eng.send("p1", 'new:evolve-trip:{"kinds": ["car"], "workflow": "evolve-nope"}')
    result = eng.result("p1")
    assert (result["status"], result["workflow"]) == ("refused", "evolve-nope")
    assert "unknown workflow 'evolve-nope'" in result["error"]
    [dead] = eng.outputs("workflow-dlq")
    assert dead.header("kwf-error").startswith("child-refused: unknown workflow")


def test_a_child_id_held_by_another_thread_is_refused_not_replaced(make_engine):
    eng = make_engine(parent, trip, book)
    eng.send("other", 'new:evolve-trip:{"kinds": ["car"]}')
    eng.send("p1", 'new:evolve-parent:{"do": "child", "id": "other"}')
    result = eng.result("p1")
    assert result["status"] == "refused"
    assert "already thread of workflow 'evolve-trip'" in result["error"]
    assert eng.status("other")["workflow"] == "evolve-trip"
    assert eng.status("other")["status"] == "running"


def test_a_repeated_child_start_is_ignored(make_engine):
    eng = make_engine(parent, book)
    eng.send("p1", 'new:evolve-parent:{"do": "child", "id": "kid"}')
    [start] = [r for r in eng.outputs("workflow-resume") if r.key == "kid"]
    eng.send("kid", start.value)  # at-least-once: the parent's record may come twice
    assert written(eng) == [{"reserve": "x"}]
    confirm(eng, "kid")
    assert eng.result("p1") == {"booked": "x"}


def test_a_non_json_argument_fails_at_the_call(make_engine):
    eng = make_engine(parent, book)
    eng.send("p1", 'new:evolve-parent:{"do": "bad-arg"}')
    assert "not JSON" in eng.result("p1")["refused-at-call"]
    assert not [r for r in eng.outputs("workflow-resume") if r.key != "p1"]


def test_fire_and_forget_child_outlives_its_parent(make_engine):
    eng = make_engine(parent, book)
    eng.send("p1", 'new:evolve-parent:{"do": "forget"}')
    kid = eng.result("p1")["started"]
    assert kid.startswith("p1/") and eng.status(kid)["parent"] == {"thread": "p1", "ref": None}
    confirm(eng, kid)
    assert eng.result(kid) == {"booked": "gift"}


@pytest.mark.parametrize("value", ['child:[]', 'child:{"workflow": "x"}',
                                   'child:{"workflow": "a b", "parent": "p"}'])
def test_a_malformed_child_record_is_dead_lettered(make_engine, value):
    eng = make_engine(book)
    eng.send("k", value)
    [dead] = eng.outputs("workflow-dlq")
    assert dead.header("kwf-error").startswith("bad-child")
