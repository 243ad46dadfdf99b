"""The deterministic loop: callbacks run FIFO, and futures and tasks hash by creation number."""

from __future__ import annotations

import asyncio
import threading

import kwf
from kwf.loop import WorkflowLoop
from kwf.testing import Engine


def test_callbacks_run_in_order_including_those_scheduled_while_running():
    loop = WorkflowLoop(0.0, "t1")
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        loop.call_soon(ran.append, "scheduled by first")
        skipped.cancel()

    loop.call_soon(first)
    skipped = loop.call_soon(ran.append, "cancelled before its turn")
    loop.call_soon(ran.append, "third")
    loop.run_until_idle()
    assert ran == ["first", "third", "scheduled by first"]
    loop.call_soon(ran.append, "next step")
    loop.run_until_idle()
    assert ran[-1] == "next step" and len(ran) == 4


def test_closing_the_loop_inside_a_callback_drops_what_was_left():
    loop = WorkflowLoop(0.0, "t1")
    ran: list[str] = []
    loop.call_soon(loop.close)
    loop.call_soon(ran.append, "after close")
    loop.run_until_idle()
    assert ran == []


def test_a_failing_callback_is_reported_and_the_rest_still_run(monkeypatch):
    loop = WorkflowLoop(0.0, "t1")
    reported: list[dict] = []
    monkeypatch.setattr(loop, "call_exception_handler", reported.append, raising=False)
    ran: list[str] = []

    def boom() -> None:
        raise KeyError("x")

    loop.call_soon(boom)
    loop.call_soon(ran.append, "after")
    loop.run_until_idle()
    assert ran == ["after"]
    assert [type(c["exception"]) for c in reported] == [KeyError]
    assert reported[0]["message"].startswith("Exception in callback ")


def test_futures_tasks_and_combinators_hash_by_creation_number_per_thread():
    """The same thread numbers its futures alike in every run, so sets of them iterate in
    the same order on replay; other threads number theirs elsewhere."""
    def numbers(owner: str) -> list[int]:
        loop = WorkflowLoop(0.0, owner)

        async def main() -> None:
            await asyncio.sleep(1)

        task = loop.create_task(main())
        made = [hash(loop.create_future()), hash(task), hash(loop.create_future())]
        task.get_coro().close()
        task._log_destroy_pending = False  # type: ignore[attr-defined]
        return made

    first = numbers("t1")
    assert first == numbers("t1")
    assert first[1] == first[0] - 1 and first[2] == first[0] + 1
    assert numbers("t2") != first


@kwf.workflow("loop-two-os-threads")
async def _names_itself(arg: None) -> str:
    _BOTH_INSIDE.wait()  # both OS threads are inside a step of their own workflow now
    return kwf.thread_id()


_BOTH_INSIDE = threading.Barrier(2, timeout=20)


def test_each_os_thread_finds_the_workflow_it_runs():
    """Engines (Bytewax workers) in several OS threads of one process each see their own
    running workflow from kwf's API."""
    results: dict[str, object] = {}

    def run(thread: str) -> None:
        eng = Engine(workflows=[_names_itself])
        eng.send(thread, "new:null")
        results[thread] = [r.value for r in eng.outputs("workflow-result")]

    workers = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert results == {"a": ['"a"'], "b": ['"b"']}
