"""Replay reproduces every byte: set order across processes, divergence, disposal."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kwf_support import values

import kwf
from kwf import journal as journal_codec
from kwf.testing import Engine

kwf.config.output_topics |= {"det-out"}
HERE = Path(__file__).parent


@kwf.workflow("det-sets")
async def sets(arg):
    """Iteration and cancellation order inside asyncio.wait and TaskGroup come from sets."""
    async def child(i):
        try:
            return await kwf.suspend(f"c{i}")
        except asyncio.CancelledError:
            kwf.output(f"cancelled {i}", "det-out")
            raise

    tasks = [asyncio.ensure_future(child(i)) for i in range(12)]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:  # a set: order follows hashes
        kwf.output(f"done {task.result()}", "det-out")
    for task in tasks:
        task.cancel()
    await asyncio.sleep(0)

    async def failing():
        await asyncio.sleep(5)
        raise ValueError("child failed")

    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(12, 24):
                tg.create_task(child(i))
            tg.create_task(failing())
    except* ValueError:
        kwf.output("group failed", "det-out")
    return "ok"


def _drive_sets(split: bool, journal_in: bytes | None = None) -> tuple[list[str], bytes]:
    """Run the set-order workflow; optionally stop half way and hand over the journal."""
    eng = Engine(workflows=[sets])
    if journal_in is None:
        eng.send("t1", "new:{}")
        for i in (3, 7, 5):
            eng.send("t1", json.dumps({"ref": f"c{i}", "value": i}), timestamp=0)
        if split:
            return values(eng, "det-out"), journal_codec.encode(eng.journal("t1"))
    else:
        from kwf.thread import ThreadState
        eng.threads["t1"] = ThreadState.restore(journal_in, eng.ctx)
    eng.advance(10)
    return values(eng, "det-out"), b""


def _in_fresh_interpreter(mode: str, data: bytes = b"") -> dict:
    """Run ``_drive_sets`` in a new Python, after allocating junk so object ids differ."""
    code = (
        "import json, random, sys; junk = [object() for _ in range(random.randrange(1, 5000))];"
        "import test_determinism as t;"
        f"mode = {mode!r}; data = bytes.fromhex({data.hex()!r}) or None;"
        "outs, j = t._drive_sets(mode == 'split', data);"
        "print(json.dumps({'outputs': outs, 'journal': j.hex()}))"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE), "PYTHONHASHSEED": "random"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True, cwd=HERE)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_set_order_is_identical_across_processes():
    """The same workflow, run in different interpreters, writes identical bytes in identical
    order, although done-sets and TaskGroup cancellation iterate sets."""
    runs = [_in_fresh_interpreter("whole")["outputs"] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert "group failed" in runs[0] and len([o for o in runs[0] if o.startswith("cancelled")]) > 12


def test_rebuild_in_another_process_continues_identically():
    """A journal written in one process, replayed in another, continues as the live one did."""
    whole = _in_fresh_interpreter("whole")["outputs"]
    first = _in_fresh_interpreter("split")
    second = _in_fresh_interpreter("rebuild", bytes.fromhex(first["journal"]))
    assert first["outputs"] + second["outputs"] == whole


# -- divergence ---------------------------------------------------------------------------
async def _v1(arg):
    a = await kwf.suspend("a")
    kwf.output(f"a={a}", "det-out")
    await kwf.suspend("b")
    return "v1"


async def _v2(arg):  # the same workflow after an incompatible edit: an extra output
    a = await kwf.suspend("a")
    kwf.output(f"a={a}", "det-out")
    kwf.output("new line", "det-out")
    await kwf.suspend("b")
    return "v2"


def test_changed_code_parks_the_thread_and_spares_the_others():
    kwf.workflow("det-evolving")(_v1)
    with Engine(workflows=[kwf.registry.get("det-evolving")]) as eng:
        for t in ("t1", "t2"):
            eng.send(t, "new:{}")
        eng.send("t1", '{"ref": "a", "value": 1}')
        eng.evict()
        kwf.workflow("det-evolving")(_v2)
        eng.registry.workflows["det-evolving"] = kwf.registry.get("det-evolving")
        out = eng.send("t1", '{"ref": "b"}')
        [error] = [r for r in out if r.topic == "workflow-error"]
        assert error.header("kwf-error-type") == "NonDeterminismError"
        reason = error.json()
        assert "thread 't1' step 1" in reason and "2 outputs" in reason and "3 outputs" in reason
        assert eng.status("t1")["status"] == "failed" and "diverged" in eng.status("t1")["error"]
        assert eng.send("t1", '{"ref": "b"}') == []  # parked: ignored, not resumed
        eng.send("t2", '{"ref": "a", "value": 2}')  # t2 has no journaled step 1: fine
        eng.send("t2", '{"ref": "b"}')
        assert eng.result("t2") == "v2"


def test_changed_suspend_is_a_divergence():
    async def v1(arg):
        await kwf.suspend("a")
        await kwf.suspend("b")

    async def v2(arg):
        await kwf.suspend("a")
        await asyncio.sleep(60)

    kwf.workflow("det-sleepy")(v1)
    with Engine(workflows=[kwf.registry.get("det-sleepy")], max_live=0) as eng:
        eng.send("t1", "new:{}")
        eng.send("t1", '{"ref": "a"}')
        kwf.workflow("det-sleepy")(v2)
        eng.registry.workflows["det-sleepy"] = kwf.registry.get("det-sleepy")
        eng.send("t1", '{"ref": "b"}')
        status = eng.status("t1")
        assert status["status"] == "failed" and "pending ['b']" in status["error"]


# -- disposal -----------------------------------------------------------------------------
@kwf.workflow("det-finally")
async def with_finally(arg):
    async def holder():
        try:
            await asyncio.sleep(3600)
        finally:
            kwf.output(f"finally of {arg['me']}", "det-out")

    asyncio.ensure_future(holder())
    try:
        await kwf.suspend("x")
    except asyncio.CancelledError:
        kwf.output(f"cancelled {arg['me']}", "det-out")
        raise
    finally:
        kwf.output(f"main finally of {arg['me']}", "det-out")
    return "ok"


def _check_attribution(eng: Engine) -> None:
    for rec in eng.outputs("det-out"):
        assert rec.value.endswith(f"of {rec.header('kwf-thread')}") or rec.value.endswith(
            rec.header("kwf-thread"))


@pytest.mark.parametrize("how", ["evict", "replace", "rebuild", "drop-engine"])
def test_disposed_instances_never_output(how):
    """Evicted, replaced or rebuilt instances are closed on the spot; nothing they do in
    finally/except blocks is emitted, then or later under another thread."""
    eng = Engine(workflows=[with_finally])
    eng.send("a", 'new:{"me": "a"}')
    eng.send("b", 'new:{"me": "b"}')
    before = len(eng.outputs())
    if how == "evict":
        eng.evict()
    elif how == "replace":
        eng.send("a", 'new:{"me": "a"}')
    elif how == "rebuild":
        eng.evict()
        eng.send("a", '{"ref": "nothing"}')  # rebuilds a, stale ref: no step
    else:
        other = Engine(workflows=[with_finally])
        other.send("z", 'new:{"me": "z"}')
        del other
    gc.collect()
    eng.send("b", '{"ref": "x"}')  # b finishes: its own finally blocks run, under b
    gc.collect()
    new = eng.outputs()[before:]
    assert [r.value for r in new if r.topic == "det-out" and "of a" in r.value] == []
    assert all(r.header("kwf-thread") in ("a", "b") for r in new)
    assert [r.value for r in new if r.topic == "det-out"] == [
        "main finally of b", "finally of b"]
    _check_attribution(eng)
    eng.close()


def test_finished_thread_cancels_leftovers_before_result():
    with Engine(workflows=[with_finally]) as eng:
        eng.send("a", 'new:{"me": "a"}')
        out = eng.send("a", '{"ref": "x"}')
        assert [(r.topic, r.value) for r in out][:3] == [
            ("det-out", "main finally of a"), ("det-out", "finally of a"),
            ("workflow-result", '"ok"')]


def test_divergence_found_while_firing_a_timer_before_a_record_parks_the_thread():
    """The dataflow's path: a record arrives after a timer's due time (the wall-clock notify ran
    late), the thread is rebuilt to fire the timer first, and its replay diverges: it is parked
    with its error records, and the record is not dead-lettered as an engine error."""
    from kwf.config import Settings
    from kwf.protocol import Incoming, Resume, parse_command
    from kwf.registry import Registry
    from kwf.thread import Context, ThreadState

    async def v1(arg):
        await kwf.suspend("x")
        await asyncio.sleep(10)
        await kwf.suspend("a")

    async def v2(arg):
        await kwf.suspend("x")
        kwf.output("changed", "det-out")
        await asyncio.sleep(10)
        await kwf.suspend("a")

    def rec(value, t):
        return Incoming("workflow-resume", "t1", value, t, 0, int(t))

    ctx = Context(Registry([kwf.workflow("det-timed")(v1)]), Settings())
    state = ThreadState("t1", ctx)
    state.on_command(rec("new:{}", 0.0), parse_command("new:{}"))
    state.on_command(rec('{"ref": "x"}', 1.0), Resume("x"))
    state.evict()
    ctx.registry.workflows["det-timed"] = kwf.registry.get(kwf.workflow("det-timed")(v2)
                                                           .__kwf_workflow__.name)
    out = state.on_command(rec('{"ref": "a"}', 30.0), Resume("a"))
    assert [r.topic for r in out] == ["workflow-error", "workflow-events"]
    assert state.journal.status == "failed" and "diverged" in out[0].json()
