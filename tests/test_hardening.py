"""Hardening found by review: workflow code and input that once crashed, hung or fooled the
engine. Each docstring says what went wrong before the fix, so the next change keeps it fixed."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

import kwf
from kwf.protocol import loads as strict_loads
from kwf.testing import Engine

kwf.config.output_topics |= {"rv-out"}

FUTURE = 4_000_000_000.0  # as tests/test_flow.py: no wall-clock timer fires during a run


def _live_and_replayed(wf, msgs):
    """Outputs (topic, value) of the same records, live and rebuilt by replay before every event."""
    runs = []
    for kw in ({}, {"max_live": 0}):
        eng = Engine(workflows=[wf], **kw)
        for m in msgs:
            eng.send("t1", m)
        runs.append([(r.topic, r.value) for r in eng.outputs()])
        eng.close()
    return runs


# -- disposal of coroutines whose cleanup awaits ---------------------------------------------
@kwf.workflow("rv-taskgroup")
async def rv_taskgroup(arg):
    queue: asyncio.Queue = asyncio.Queue()
    fed = asyncio.Event()

    async def producer():
        for i in range(2):
            await queue.put(await kwf.suspend(f"p{i}"))
        fed.set()

    async def consumer():
        while True:
            kwf.output(f"got {await queue.get()}", "rv-out")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(producer())
        worker = tg.create_task(consumer())
        await fed.wait()          # the body of the group awaits: a very ordinary shape
        worker.cancel()
    return "ok"


def test_taskgroup_whose_body_awaits_survives_eviction():
    """DESIGN 1 lists TaskGroup as supported and DESIGN 2 says an evicted thread is rebuilt by
    replay. But disposing of an instance whose main is inside ``async with TaskGroup()`` throws
    GeneratorExit into it; ``TaskGroup.__aexit__`` then *awaits* its children, so
    ``coro.close()`` raises "coroutine ignored GeneratorExit", ``Instance._close_tasks`` finds
    the coroutine still alive and raises RuntimeError, and every record of the thread (with
    max_live=0, or whenever the LRU evicts it) is dead-lettered as ``internal`` although its
    step was applied and journaled: the step's outputs are lost."""
    msgs = ['new:{}', '{"ref": "p0", "value": 0}', '{"ref": "p1", "value": 1}']
    live, replayed = _live_and_replayed(rv_taskgroup, msgs)
    assert not [o for o in replayed if o[0] == "workflow-dlq"], replayed
    assert replayed == live


@kwf.workflow("rv-finally-await")
async def rv_finally_await(arg):
    try:
        await kwf.suspend("work")
    finally:
        await kwf.suspend("ack")  # a compensation that waits for its acknowledgement
    return "done"


@kwf.workflow("rv-plain")
async def rv_plain(arg):
    kwf.output("plain started", "rv-out")
    return await kwf.suspend("x")


def test_eviction_of_one_thread_does_not_break_another():
    """One workflow must not affect another (and an eviction must not lose outputs). With
    max_live=1, starting thread B evicts thread A; A's coroutine awaits in a ``finally``, so
    its disposal raises RuntimeError from ``LiveCache.touch`` inside B's ``_stepped``.
    ``ThreadState.on_command`` then dead-letters *B's* record as ``internal`` although B's
    step was applied and journaled: B's outputs are lost, and resending B's ``new:`` would
    restart it. (When both threads have such a finally, the second disposal inside the
    ``except`` handler raises again and Engine.send / the Bytewax worker crashes.)"""
    eng = Engine(workflows=[rv_finally_await, rv_plain], max_live=1)
    eng.send("a", "new:rv-finally-await:{}")
    out = eng.send("b", "new:rv-plain:{}")
    assert [r.topic for r in out] == ["rv-out", "workflow-events"], out
    assert eng.status("b")["status"] == "running"


def test_new_replaces_a_thread_whose_finally_awaits():
    """DESIGN 4: ``new:`` on a live thread discards it and starts the new one. When the old
    coroutine awaits in a ``finally``, ``ThreadState._start`` -> ``evict`` raises RuntimeError
    ("coroutines still alive after disposal") and the ``new:`` record is dead-lettered as
    ``internal``; the old thread keeps running."""
    eng = Engine(workflows=[rv_finally_await])
    eng.send("t1", "new:1")
    out = eng.send("t1", "new:2")
    assert not [r for r in out if r.topic == "workflow-dlq"], out
    assert eng.journal("t1").arg == 2


# -- workflow code must not be able to kill or hang the engine ------------------------------------
@kwf.workflow("rv-base-exc")
async def rv_base_exc(arg):
    await kwf.suspend("go")
    raise {"exit": SystemExit(3), "kbd": KeyboardInterrupt()}[arg]


def test_system_exit_in_workflow_fails_that_workflow_only():
    """A workflow that raises SystemExit must fail (workflow-error), not stop the engine:
    asyncio re-raises it out of the loop, and a restart would replay the record and die again."""
    eng = Engine(workflows=[rv_base_exc])
    eng.send("t1", 'new:"exit"')
    eng.send("t1", '{"ref": "go"}')
    assert eng.status("t1")["status"] == "failed"
    assert eng.outputs("workflow-error")[0].header("kwf-error-type") == "SystemExit"


def test_keyboard_interrupt_stops_the_engine_without_journaling_the_step():
    """KeyboardInterrupt is left to stop the engine: it is how Ctrl-C reaches code running a
    step, and failing the workflow it happened to land in would be wrong. The step it
    interrupted is not journaled, so a restart applies the record again."""
    eng = Engine(workflows=[rv_base_exc])
    eng.send("t1", 'new:"kbd"')
    steps = eng.journal("t1").step
    with pytest.raises(KeyboardInterrupt):
        eng.send("t1", '{"ref": "go"}')
    assert eng.journal("t1").step == steps


@kwf.workflow("rv-nap")
async def rv_nap(arg):
    await asyncio.sleep(float(arg["delay"]))  # a delay that came from input
    return "rested"


class _Hung(BaseException):
    pass


def test_nan_sleep_does_not_hang_the_engine():
    """``asyncio.sleep(float("nan"))`` (e.g. ``new:{"delay": "nan"}``) records a timer due at
    NaN. ``ThreadState._fire_due`` thinks it is due (``nan > now`` is False), applies a TIMER
    event that fires nothing (``nan <= now`` is False in ``WorkflowLoop.fire_timers``), the
    journal still lists the timer, and it loops for ever: the whole engine hangs on one input
    record, emitting a status record per iteration."""
    def hung(*_):
        raise _Hung

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(3)
    try:
        eng = Engine(workflows=[rv_nap])
        eng.send("t1", 'new:{"delay": "nan"}')
    except _Hung:
        pytest.fail("Engine.send did not return within 3 s (infinite timer loop)")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_infinite_sleep_does_not_crash_the_dataflow():
    """``await asyncio.sleep(float("inf"))`` ("sleep for ever") records a timer at +inf. The
    status record then carries ``"timers": [Infinity]`` (not JSON), and the dataflow crashes:
    ``_ThreadLogic.notify_at`` -> ``_utc(inf)`` -> ``datetime.fromtimestamp`` raises
    OverflowError inside Bytewax (BytewaxRuntimeError). Any due time past year 9999 does the
    same."""
    from kwf.testing import run_flow

    out = run_flow([("workflow-resume", "t1", 'new:{"delay": "inf"}', FUTURE)],
                   workflows=[rv_nap])
    events = [r for r in out if r.topic == "workflow-events"]
    assert events
    strict_loads(events[-1].value)  # ProtocolError: Infinity is not JSON


def test_huge_scheduler_delay_does_not_crash_the_dataflow():
    """DESIGN 4: a scheduler value is a delay in ms. A valid but huge delay
    (``"100000000000000000000"``) makes ``_ScheduleLogic.notify_at`` -> ``_utc`` raise
    (year out of range) inside Bytewax: one input record kills the engine, and it crash-loops
    on restart."""
    from kwf.testing import run_flow

    out = run_flow([("workflow-scheduler", "t1|x", "100000000000000000000", FUTURE)],
                   workflows=[rv_nap])
    assert isinstance(out, list)


@pytest.mark.parametrize("topic,value", [
    ("workflow-resume", '{"ref": "x", "value": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("workflow-scheduler", "9" * 400),
])
def test_engine_dead_letters_records_it_cannot_parse(topic, value):
    """DESIGN 4/5: a record that does not parse goes to workflow-dlq, and Engine applies
    records exactly as the dataflow does. Deeply nested JSON makes ``json.loads`` raise
    RecursionError, a 400-digit delay makes ``delay_ms / 1000`` raise OverflowError; neither is
    a ValueError, so ``protocol.loads``/``parse_schedule`` let them out, and
    ``Engine._drain`` (which only catches ProtocolError) crashes; the dataflow dead-letters
    them only as ``internal`` errors."""
    eng = Engine(workflows=[rv_nap])
    key = "t1|x" if topic == "workflow-scheduler" else "t1"
    try:
        out = eng.send(key, value, topic=topic)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"Engine.send raised {type(e).__name__}: {str(e)[:100]}")
    assert [r.topic for r in out] == ["workflow-dlq"]
    assert not out[0].header("kwf-error").startswith("internal")


# -- results and outputs must be JSON / producible ---------------------------------------------------
@kwf.workflow("rv-echo")
async def rv_echo(arg):
    value = await kwf.suspend("v")
    if value == "nan":
        return float("nan")
    if value == "deep":
        nested: list = []
        for _ in range(100_000):
            nested = [nested]
        return nested
    return value


@pytest.mark.parametrize("resume", ['{"ref": "v", "value": 1e400}', '{"ref": "v", "value": "nan"}'])
def test_result_is_json(resume):
    """DESIGN 4: workflow-result is "JSON of the return value". ``Instance._finish`` uses
    ``json.dumps`` with its default allow_nan=True, so a NaN/inf result (inf arrives simply as
    ``1e400`` in an input, which ``protocol.loads`` accepts) is written as ``NaN`` /
    ``Infinity``, which kwf's own strict parser (and other JSON consumers) reject."""
    eng = Engine(workflows=[rv_echo])
    eng.send("t1", "new:{}")
    eng.send("t1", resume)
    for rec in eng.outputs("workflow-result"):
        strict_loads(rec.value)


def test_unencodable_result_fails_the_workflow():
    """A result too deeply nested for ``json.dumps`` must fail the workflow like any other
    non-JSON result (workflow-error). ``Instance._finish`` catches only TypeError/ValueError;
    the RecursionError escapes ``_commit``, ``ThreadState.on_command`` dead-letters the resume
    as ``internal`` and the thread stays "running" (for a ``new:`` it is even left with a
    journal that has no start check, so every later record is an internal error)."""
    eng = Engine(workflows=[rv_echo])
    eng.send("t1", "new:{}")
    out = eng.send("t1", '{"ref": "v", "value": "deep"}')
    assert not [r for r in out if r.topic == "workflow-dlq"], out
    assert eng.status("t1")["status"] == "failed"


@kwf.workflow("rv-header")
async def rv_header(arg):
    await kwf.suspend("go")
    if arg == "surrogate":
        kwf.output("v", "rv-out", headers=[("h", "\ud800")])
    else:
        kwf.output("v", "rv-out", key="k" * 2_000_000)
    return "sent"


@pytest.mark.parametrize("case", ["surrogate", "big-key"])
def test_output_refuses_records_kafka_cannot_take(case):
    """``Instance.output`` checks the value's size (its comment: "refused by Kafka, the engine
    would stop, restart, and be refused again") but not the key's size nor the headers: a
    2 MB key passes, and a header value with a lone surrogate passes although the Kafka client
    cannot encode it (UnicodeEncodeError; a surrogate in a header name crashes the client).
    Either crashes/crash-loops the engine."""
    from kwf.engine.sink import _encode

    eng = Engine(workflows=[rv_header])
    eng.send("t1", f'new:"{case}"')
    eng.send("t1", '{"ref": "go"}')
    for rec in eng.outputs("rv-out"):
        for name, data in rec.headers:  # the client's UTF-8: UnicodeEncodeError on a surrogate
            name.encode()
            _encode(data)
        size = len(_encode(rec.key) or b"") + len(_encode(rec.value) or b"")
        assert size <= eng.settings.max_payload_bytes, f"a {size}-byte record was accepted"


# -- determinism -------------------------------------------------------------------------------------
@kwf.workflow("rv-mutate")
async def rv_mutate(arg):
    first = arg["items"].pop(0)      # ordinary code: consume the argument
    kwf.output(first, "rv-out")
    got = await kwf.suspend("go")
    got.append("seen")               # ordinary code: extend a received list
    kwf.output_json(got, "rv-out")
    await kwf.suspend("again")
    return [first, got]


def test_mutating_the_argument_or_a_resume_value_does_not_change_replay():
    """DESIGN 2: replaying the journal re-creates the coroutine exactly. But the journal keeps
    the *same objects* it hands to the workflow (``Journal.arg`` and each event's payload),
    so a workflow that mutates its argument or a received value rewrites its own journal;
    the replay (after an eviction, or from a snapshot, which is taken after the mutation)
    sees different inputs, and here diverges: the thread is parked as failed with a
    NonDeterminismError."""
    msgs = ['new:{"items": ["a", "b"]}', '{"ref": "go", "value": []}', '{"ref": "again"}']
    live, replayed = _live_and_replayed(rv_mutate, msgs)
    assert ("workflow-result", '["a",["seen"]]') in live
    assert replayed == live


# -- suspend ids ---------------------------------------------------------------------------------------
@kwf.workflow("rv-ids")
async def rv_ids(arg):
    named = kwf.suspend("1:1")        # a named channel that happens to look like an auto id
    await kwf.suspend("tick")
    auto = kwf.suspend()              # step 1, first auto id: "1:1"
    return await kwf.all([named, auto])


def test_auto_id_does_not_silently_replace_a_pending_named_suspend():
    """``Instance.suspend`` refuses a named id that is still pending, but an auto id is stored
    without that check: the auto id "1:1" overwrites the still-pending named "1:1", which can
    then never be resumed (the thread hangs, reporting nothing pending). Either auto ids must
    skip taken ids, or named ids of the auto form must be refused (kwf/instance.py
    ``suspend``)."""
    eng = Engine(workflows=[rv_ids])
    eng.send("t1", "new:{}")
    eng.send("t1", '{"ref": "tick"}')
    assert eng.status("t1")["pending"] == ["1:1", "1:2"]  # the auto id skipped the taken one
    eng.send("t1", '{"ref": "1:1", "value": 1}')
    eng.send("t1", '{"ref": "1:2", "value": 2}')
    assert eng.result("t1") == [1, 2]


# -- guards (pass): subtle behaviours verified -------------------------------------------------------
@kwf.workflow("rv-cancel-twice")
async def rv_cancel_twice(arg):
    try:
        await kwf.suspend("a")
    except asyncio.CancelledError:
        kwf.output("swallowed", "rv-out")
    try:
        await kwf.suspend("b")
    except asyncio.CancelledError:
        kwf.output("compensated", "rv-out")
        raise


def test_cancel_twice_and_after_the_end():
    """Guard: a swallowed cancel leaves the thread running; a second cancel ends it cancelled
    with no result/error; a third is ignored (tombstone), live and replayed alike."""
    msgs = ["new:{}", "cancel:", 'cancel:{"why": 1}', "cancel:"]
    live, replayed = _live_and_replayed(rv_cancel_twice, msgs)
    assert live == replayed
    assert [v for t, v in live if t == "rv-out"] == ["swallowed", "compensated"]
    assert json.loads(live[-1][1])["status"] == "cancelled"
    assert not [t for t, _ in live if t in ("workflow-result", "workflow-error")]


# -- memory bound ----------------------------------------------------------------------------------
def test_stale_records_do_not_grow_live_instances_past_max_live():
    """DESIGN 2: live objects are kept under a memory bound (``max_live``, LRU). A stale or
    duplicate resume for an evicted thread makes ``ThreadState._on_command`` rebuild it
    (``_live()``), then return without ``_stepped()``, so the rebuilt instance is never
    registered in the ``LiveCache``: it is never evicted again, and a stream of duplicates
    for many idle threads keeps all of them in memory."""
    eng = Engine(workflows=[rv_plain], max_live=1)
    for key in ("a", "b", "c"):
        eng.send(key, "new:{}")
    for key in ("a", "b"):
        eng.send(key, '{"ref": "duplicate-or-stale"}')
    live = [k for k, s in eng.threads.items() if s.instance is not None]
    assert len(live) <= 1, f"live instances {live} with max_live=1"
