"""Combinators, asyncio inside workflows, and the rules of kwf's public functions."""

from __future__ import annotations

import asyncio
import json

import pytest
from kwf_support import values

import kwf

kwf.config.output_topics |= {"api-out"}


def log(*items):
    kwf.output_json(list(items), "api-out")


async def step(name, compensate=True):
    """Suspend on ``name``; when cancelled, record it and (optionally) await a confirmation."""
    ref = kwf.suspend(name)
    try:
        value = await ref
    except asyncio.CancelledError:
        log("cancelled", name)
        if compensate == "await":
            await kwf.suspend(f"confirm-{name}")
            log("confirmed", name)
        raise
    log("got", name, value)
    return value


def run(eng, workflow_name, *resumes):
    eng.send("t1", f"new:{workflow_name}:{{}}")
    for resume in resumes:
        eng.send("t1", json.dumps(resume))
    return [json.loads(v) for v in values(eng, "api-out")]


@kwf.workflow("api-combos")
async def combos(arg):
    kind = arg.get("kind", "all")
    combinator = {"all": kwf.all, "race": kwf.race, "gather": kwf.gather, "first": kwf.first}[kind]
    try:
        result = await combinator([step("a"), step("b"), step("c")])
    except Exception as e:  # noqa: BLE001 - the test records what came out
        log("raised", type(e).__name__, str(e))
        await kwf.suspend("end")
        return "failed"
    log("result", result)
    await kwf.suspend("end")
    return result


def start(eng, kind):
    eng.send("t1", f'new:api-combos:{{"kind": "{kind}"}}')


def out(eng):
    return [json.loads(v) for v in values(eng, "api-out")]


def test_all_returns_values_in_argument_order(make_engine):
    eng = make_engine(combos)
    start(eng, "all")
    for name, v in (("c", 3), ("a", 1), ("b", 2)):
        eng.send("t1", json.dumps({"ref": name, "value": v}))
    assert out(eng)[-1] == ["result", [1, 2, 3]]


def test_all_cancels_the_rest_on_first_failure(make_engine):
    eng = make_engine(combos)
    start(eng, "all")
    eng.send("t1", '{"ref": "a", "value": 1}')
    eng.send("t1", '{"ref": "b", "error": "boom"}')
    # The losers' cleanup runs before the caller resumes.
    assert out(eng) == [["got", "a", 1], ["cancelled", "c"], ["raised", "RemoteError", "boom"]]
    assert eng.status("t1")["pending"] == ["end"]


def test_race_settles_on_first_value_and_cancels_others(make_engine):
    eng = make_engine(combos)
    start(eng, "race")
    eng.send("t1", '{"ref": "b", "value": "B"}')
    assert out(eng) == [["got", "b", "B"], ["cancelled", "a"], ["cancelled", "c"], ["result", "B"]]


def test_race_settles_on_first_error_too(make_engine):
    eng = make_engine(combos)
    start(eng, "race")
    eng.send("t1", '{"ref": "c", "error": "late"}')
    assert out(eng) == [["cancelled", "a"], ["cancelled", "b"], ["raised", "RemoteError", "late"]]


def test_gather_does_not_cancel_on_failure(make_engine):
    eng = make_engine(combos)
    start(eng, "gather")
    eng.send("t1", '{"ref": "a", "error": "boom"}')
    eng.send("t1", '{"ref": "b", "value": 2}')
    assert out(eng) == [["raised", "RemoteError", "boom"], ["got", "b", 2]]
    assert eng.status("t1")["pending"] == ["c", "end"]


def test_first_does_not_cancel_the_others(make_engine):
    eng = make_engine(combos)
    start(eng, "first")
    eng.send("t1", '{"ref": "a", "value": 1}')
    eng.send("t1", '{"ref": "c", "value": 3}')
    assert out(eng) == [["got", "a", 1], ["result", 1], ["got", "c", 3]]


@kwf.workflow("api-empty")
async def empty(arg):
    log("all", await kwf.all([]))
    log("gather", await kwf.gather([]))
    racing = asyncio.ensure_future(kwf.race([]))
    done, pending = await kwf.wait([racing, kwf.suspend("x")], return_when=asyncio.FIRST_COMPLETED)
    log("race pending", racing in pending)
    return "ok"


def test_empty_all_is_empty_list_and_empty_race_stays_pending(make_engine):
    eng = make_engine(empty)
    eng.send("t1", "new:{}")
    eng.send("t1", '{"ref": "x"}')
    assert out(eng) == [["all", []], ["gather", []], ["race pending", True]]
    assert eng.result("t1") == "ok"


@kwf.workflow("api-outer-cancel")
async def outer_cancel(arg):
    kind = arg["kind"]
    combinator = {"all": kwf.all, "race": kwf.race, "gather": kwf.gather, "first": kwf.first}[kind]
    inner = combinator([step("a", compensate="await"), step("b", compensate="await")])
    stop = kwf.suspend("stop")
    await stop
    kwf.cancel(inner)
    try:
        await inner
    except asyncio.CancelledError:
        log("outer saw cancel")
    return "done"


@pytest.mark.parametrize("kind", ["all", "race", "gather", "first"])
def test_cancelled_combinator_cancels_children_and_waits_for_their_compensation(make_engine, kind):
    """A cancel aimed at any combinator reaches every child; a child's compensation may still
    output and await, and the combinator ends cancelled only once they are done."""
    eng = make_engine(outer_cancel)
    eng.send("t1", f'new:{{"kind": "{kind}"}}')
    eng.send("t1", '{"ref": "stop"}')
    assert out(eng) == [["cancelled", "a"], ["cancelled", "b"]]
    assert eng.status("t1")["pending"] == ["confirm-a", "confirm-b"]
    eng.send("t1", '{"ref": "confirm-b"}')
    eng.send("t1", '{"ref": "confirm-a"}')
    assert out(eng)[2:] == [["confirmed", "b"], ["confirmed", "a"], ["outer saw cancel"]]
    assert eng.result("t1") == "done"


@kwf.workflow("api-eager")
async def eager(arg):
    async def one(tag):
        log("start", tag, kwf.suspend().id)
        return tag
    both = kwf.gather([one("x"), one("y")])
    log("after call", kwf.suspend().id)
    return await both


def test_combinators_start_arguments_eagerly_in_order(make_engine):
    """Each coroutine runs to its first suspension at call time, as JavaScript's do."""
    eng = make_engine(eager)
    eng.send("t1", "new:{}")
    assert out(eng) == [["start", "x", "0:1"], ["start", "y", "0:2"], ["after call", "0:3"]]


@kwf.workflow("api-asyncio")
async def with_asyncio(arg):
    event, queue, lock, sem = asyncio.Event(), asyncio.Queue(), asyncio.Lock(), asyncio.Semaphore(1)

    async def producer():
        for i in range(3):
            await queue.put(i)
            await asyncio.sleep(1)
        event.set()

    async def guarded(tag):
        async with lock, sem:
            await asyncio.sleep(2)
            log("guarded", tag)

    task = asyncio.create_task(producer())
    got = [await queue.get() for _ in range(3)]
    await event.wait()
    await asyncio.gather(guarded("a"), guarded("b"))
    try:
        await asyncio.wait_for(kwf.suspend("never"), timeout=5)
    except asyncio.TimeoutError:
        log("wait_for timed out")
    try:
        async with asyncio.timeout(3):
            await kwf.suspend("never2")
    except TimeoutError:
        log("timeout fired")
    shielded = await asyncio.shield(asyncio.sleep(1, result="shielded"))
    async with asyncio.TaskGroup() as tg:
        t1 = tg.create_task(asyncio.sleep(1, result=1))
        t2 = tg.create_task(asyncio.sleep(2, result=2))
    await task
    return [got, shielded, t1.result() + t2.result(), kwf.now().timestamp()]


def test_standard_asyncio_works_on_virtual_time(make_engine):
    eng = make_engine(with_asyncio)
    eng.send("t1", "new:{}")
    eng.advance(100)
    assert out(eng) == [["guarded", "a"], ["guarded", "b"], ["wait_for timed out"],
                        ["timeout fired"]]
    assert eng.result("t1") == [[0, 1, 2], "shielded", 3, 3 + 4 + 5 + 3 + 1 + 2]


@kwf.workflow("api-io")
async def does_io(arg):
    await asyncio.open_connection("127.0.0.1", 9)


def test_io_fails_with_a_clear_error(make_engine):
    eng = make_engine(does_io)
    eng.send("t1", "new:{}")
    [err] = eng.outputs("workflow-error")
    assert "not available in workflow 'test_api.does_io" in err.json()
    assert "thread 't1'" in err.json()
    assert err.header("kwf-error-type") == "WorkflowNotAvailable"


@kwf.workflow("api-named")
async def named(arg):
    first = kwf.suspend("main")
    try:
        kwf.suspend("main")
    except ValueError as e:
        log("busy", "still pending" in str(e))
    kwf.cancel(first)
    again = kwf.suspend("main")
    return await again


def test_named_id_can_be_reused_after_cancel_but_not_while_pending(make_engine):
    eng = make_engine(named)
    eng.send("t1", "new:{}")
    eng.send("t1", '{"ref": "main", "value": 7}')
    assert out(eng) == [["busy", True]]
    assert eng.result("t1") == 7


def test_api_outside_a_workflow_says_where_it_works():
    with pytest.raises(RuntimeError, match="only available inside a running workflow"):
        kwf.suspend()


def test_public_names_match_the_design():
    assert sorted(kwf.__all__) == kwf.__all__
    design = {"workflow", "suspend", "Suspend", "output", "output_json", "thread_id", "step_id",
              "now", "RemoteError", "all", "race", "gather", "first", "cancel", "wait",
              "as_completed", "config", "random", "uuid4", "NonDeterminismError"}
    assert design <= set(kwf.__all__)
    assert not [n for n in kwf.__all__ if n.startswith("_")]


@kwf.workflow("api-ordered")
async def ordered(arg):
    names = [f"s{i}" for i in range(8)]
    refs = [kwf.suspend(n) for n in names]
    done, pending = await kwf.wait(refs, timeout=5)
    log("wait", [refs[[r._future for r in refs].index(f)].id for f in done], len(pending))
    seen = []
    async for future in kwf.as_completed(refs[1:]):
        seen.append(future.result())
    return seen


def test_wait_and_as_completed_keep_argument_order(make_engine):
    """Results settled in the same step come in argument order, not in set order."""
    eng = make_engine(ordered)
    eng.send("t1", "new:{}")
    for name in ("s6", "s2", "s4"):  # three settle before the timeout, in another order
        eng.send("t1", json.dumps({"ref": name, "value": name}))
    eng.advance(5)
    assert out(eng) == [["wait", ["s2", "s4", "s6"], 5]]
    for name in ("s7", "s1", "s3", "s5"):
        eng.send("t1", json.dumps({"ref": name, "value": name}))
    assert eng.result("t1") == ["s2", "s4", "s6", "s7", "s1", "s3", "s5"]
