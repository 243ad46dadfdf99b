"""Replay equivalence, property-based: a thread rebuilt from its encoded journal after any event
behaves exactly as the live one from then on (outputs, pending ids, timers, status, result)."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kwf
from kwf.journal import encode
from kwf.testing import Engine
from kwf.thread import ThreadState

kwf.config.output_topics |= {"prop-out", "prop-cancel"}


def note(*items):
    kwf.output_json(list(items), "prop-out")


async def reserve(kind):
    ref = kwf.suspend()
    note("reserve", kind, ref.id)
    try:
        value = await ref
    except asyncio.CancelledError:
        kwf.output(ref.id, "prop-cancel")
        raise
    return {"kind": kind, "id": ref.id, "value": value}


@kwf.workflow("prop-saga")
async def saga(arg):
    compensations = []

    async def booked(kind):
        result = await reserve(kind)
        compensations.append(result)
        return result

    async def timeout():
        await asyncio.sleep(10)
        raise TimeoutError("timeout")

    try:
        return await kwf.race([kwf.all([booked("car"), booked("hotel"), booked("flight")]),
                               timeout()])
    except BaseException:
        for c in compensations:
            note("compensate", c["id"])
        raise


@kwf.workflow("prop-cart")
async def cart(arg):
    items: dict[str, int] = {}
    reminded = False
    while True:
        async def abandon():
            await asyncio.sleep(10)
            return {"type": "timeout"}
        signal = await kwf.race([kwf.suspend("main"), abandon()])
        kind = signal.get("type") if isinstance(signal, dict) else None
        if kind == "timeout":
            if reminded:
                return "abandoned"
            reminded = True
            note("reminder")
        elif kind == "add":
            items[str(signal.get("id"))] = items.get(str(signal.get("id")), 0) + 1
        elif kind == "checkout":
            return items
        else:
            note("unknown signal", signal)


@kwf.workflow("prop-nested")
async def nested(arg):
    async def wait(name):
        return await kwf.suspend(name)
    return await kwf.all([kwf.race([wait("a"), wait("b")]),
                          kwf.race([wait("c"), asyncio.sleep(5, result="slept")]),
                          wait("d")])


@kwf.workflow("prop-loop")
async def loop(arg):
    seen = []
    for i in range(6):
        try:
            async with asyncio.timeout(3):
                seen.append(await kwf.suspend("sig"))
        except TimeoutError:
            seen.append(f"tick {i} at {kwf.now().timestamp()} {kwf.random()}")
        note(i, seen[-1])
    return seen


@kwf.workflow("prop-group")
async def group(arg):
    async def child(name):
        try:
            value = await kwf.suspend(name)
        except asyncio.CancelledError:
            note("cancelled", name)
            raise
        if value == "fail":
            raise ValueError(f"{name} failed")
        return value

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(child(n)) for n in ("x", "y", "z")]
    except* ValueError as eg:
        note("group failed", sorted(str(e) for e in eg.exceptions))
        tasks = []
    return [t.result() for t in tasks] or "failed"


# The thread's new: sits at offset 1 (a dead letter takes offset 0): its first ids are "1:<n>".
REFS = {
    "prop-saga": ["1:1", "1:2", "1:3", "2:1", "9:9"],
    "prop-cart": ["main", "1:1", "x"],
    "prop-nested": ["a", "b", "c", "d", "e"],
    "prop-loop": ["sig", "1:1"],
    "prop-group": ["x", "y", "z", "w"],
}
PAYLOADS = st.one_of(st.none(), st.integers(-3, 3), st.sampled_from(["fail", "ok", ""]),
                     st.fixed_dictionaries({"type": st.sampled_from(["add", "checkout", "x"]),
                                            "id": st.integers(0, 2)}))


def _event(draw_refs: list[str]) -> st.SearchStrategy[tuple]:
    return st.one_of(
        st.tuples(st.just("value"), st.sampled_from(draw_refs), PAYLOADS),
        st.tuples(st.just("error"), st.sampled_from(draw_refs), PAYLOADS),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 2.5, 3, 5, 10, 11])),
        st.tuples(st.just("cancel")),
        st.tuples(st.just("again")),
        st.tuples(st.just("pending"), st.integers(0, 3), PAYLOADS),  # an id the thread made
    )


def _resolve(live: Engine, event: tuple, previous: tuple | None) -> tuple:
    """``again`` as the previous event; ``pending`` as a resume of one of the live thread's
    pending ids (offset ids made by records and timers), the same for both engines."""
    if event[0] == "again" and previous is not None:
        return previous
    if event[0] == "pending":
        pending = (live.status("t") or {}).get("pending") or ["none"]
        return ("value", pending[event[1] % len(pending)], event[2])
    return event


def _send(eng: Engine, event: tuple) -> list:
    if event[0] == "value":
        return eng.send("t", json.dumps({"ref": event[1], "value": event[2]}))
    if event[0] == "error":
        return eng.send("t", json.dumps({"ref": event[1], "error": event[2]}))
    if event[0] == "advance":
        return eng.advance(event[1])
    if event[0] == "cancel":
        return eng.send("t", "cancel:")
    return []


def _view(eng: Engine) -> tuple:
    j = eng.journal("t")
    return (eng.status("t"), j and (j.step, j.seq, j.status, j.timers, j.result))


def check_replay_equivalence(name: str, events: list[tuple]) -> None:
    live = Engine(workflows=[kwf.registry.get(name)], start_time=100.0)
    rebuilt = Engine(workflows=[kwf.registry.get(name)], start_time=100.0)
    try:
        for eng in (live, rebuilt):  # shifts the thread's offsets: ids are not step numbers
            assert eng.send("u", "cancel:")[0].topic == eng.settings.dlq_topic
        assert live.send("t", "new:{}") == rebuilt.send("t", "new:{}")
        previous = None
        for drawn in events:
            event = _resolve(live, drawn, previous)
            state = rebuilt.threads.get("t")
            if state is not None:  # replace the thread by one restored from encoded bytes
                state.evict()
                rebuilt.threads["t"] = ThreadState.restore(encode(state.journal), rebuilt.ctx)
            assert _send(live, event) == _send(rebuilt, event), event
            assert _view(live) == _view(rebuilt)
            previous = event
    finally:
        live.close()
        rebuilt.close()


@pytest.mark.parametrize("name", sorted(REFS))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rebuilt_thread_continues_like_the_live_one(name, data):
    events = data.draw(st.lists(_event(REFS[name]), max_size=14))
    check_replay_equivalence(name, events)


def test_property_reaches_every_ending():
    """Guard against a vacuous property: the workflows do finish, fail and cancel under it."""
    check_replay_equivalence("prop-saga", [("value", "1:1", 1), ("value", "1:2", 2),
                                           ("value", "1:3", 3)])
    check_replay_equivalence("prop-group", [("value", "x", "fail")])
    check_replay_equivalence("prop-loop", [("advance", 3), ("value", "sig", 1), ("cancel",)])
    check_replay_equivalence("prop-cart", [("advance", 10), ("advance", 10)])
