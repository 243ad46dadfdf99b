"""The seed runtime's behaviours (seed-runtime.md checklist rows 1-26), in both engine modes."""

from __future__ import annotations

import asyncio
import json

from kwf_support import values

import kwf
from kwf.config import Settings
from kwf.testing import Engine

kwf.config.output_topics |= {"rt-out", "rt-cancelled", "workflow-scheduler"}


@kwf.workflow("rt-echo")
async def echo(arg):
    """Row 1: the start JSON is the argument; the return value is the result."""
    return {"got": arg, "thread": kwf.thread_id(), "step": kwf.step_id()}


@kwf.workflow("rt-two")
async def two(arg):
    """The seed's rt fixture: two named suspends, each value written out, then a result."""
    for _ in range(2):
        kwf.output(None, "rt-out", f"{kwf.thread_id()}|testRef")
        value = await kwf.suspend("testRef")
        kwf.output_json(value, "rt-out")
    return "suspendResumeTestRet"


@kwf.workflow("rt-ids")
async def ids(arg):
    """Auto ids are <step>:<n>; several pending at once."""
    a, b = kwf.suspend(), kwf.suspend()
    kwf.output_json([a.id, b.id], "rt-out")
    first = await a
    c = kwf.suspend()
    kwf.output_json([c.id, kwf.step_id()], "rt-out")
    return [first, await b, await c]


@kwf.workflow("rt-error")
async def catches(arg):
    """Row 7: an error resume raises RemoteError carrying the raw JSON payload."""
    try:
        await kwf.suspend("x")
    except kwf.RemoteError as e:
        kwf.output_json({"payload": e.payload, "str": str(e)}, "rt-out")
    await kwf.suspend("y")


@kwf.workflow("rt-cancel")
async def cancellable(arg):
    """Rows 24-26: a cancel reaches the bottom-most await through nested calls and combinators."""
    async def inner(name):
        ref = kwf.suspend(name)
        try:
            return await ref
        except asyncio.CancelledError:
            kwf.output(name, "rt-cancelled")
            raise

    async def middle():
        return await kwf.all([inner("a"), inner("b")])

    task = asyncio.ensure_future(middle())
    other = kwf.suspend("stop")
    await other
    kwf.cancel(task)
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled inner"


def test_start_argument_and_result(make_engine):
    """Rows 1, 2, 16, 19: new:<json> runs main with the JSON; its value goes to workflow-result."""
    eng = make_engine(echo)
    eng.send("t1", 'new:{"a": [1, 2]}')
    assert eng.result("t1") == {"got": {"a": [1, 2]}, "thread": "t1", "step": 0}
    assert eng.status("t1")["status"] == "completed"


def test_named_suspend_resume_twice(make_engine):
    """Rows 5, 6, 12, 14: the seed's suspendResumeTest, with custom keys and named ids."""
    eng = make_engine(two)
    out = eng.send("t1", "new:null")
    assert [(r.topic, r.key, r.value) for r in out if r.topic == "rt-out"] == [
        ("rt-out", "t1|testRef", None)]
    eng.send("t1", '{"ref": "testRef", "value": {"n": 1}}')
    eng.send("t1", '{"ref": "testRef", "value": 2}')
    assert values(eng, "rt-out") == [None, '{"n":1}', None, "2"]
    assert eng.result("t1") == "suspendResumeTestRet"


def test_auto_ids_follow_step_and_order(make_engine):
    """Row 5, 9: ids are <step>:<n>, counted from 1 within the step; many can be pending."""
    eng = make_engine(ids)
    eng.send("t1", "new:{}")
    assert eng.status("t1")["pending"] == ["0:1", "0:2"]
    eng.send("t1", '{"ref": "0:1", "value": "A"}')
    assert json.loads(values(eng, "rt-out")[1]) == ["1:1", 1]
    eng.send("t1", '{"ref": "1:1", "value": "C"}')
    eng.send("t1", '{"ref": "0:2"}')
    assert eng.result("t1") == ["A", None, "C"]


def test_error_resume_raises_remote_error_with_raw_payload(make_engine):
    """Row 7: the payload stays raw JSON; str() is the string itself, or its JSON text."""
    eng = make_engine(catches)
    eng.send("t1", "new:{}")
    eng.send("t1", '{"ref": "x", "error": {"code": 7}}')
    eng.send("t2", "new:{}")
    eng.send("t2", '{"ref": "x", "error": "no car"}')
    got = [json.loads(v) for v in values(eng, "rt-out")]
    assert got == [{"payload": {"code": 7}, "str": '{"code":7}'},
                   {"payload": "no car", "str": "no car"}]


def test_uncaught_error_goes_to_workflow_error(make_engine):
    """Row 17: workflow-error holds JSON of str(exception), with its type in a header."""
    eng = make_engine(catches)
    eng.send("t1", "new:{}")
    eng.send("t1", '{"ref": "x", "value": 1}')
    eng.send("t1", '{"ref": "y", "error": "timeout"}')
    [err] = eng.outputs("workflow-error")
    assert err.value == '"timeout"'
    assert err.header("kwf-error-type") == "RemoteError"
    assert eng.status("t1")["status"] == "failed"


def test_unknown_ref_on_live_thread_writes_nothing(make_engine):
    """Row 8: stale or unknown refs change nothing: no output, the step does not move."""
    eng = make_engine(ids)
    eng.send("t1", "new:{}")
    before = eng.journal("t1").step
    assert eng.send("t1", '{"ref": "9:9", "value": 1}') == []
    assert eng.send("t1", '{"ref": "0:1", "value": "A"}') != []
    assert eng.send("t1", '{"ref": "0:1", "value": "again"}') == []
    assert eng.journal("t1").step == before + 1


def test_records_for_unknown_threads_are_dead_lettered(make_engine):
    """Row 4 (kwf's answer): a resume for a thread that does not exist goes to workflow-dlq."""
    eng = make_engine(ids)
    [dlq] = eng.send("nobody", '{"ref": "0:1", "value": 1}')
    assert dlq.topic == "workflow-dlq" and dlq.value == '{"ref": "0:1", "value": 1}'
    assert dlq.header("kwf-error").startswith("unknown-thread:")


def test_new_replaces_a_live_thread_without_compensations(make_engine):
    """Row 3: new: discards the old thread silently; steps and kwf-seq continue."""
    eng = make_engine(cancellable, ids)
    eng.send("t1", "new:rt-cancel:{}")
    seq_before = eng.journal("t1").seq
    out = eng.send("t1", "new:rt-ids:{}")
    assert values(eng, "rt-cancelled") == []
    assert [int(r.header("kwf-seq")) for r in out] == list(range(seq_before + 1,
                                                              seq_before + 1 + len(out)))
    assert eng.status("t1")["pending"] == ["1:1", "1:2"]
    # A late reply for the old thread's ids cannot resume the new one.
    assert eng.send("t1", '{"ref": "0:1", "value": 1}') == []


def test_init_starts_only_once(make_engine):
    eng = make_engine(ids)
    eng.send("t1", "init:{}")
    assert eng.send("t1", "init:{}") == []
    assert eng.journal("t1").step == 0


def test_finished_thread_keeps_a_tombstone_then_is_discarded(make_engine):
    """Row 11: records for a finished thread are ignored until its retention ends."""
    eng = make_engine(echo, settings=Settings(tombstone_retention_s=100))
    eng.send("t1", "new:1")
    assert eng.send("t1", '{"ref": "0:1", "value": 1}') == []
    assert eng.send("t1", "init:2") == []
    out = eng.advance(101)
    assert [(r.topic, r.key, r.value) for r in out] == [("workflow-events", "t1", None)]
    assert eng.journal("t1") is None
    [dlq] = eng.send("t1", '{"ref": "0:1", "value": 1}')
    assert dlq.header("kwf-error").startswith("unknown-thread")


def test_output_to_undeclared_topic_fails_the_workflow(make_engine):
    """Row 15: only declared topics; the error names the topic and the fix."""
    @kwf.workflow("rt-undeclared")
    async def undeclared(arg):
        kwf.output("x", "nowhere")

    eng = make_engine(undeclared)
    eng.send("t1", "new:{}")
    [err] = eng.outputs("workflow-error")
    assert "nowhere" in err.json() and "kwf.config.output_topics" in err.json()


def test_result_and_error_topics_are_configurable(make_engine):
    """Row 18."""
    eng = make_engine(echo, settings=Settings(result_topic="my-results"))
    eng.send("t1", "new:{}")
    assert len(eng.outputs("my-results")) == 1 and eng.outputs("workflow-result") == []


def test_cancel_reaches_the_bottom_most_await(make_engine):
    """Rows 24-26: cancelling a task cancels nested awaits; their except blocks still output."""
    eng = make_engine(cancellable)
    eng.send("t1", "new:{}")
    eng.send("t1", '{"ref": "stop"}')
    assert values(eng, "rt-cancelled") == ["a", "b"]
    assert eng.result("t1") == "cancelled inner"


def test_cancel_record_cancels_the_thread(make_engine):
    """cancel: runs the compensations and ends the thread as cancelled, with no result."""
    eng = make_engine(cancellable)
    eng.send("t1", "new:{}")
    eng.send("t1", "cancel:")
    assert eng.status("t1")["status"] == "cancelled"
    assert eng.outputs("workflow-result") == eng.outputs("workflow-error") == []


def test_swallowed_cancel_completes(make_engine):
    @kwf.workflow("rt-stubborn")
    async def stubborn(arg):
        try:
            await kwf.suspend("x")
        except asyncio.CancelledError:
            return "refused"

    eng = make_engine(stubborn)
    eng.send("t1", "new:{}")
    eng.send("t1", 'cancel:"please"')
    assert eng.result("t1") == "refused"


def test_pending_tasks_are_cancelled_when_main_returns(make_engine):
    """Their cleanup output comes before the result, in the same step."""
    @kwf.workflow("rt-leftover")
    async def leftover(arg):
        async def background():
            try:
                await asyncio.sleep(1000)
            except asyncio.CancelledError:
                kwf.output("cleanup", "rt-out")
                raise
        asyncio.create_task(background())
        await kwf.suspend("go")
        return "done"

    eng = make_engine(leftover)
    eng.send("t1", "new:{}")
    out = eng.send("t1", '{"ref": "go"}')
    assert [r.topic for r in out] == ["rt-out", "workflow-result", "workflow-events"]
    assert eng.status("t1")["timers"] == []


def test_durable_timer_and_scheduler_topic(make_engine):
    """asyncio.sleep is a durable timer; the seed's scheduler topic works through loopback."""
    @kwf.workflow("rt-timers")
    async def timers(arg):
        await asyncio.sleep(10)
        ref = kwf.suspend()
        kwf.output("5000", "workflow-scheduler", f"{kwf.thread_id()}|{json.dumps({'ref': ref.id})}")
        await ref
        return kwf.now().timestamp()

    eng = make_engine(timers, start_time=1000.0)
    eng.send("t1", "new:{}")
    assert eng.status("t1")["timers"] == [1010.0]
    eng.advance(9.9)
    assert eng.status("t1")["step"] == 0
    eng.advance(0.1)
    assert eng.status("t1")["pending"] == ["0.1:1"]  # a timer's step: no record, no offset
    eng.advance(5)
    assert eng.result("t1") == 1015.0


def test_scheduler_cancel_with_zero(make_engine):
    eng = make_engine(two)
    eng.send("t1", "new:{}")
    eng.send("t1|x", "1000", topic="workflow-scheduler")
    eng.send("t1|x", "0", topic="workflow-scheduler")
    assert eng.advance(5) == []
    assert eng.schedules == {}


def test_deterministic_random_and_uuid(make_engine):
    @kwf.workflow("rt-random")
    async def rand(arg):
        a = [kwf.random(), str(kwf.uuid4())]
        await kwf.suspend("x")
        return a + [kwf.random()]

    results = []
    for _ in range(2):
        eng = make_engine(rand)
        eng.send("t1", "new:{}")
        eng.send("t1", '{"ref": "x"}')
        results.append(eng.result("t1"))
    assert results[0] == results[1] and results[0][0] != results[0][2]


def test_outputs_kafka_would_refuse_fail_the_workflow_not_the_engine(make_engine):
    """An oversized value or a bad key fails that workflow at the call; the engine goes on."""
    @kwf.workflow("rt-big")
    async def big(arg):
        try:
            kwf.output("x" * 2000, "rt-out")
        except ValueError as e:
            kwf.output(str(e).split(" (")[0], "rt-out")
        kwf.output("v", "rt-out", key=42)

    @kwf.workflow("rt-big-result")
    async def big_result(arg):
        return "y" * 2000

    eng = make_engine(big, echo, big_result, settings=Settings(max_payload_bytes=1000))
    eng.send("t3", "new:rt-big-result:{}")
    assert "over KWF_MAX_PAYLOAD_BYTES" in eng.outputs("workflow-error")[0].json()
    eng.send("t1", "new:rt-big:{}")
    eng.send("t2", "new:rt-echo:{}")
    assert values(eng, "rt-out") == ["kwf.output of 2000 bytes to 'rt-out' is over the limit of 1000"]
    err = eng.outputs("workflow-error")[-1]
    assert err.key == "t1" and err.header("kwf-error-type") == "TypeError"
    assert eng.status("t2")["status"] == "completed"


def test_engine_works_inside_a_running_event_loop_as_in_a_notebook():
    """Jupyter runs an asyncio loop: Engine must step workflows on their own loops inside it,
    and give the outer loop back untouched."""
    async def notebook_cell():
        outer = asyncio.get_running_loop()
        eng = Engine(workflows=[two])
        eng.send("t1", "new:{}")
        eng.send("t1", '{"ref": "testRef", "value": 1}')
        eng.send("t1", '{"ref": "testRef", "value": 2}')
        assert asyncio.get_running_loop() is outer
        await asyncio.sleep(0)  # the outer loop still runs
        eng.close()
        return eng.result("t1")

    assert asyncio.run(notebook_cell()) == "suspendResumeTestRet"
