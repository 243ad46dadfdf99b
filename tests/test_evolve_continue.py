"""``kwf.continue_as_new`` and the long-running ``account`` example (issue 11, item 1).

Every test runs live and with replay before every event (``make_engine``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import kwf
from workflows import account

TOPIC = "evolve-continue-out"
kwf.config.output_topics |= {TOPIC}
DAY = 24 * 3600.0


def op(eng: Any, key: str, value: Any, ref: str = "ops") -> None:
    eng.send(key, json.dumps({"ref": ref, "value": value}))


def out(eng: Any, key: str | None = None) -> list[Any]:
    return [r.json() for r in eng.outputs(TOPIC) if key is None or r.key == key]


# -- the account example --------------------------------------------------------------------------
def test_account_continues_as_new_and_loses_nothing(make_engine):
    eng = make_engine(account.account)
    eng.send("c1", 'new:account:{"customer": "c1", "continueEvery": 4}')
    for i in range(10):
        op(eng, "c1", {"op": "deposit", "amount": i + 1})
    op(eng, "c1", {"op": "withdraw", "amount": 1000})  # refused: still one event
    assert len(eng.journal("c1").events) < 4  # the journal stays short
    op(eng, "c1", {"op": "close"})
    ledger = [r.json() for r in eng.outputs("account-ledger")]
    assert [e["n"] for e in ledger if e["op"] != "refused"] == list(range(1, 12))
    assert ledger[-2]["op"] == "refused" and ledger[-2]["balance"] == 55
    assert eng.result("c1") == {"customer": "c1", "balance": 55, "n": 11, "runs": 3}
    # Steps and kwf-seq go on across runs: every record has a new kwf-seq, steps never go back.
    seqs = [int(r.header("kwf-seq")) for r in eng.outputs()]
    assert seqs == list(range(1, len(seqs) + 1))
    statuses = [r.json() for r in eng.outputs("workflow-events")]
    assert [s["step"] for s in statuses] == list(range(len(statuses)))
    assert [s["status"] for s in statuses].count("continued") == 2


def test_account_statements_keep_their_schedule_across_runs(make_engine):
    eng = make_engine(account.account)
    eng.send("c1", 'new:account:{"continueEvery": 2}')
    eng.advance(29 * DAY)
    op(eng, "c1", {"op": "deposit", "amount": 5})
    op(eng, "c1", {"op": "deposit", "amount": 5})  # the run continues here; its timer goes
    eng.advance(2 * DAY)  # the new run armed it again from the state: due at day 30
    op(eng, "c1", {"op": "deposit", "amount": 5})
    eng.advance(30 * DAY)
    statements = [r.json() for r in eng.outputs("account-statement")]
    assert [(s["at"], s["balance"]) for s in statements] == [(30 * DAY, 10), (60 * DAY, 15)]


# -- semantics ------------------------------------------------------------------------------------
@kwf.workflow("evolve-looper")
async def looper(arg: Any) -> Any:
    """Count signals on "tick"; a helper task waits on an auto suspend and cleans up if cancelled."""
    n = arg["n"]

    async def helper() -> None:
        ref = kwf.suspend()
        kwf.output_json({"helper": ref.id, "n": n}, TOPIC)
        try:
            await ref
        except asyncio.CancelledError:
            kwf.output_json({"helper-cancelled": ref.id}, TOPIC)
            raise

    task = asyncio.get_running_loop().create_task(helper())
    await asyncio.sleep(0)
    while True:
        value = await kwf.suspend("tick")
        n += 1
        if value == "stop":
            task.cancel()
            return n
        if value == "again":
            try:
                kwf.continue_as_new({"n": n})
            except Exception:  # noqa: BLE001 - it must not be caught here
                kwf.output_json({"swallowed": True}, TOPIC)
            kwf.output_json({"after-continue": True}, TOPIC)
        if value == "switch":
            kwf.continue_as_new({"x": n}, workflow="evolve-echo")
        if value == "bad":
            try:
                kwf.continue_as_new({"not json": {1, 2}})
            except TypeError as e:
                kwf.output_json({"refused": str(e)}, TOPIC)
        if value == "nowhere":
            kwf.continue_as_new({}, workflow="evolve-missing")


@kwf.workflow("evolve-echo")
async def echo(arg: Any) -> Any:
    return {"echo": arg, "step": kwf.step_id(), "length": kwf.journal_length()}


@kwf.workflow("evolve-forever")
async def forever(arg: Any) -> None:
    kwf.continue_as_new(arg)


def test_continue_as_new_ends_the_run_cleans_up_and_starts_the_new_one(make_engine):
    eng = make_engine(looper, echo)
    eng.send("t", 'new:evolve-looper:{"n": 0}')
    op(eng, "t", 1, "tick")
    op(eng, "t", "again", "tick")
    first, cancelled, second = out(eng)  # no "swallowed", no "after-continue"
    assert (first["n"], cancelled, second["n"]) == (0, {"helper-cancelled": first["helper"]}, 2)
    assert second["helper"] != first["helper"]  # the new run's ids never meet the old run's
    assert eng.journal("t").arg == {"n": 2} and eng.journal("t").events == []
    op(eng, "t", None, first["helper"])  # the old run's suspend: gone, the record is stale
    op(eng, "t", 1, "tick")  # the named channel reaches the new run
    op(eng, "t", "stop", "tick")
    assert eng.result("t") == 4
    assert not eng.outputs("workflow-dlq")


def test_continue_as_new_as_another_workflow(make_engine):
    eng = make_engine(looper, echo)
    eng.send("t", 'new:evolve-looper:{"n": 0}')
    op(eng, "t", "switch", "tick")
    assert eng.result("t") == {"echo": {"x": 1}, "step": 2, "length": 0}
    assert eng.status("t")["workflow"] == "evolve-echo"


def test_continue_as_new_refuses_non_json_at_the_call(make_engine):
    eng = make_engine(looper, echo)
    eng.send("t", 'new:evolve-looper:{"n": 0}')
    op(eng, "t", "bad", "tick")
    [refused] = [o for o in out(eng) if "refused" in o]
    assert "not JSON" in refused["refused"]
    assert eng.status("t")["status"] == "running"


def test_continue_as_new_to_an_unknown_workflow_fails_the_thread_saying_why(make_engine):
    eng = make_engine(looper, echo)
    eng.send("t", 'new:evolve-looper:{"n": 0}')
    op(eng, "t", "nowhere", "tick")
    assert eng.status("t")["status"] == "failed"
    [error] = eng.outputs("workflow-error")
    assert "unknown workflow 'evolve-missing'" in error.json()
    assert error.header("kwf-error-type") == "UnknownWorkflow"


def test_a_run_continuing_in_its_first_step_for_ever_is_stopped(make_engine):
    eng = make_engine(forever)
    eng.send("t", "new:{}")
    assert eng.status("t")["status"] == "failed"
    assert "continued as new 100 times in a row" in eng.outputs("workflow-error")[0].json()


def test_continue_as_new_outside_a_workflow_says_where_it_works():
    with pytest.raises(RuntimeError, match=r"kwf.continue_as_new\(\) is only available inside"):
        kwf.continue_as_new({})
