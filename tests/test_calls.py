"""``kwf.calls.call``: request shape, timeouts, retries with backoff, cancellation, replay."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest

import kwf
from kwf.calls import CallTimeout, backoff_delay, call
from kwf.testing import Engine

kwf.config.output_topics |= {"calls-svc", "calls-svc-cancel", "calls-out"}


@kwf.workflow("calls-basic")
async def basic(arg: dict[str, Any]) -> Any:
    """Whatever options the test passes, straight to ``call``."""
    return await call("calls-svc", arg.get("payload"), **arg.get("opts", {}))


@kwf.workflow("calls-raced")
async def raced(arg: Any) -> Any:
    """A call that loses a race against a 1 s timer, so it is cancelled."""
    async def slow() -> Any:
        return await call("calls-svc", None, cancel_topic="calls-svc-cancel")

    async def timer() -> str:
        await asyncio.sleep(1)
        return "timer"
    return await kwf.race([slow(), timer()])


@kwf.workflow("calls-caught")
async def caught(arg: Any) -> Any:
    """The error a call raises, as the caller sees it."""
    try:
        return await call("calls-svc", None, timeout=2, cancel_topic="calls-svc-cancel")
    except CallTimeout as e:
        return {"type": type(e).__name__, "key": e.key, "timeout": isinstance(e, TimeoutError)}


def scripted(*answers: Any) -> Any:
    """A handler answering each request with the next answer (None: no answer)."""
    it = iter(answers)

    def answer(rec: Any) -> Any:
        a = next(it)
        return None if a is None else {"ref": rec.json()["ref"], **a}
    return answer


def test_request_shape_and_reply_value(make_engine):
    eng = make_engine(basic)
    eng.handle("calls-svc", scripted({"value": {"ok": 1}}))
    eng.send("t1", 'new:{"payload": [1, 2]}')
    assert [r.json() for r in eng.outputs("calls-svc")] == [
        {"ref": "0:1", "key": "t1/0:1", "attempt": 1, "payload": [1, 2]}]
    assert eng.result("t1") == {"ok": 1}


def test_no_timeout_waits_for_ever(make_engine):
    eng = make_engine(basic)
    eng.send("t1", "new:{}")
    eng.advance(365 * 86400)
    assert eng.status("t1")["timers"] == []
    assert eng.status("t1")["pending"] == ["0:1"]


def test_error_reply_without_retries_raises_remote_error(make_engine):
    eng = make_engine(basic)
    eng.handle("calls-svc", scripted({"error": {"code": 7}}))
    eng.send("t1", "new:{}")
    [err] = eng.outputs("workflow-error")
    assert (err.json(), err.header("kwf-error-type")) == ('{"code":7}', "RemoteError")


def test_backoff_doubles_up_to_the_cap_with_jitter_taken_off():
    assert [backoff_delay(n, 0.5, 3.0, 0.0, 0.9) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(3, 1.0, 10.0, 1.0, 0.25) == 3.0
    assert 0.0 < backoff_delay(1, 1.0, 10.0, 1.0, 0.999) < 0.01


def test_retries_wait_backoff_on_durable_timers(make_engine):
    eng = make_engine(basic)
    eng.handle("calls-svc", scripted({"error": "x"}, {"error": "x"}, {"error": "x"},
                                     {"value": 4}))
    opts = {"retries": 3, "backoff": 10, "jitter": 0}
    eng.send("t1", "new:" + json.dumps({"opts": opts}))
    assert eng.status("t1")["timers"] == [10.0]
    eng.advance(100)
    assert [r.timestamp for r in eng.outputs("calls-svc")] == [0.0, 10.0, 30.0, 70.0]
    assert {r.json()["key"] for r in eng.outputs("calls-svc")} == {"t1/0:1"}
    assert eng.result("t1") == 4


def test_jitter_is_the_same_live_and_replayed():
    """The backoff draws from kwf.random(): a thread rebuilt by replay waits exactly as long."""
    runs = []
    for max_live in (None, 0):
        eng = Engine(workflows=[basic], max_live=max_live)
        eng.handle("calls-svc", scripted({"error": "x"}, {"error": "x"}, {"value": 1}))
        eng.send("t1", 'new:{"opts": {"retries": 2, "jitter": 1.0}}')
        eng.advance(10)
        runs.append([r.timestamp for r in eng.outputs("calls-svc")])
    live, replayed = runs
    assert live == replayed
    waits = [b - a for a, b in itertools.pairwise(live)]
    assert 0 < waits[0] < 1 and 0 < waits[1] < 2 and waits != [1.0, 2.0]


def test_retry_on_predicate_decides(make_engine):
    eng = make_engine(predicate)
    eng.handle("calls-svc", scripted({"error": "busy"}, {"error": "final"}))
    eng.send("t1", "new:{}")
    eng.advance(60)
    assert len(eng.outputs("calls-svc")) == 2
    assert eng.outputs("workflow-error")[0].json() == "final"


@kwf.workflow("calls-predicate")
async def predicate(arg: Any) -> Any:
    """Retries only ``"busy"`` errors."""
    return await call("calls-svc", None, retries=5, backoff=1,
                      retry_on=lambda e: isinstance(e, kwf.RemoteError) and e.payload == "busy")


def test_last_timeout_raises_call_timeout_and_writes_the_cancel(make_engine):
    eng = make_engine(caught)
    eng.send("t1", "new:{}")
    eng.advance(2)
    assert eng.result("t1") == {"type": "CallTimeout", "key": "t1/0:1", "timeout": True}
    assert [r.json() for r in eng.outputs("calls-svc-cancel")] == [{"ref": "0:1", "key": "t1/0:1"}]


def test_cancelled_call_writes_the_cancel_then_raises(make_engine):
    eng = make_engine(raced)
    eng.send("t1", "new:{}")
    eng.advance(1)
    assert eng.result("t1") == "timer"
    assert [r.json() for r in eng.outputs("calls-svc-cancel")] == [{"ref": "0:1", "key": "t1/0:1"}]
    assert eng.send("t1", '{"ref": "0:1", "value": 1}') == []


@pytest.mark.parametrize("opts", [{"retries": -1}, {"jitter": 2}, {"backoff": -1}])
def test_bad_options_fail_the_workflow_with_value_error(make_engine, opts):
    eng = make_engine(basic)
    eng.send("t1", "new:" + json.dumps({"opts": opts}))
    assert eng.outputs("workflow-error")[0].header("kwf-error-type") == "ValueError"


@kwf.workflow("calls-backoff-cancelled")
async def backoff_cancelled(arg: Any) -> Any:
    """A call cancelled while it waits out a backoff, by a 1.5 s deadline."""
    async with asyncio.timeout(1.5):
        await call("calls-svc", None, retries=3, backoff=10, cancel_topic="calls-svc-cancel")


def test_cancel_during_backoff_writes_the_cancel_of_the_last_attempt(make_engine):
    eng = make_engine(backoff_cancelled)
    eng.handle("calls-svc", scripted({"error": "busy"}))
    eng.send("t1", "new:{}")
    eng.advance(2)
    assert [r.json() for r in eng.outputs("calls-svc-cancel")] == [{"ref": "0:1", "key": "t1/0:1"}]
    assert eng.outputs("workflow-error")[0].header("kwf-error-type") == "TimeoutError"
