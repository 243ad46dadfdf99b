"""Journal limits and ``kwf.journal_length`` (issue 11, item 2)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from structlog.testing import capture_logs

import kwf
from kwf.config import Settings
from kwf import observe

TOPIC = "evolve-limits-out"
kwf.config.output_topics |= {TOPIC}


@kwf.workflow("evolve-counter")
async def counter(arg: Any) -> None:
    """Record the journal's length at each signal; on cancellation, say so."""
    try:
        while True:
            kwf.output_json({"length": kwf.journal_length()}, TOPIC)
            await kwf.suspend("tick")
    except asyncio.CancelledError:
        kwf.output_json({"cleanup": kwf.journal_length()}, TOPIC)
        raise


def tick(eng: Any, n: int) -> None:
    for _ in range(n):
        eng.send("c", json.dumps({"ref": "tick", "value": None}))


def test_journal_length_counts_applied_events_identically_on_replay(make_engine):
    eng = make_engine(counter)
    eng.send("c", "new:{}")
    tick(eng, 3)
    eng.advance(1)  # no timer: nothing applied, nothing counted
    eng.send("c", json.dumps({"ref": "nope", "value": 1}))  # stale: not applied either
    tick(eng, 1)
    assert [r.json()["length"] for r in eng.outputs(TOPIC)] == [0, 1, 2, 3, 4]
    assert len(eng.journal("c").events) == 4


def test_a_long_journal_is_logged_once_and_counted(make_engine):
    eng = make_engine(counter, settings=Settings(journal_warn_events=3, max_journal_events=100))
    eng.send("c", "new:{}")
    counted: list[str] = []

    class Count(observe.Stats):
        def journal_long(self, workflow: str) -> None:
            counted.append(workflow)

    previous = observe.install(Count())
    try:
        with capture_logs() as logs:
            tick(eng, 6)
    finally:
        observe.install(previous)
    warnings = [e for e in logs if e["event"] == "journal_long"]
    assert [(w["thread"], w["events"]) for w in warnings] == [("c", 3)]
    assert "continue_as_new" in warnings[0]["hint"]
    assert counted == ["evolve-counter"]


def test_a_full_journal_fails_the_thread_saying_to_continue_as_new(make_engine):
    eng = make_engine(counter, settings=Settings(journal_warn_events=2, max_journal_events=4))
    eng.send("c", "new:{}")
    tick(eng, 4)
    assert eng.status("c")["status"] == "running"
    tick(eng, 1)  # the fifth event does not fit: the thread fails, its cleanup runs
    assert eng.status("c")["status"] == "failed"
    [error] = eng.outputs("workflow-error")
    assert "KWF_MAX_JOURNAL_EVENTS=4" in error.json() and "kwf.continue_as_new" in error.json()
    assert [r.json() for r in eng.outputs(TOPIC)][-1] == {"cleanup": 5}
    tick(eng, 1)  # later records are ignored, as for any finished thread
    assert len(eng.outputs("workflow-error")) == 1


@kwf.workflow("evolve-patient")
async def patient(arg: Any) -> None:
    """Wait for each signal with a deadline: one cancelled timer per signal."""
    while True:
        async with asyncio.timeout(3600):
            await kwf.suspend("tick")


def test_a_long_loop_of_timeouts_does_not_keep_its_cancelled_timers(make_engine):
    eng = make_engine(patient)
    eng.send("c", "new:{}")
    tick(eng, 300)
    journal = eng.journal("c")
    from kwf.config import Settings
    from kwf.instance import Instance

    rebuilt = Instance.rebuild(patient.__kwf_workflow__, journal, Settings())
    try:  # 301 timeouts were set and cancelled again by the replay; one timer is live
        assert len(rebuilt.loop._timers) < 140
        assert rebuilt.loop.timer_dues() == [journal.time + 3600]
    finally:
        rebuilt.dispose()
