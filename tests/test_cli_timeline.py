"""The history of a thread (``kwf.history``) and its picture, through ``kwf.testing.Engine``."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import kwf
from kwf._timeline import Timeline
from kwf.history import replay
from kwf.testing import Engine
from workflows.approval import approval
from workflows.trip_booking import trip

SVG = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parents[1]


def marks(svg: str, kind: str) -> list[ET.Element]:
    root = ET.fromstring(svg)  # well-formed, or this raises
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == kind]


def timed_out_trip(eng: Engine, key: str) -> None:
    """Car and hotel booked, the flight never answers: the deadline compensates both."""
    eng.send(key, 'new:trip:{"timeoutMs": 1000}')
    for kind in ("car", "hotel"):
        eng.advance(0.25)
        [asked] = [r for r in eng.outputs(f"saga-reserve-{kind}") if r.key == key]
        eng.send(key, json.dumps({"ref": asked.value, "value": {"booked": kind}}))
    eng.advance(1)


def test_history_of_a_finished_saga_has_every_step_and_its_outputs():
    with Engine(workflows=[trip], start_time=1_800_000_000) as eng:
        timed_out_trip(eng, "t1")
        assert eng.journal("t1").finished and not eng.journal("t1").events  # a tombstone
        history = eng.history("t1")
    steps = history.steps
    assert [s.kind for s in steps] == ["start", "resume", "resume", "timer"]
    assert steps[0].timers == (1_800_000_001.0,) and steps[0].pending == ("0:1", "0:2", "0:3")
    assert [s.time - 1_800_000_000 for s in steps] == pytest.approx([0, 0.25, 0.5, 1.0])
    last = [(r.topic, r.value) for r in steps[-1].outputs if r.topic != "workflow-events"]
    assert last == [("saga-cancel-flight", "0:3"), ("saga-cancel-car", "0:1"),
                    ("saga-cancel-hotel", "0:2"), ("workflow-error", '"timeout"')]
    assert history.divergence is None


def test_the_timeline_has_one_mark_per_journal_step_and_renders_inline(tmp_path: Path):
    with Engine(workflows=[trip], start_time=1_800_000_000) as eng:
        timed_out_trip(eng, "t1")
        picture = eng.timeline("t1")
        journal = eng._finished["t1"]
    svg = picture._repr_svg_()
    steps = marks(svg, "step")
    assert len(steps) == len(journal.events) + 1 == 4
    assert [g.get("data-kind") for g in steps] == ["start", "resume", "resume", "timer"]
    assert {g.get("data-ref") for g in marks(svg, "wait")} == {"0:1", "0:2", "0:3"}
    assert len(marks(svg, "timer")) == 1
    outputs = marks(svg, "output")
    assert sum("cancel" in (g.get("data-topic") or "") for g in outputs) == 3
    assert len(outputs) == 6  # three reservations, three cancels
    assert len(marks(svg, "error")) == 1 and not marks(svg, "result")
    assert picture.save(tmp_path / "t.svg").read_text() == svg


def test_a_running_thread_and_a_completed_one():
    with Engine(workflows=[approval], start_time=1_800_000_000) as eng:
        eng.send("a1", 'new:approval:{"subject": "laptop", "remindAfterS": 60}')
        eng.advance(61)
        running = eng.history("a1")
        assert [s.kind for s in running.steps] == ["start", "timer"]
        assert len(marks(eng.timeline("a1").svg, "step")) == 2
        eng.send("a1", '{"ref": "decision", "value": {"approved": true, "by": "approver"}}')
        done = eng.timeline("a1").svg
    assert len(marks(done, "step")) == 3 and len(marks(done, "result")) == 1


def test_replay_names_the_first_step_that_diverges():
    @kwf.workflow("hist-v1")
    async def v1(arg):
        a = await kwf.suspend("a")
        kwf.output(str(a), "hist-out")
        return await kwf.suspend("b")

    @kwf.workflow("hist-v1")
    async def v2(arg):
        a = await kwf.suspend("a")
        kwf.output(f"{a}!", "hist-out")  # the edit: another output after the first resume
        return await kwf.suspend("b")

    kwf.config.output_topics.add("hist-out")
    with Engine(workflows=[v1]) as eng:
        eng.send("h", "new:hist-v1:null")
        eng.send("h", '{"ref": "a", "value": 1}')
        journal = eng.journal("h")
        assert replay(journal, eng.registry.workflows["hist-v1"], eng.settings).divergence is None
        edited = replay(journal, v2.__kwf_workflow__, eng.settings)
    assert edited.divergence is not None and edited.divergence.number == 1
    assert "after resume 'a'" in (edited.divergence.diverged or "")
    assert [s.number for s in edited.steps] == [0, 1]  # it stops at the divergence


def test_the_readme_picture_is_the_one_the_script_draws(tmp_path: Path):
    import runpy

    draw = runpy.run_path(str(ROOT / "docs" / "timeline_trip.py"))["main"]
    draw(tmp_path / "trip.svg")
    assert (tmp_path / "trip.svg").read_text() == (ROOT / "docs" / "timeline-trip.svg").read_text()


def test_without_the_code_or_after_the_end_the_history_says_what_it_lacks():
    with Engine(workflows=[approval]) as eng:
        eng.send("a", "new:approval:{}")
        eng.advance(3 * 86400)  # the reminder
        running = eng.journal("a")
        bare = replay(running, None, eng.settings)
        eng.send("a", '{"ref": "decision", "value": {"approved": false, "by": "approver"}}')
        tombstone = eng.journal("a")
        ended = replay(tombstone, approval.__kwf_workflow__, eng.settings)
    assert not bare.replayed and "not served" in (bare.note or "")
    assert [(s.kind, s.pending, s.outputs) for s in bare.steps] == [
        ("start", ("decision",), ()), ("timer", ("decision",), ())]
    assert len(marks(Timeline(bare, eng.settings).svg, "step")) == 2
    assert not ended.replayed and ended.steps == [] and "completed at step 2" in (ended.note or "")
    svg = Timeline(ended, eng.settings).svg
    assert not marks(svg, "step") and len(marks(svg, "result")) == 1
