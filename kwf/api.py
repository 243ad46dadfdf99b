"""What workflow code calls: durable suspends, outputs, context, deterministic helpers, combinators.

Every function here finds the running thread through the running loop, so it works only inside
a workflow (and says so, otherwise). Nothing here does I/O or reads the wall clock: outputs are
buffered by the instance, time is the logical time of the event being applied, and randomness
comes from a generator seeded per thread, so a replay reproduces every value.
"""

from __future__ import annotations

import asyncio
import random as _random
import uuid as _uuid
from datetime import datetime, timezone
from functools import partial
from typing import (TYPE_CHECKING, Any, AsyncIterator, Awaitable, Generator, Iterable, NoReturn,
                    Sequence)

from kwf.errors import ChildFailed, ContinueAsNew, RemoteError
from kwf.loop import WorkflowLoop, _current, _Future
from kwf.protocol import dumps

if TYPE_CHECKING:
    from kwf.instance import Instance

__all__ = [
    "Suspend", "all", "as_completed", "cancel", "child", "continue_as_new", "deprecate_patch", "first", "gather",
    "journal_length", "now", "output", "output_json", "patched", "race", "random", "start_child", "step_id",
    "suspend", "thread_id", "uuid4", "wait",
]


def _instance(what: str) -> Instance:
    loop = _current.loop  # asyncio's running loop, when it is a workflow's
    if loop is None or loop.instance is None:
        msg = (f"kwf.{what}() is only available inside a running workflow; run the workflow "
               "with kwf.testing.Engine (tests, notebooks) or the engine (Kafka)")
        raise RuntimeError(msg)
    return loop.instance  # type: ignore[no-any-return]


class Suspend:
    """A durable wait point: ``await`` it to wait for ``{"ref": id, ...}`` on ``workflow-resume``.

    It is registered when created, so a resume that arrives before the ``await`` is kept. It can
    be passed to every combinator and cancelled with ``kwf.cancel``.
    """

    __slots__ = ("id", "_future")

    def __init__(self, id: str, future: _Future) -> None:
        self.id = id
        self._future = future

    def __await__(self) -> Generator[Any, None, Any]:
        return self._future.__await__()

    def done(self) -> bool:
        """True once resumed, failed or cancelled."""
        return self._future.done()

    def __hash__(self) -> int:
        return hash(self._future)

    def __repr__(self) -> str:
        return f"<Suspend {self.id!r} {self._future._state.lower()}>"


def suspend(id: str | None = None) -> Suspend:
    """Create a durable wait point with a deterministic id.

    Auto ids are ``"<offset>:<n>"``, as kafka-workflow makes them: the Kafka offset in
    ``workflow-resume`` of the record whose step creates the suspend, then 1, 2, ... within the
    step (``"17:1"``), so ids are unique within a partition. A step with no record (a built-in
    durable timer firing) uses ``"<offset>.<k>:<n>"``: the thread's last record, then a count of
    such steps since it (``"17.1:1"``). Ids are identical on replay. A custom
    id such as ``"main"`` is a named channel: it can be suspended on again once the previous
    one with that id settled or was cancelled.
    """
    return _instance("suspend").suspend(id)


def output(value: str | None, topic: str, key: str | None = None,
           headers: Iterable[tuple[str, str]] | None = None) -> None:
    """Send a record when the current step ends; the key is the thread id unless given.

    The topic must be declared in ``kwf.config.output_topics``. Outputs made while a journal
    is replayed are suppressed: they were sent when the step first ran.
    """
    _instance("output").output(value, topic, key, headers)


def output_json(obj: Any, topic: str, key: str | None = None) -> None:
    """``output`` of ``obj`` as compact JSON, byte for byte what ``JSON.stringify`` writes
    (``{"a":1,"é":[]}``: no spaces, keys in order, non-ASCII as is); ``ValueError`` or
    ``TypeError`` for what JSON cannot hold (NaN, sets, objects)."""
    _instance("output_json").output(dumps(obj), topic, key, None)


def thread_id() -> str:
    """The id of the running thread (the Kafka key of its records)."""
    return _instance("thread_id").thread_id


def step_id() -> int:
    """The step being applied: 0 for the start record, +1 for each applied event.

    A count per thread, not a suspend id prefix: ids come from Kafka offsets (see ``suspend``).
    """
    return _instance("step_id").step


def now() -> datetime:
    """Logical time (UTC): the timestamp of the event being applied, identical on replay."""
    return datetime.fromtimestamp(_instance("now").loop.time(), tz=timezone.utc)


def random() -> float:
    """A float in [0, 1) from the thread's seeded generator, identical on replay."""
    return _instance("random").rng.random()


def uuid4() -> _uuid.UUID:
    """A version-4 UUID from the thread's seeded generator, identical on replay."""
    return _uuid.UUID(int=_instance("uuid4").rng.getrandbits(128), version=4)


def patched(patch_id: str) -> bool:
    """Whether this thread takes the new path of a change made while threads were in flight.

    Wrap a change as ``if kwf.patched("id"): new else: old``. Running live, it is True and a
    marker goes into the journal; replaying, it is True only where the journal has that marker
    (from this step on), so a thread that passed here under the old code replays, and goes on,
    on the old path. Once no live thread lacks the marker, retire the old path with
    ``kwf.deprecate_patch`` (README: "Changing a workflow with threads in flight").
    """
    return _instance("patched").patched(patch_id)


def deprecate_patch(patch_id: str) -> None:
    """Retire ``kwf.patched(patch_id)``: the code now always takes the new path.

    Live it records the marker, as ``patched`` would. A replay that reaches it without the
    marker (a thread that took the old path) diverges, so ``kwf verify`` lists exactly the
    threads that still need the old code.
    """
    _instance("deprecate_patch").deprecate_patch(patch_id)


def continue_as_new(arg: Any, workflow: str | None = None) -> NoReturn:
    """End this run and start the thread again with ``arg``, a fresh journal, in this step.

    Raises ``kwf.ContinueAsNew`` (a ``BaseException``, like ``sys.exit``), so code after the
    call never runs. Every task still running is cancelled and its cleanup runs (outputs made
    then are sent); suspends and timers of this run are dropped, so a resume for one of them
    arriving later is stale and ignored, unless the new run waits on the same named channel.
    The thread id, the step numbers and ``kwf-seq`` continue; ``workflow`` (default: the same)
    names the workflow of the new run. ``TypeError`` here, at the call, if ``arg`` is not JSON.
    """
    _instance("continue_as_new").continue_as_new(arg, workflow)
    raise ContinueAsNew(arg, workflow)


def child(workflow: str, arg: Any = None, *, id: str | None = None) -> asyncio.Task[Any]:
    """Start a child workflow and get a task for its result; ``await`` it, or pass it to combinators.

    The start goes through ``workflow-resume`` (a ``child:`` record, idempotent), so the child
    may run on another worker or process; its id is ``"<this thread>/<suspend id>"`` unless
    given. The task returns the child's result, or raises ``kwf.ChildFailed`` when the child
    failed, was cancelled, or its start was refused (unknown workflow, id already used by
    another thread). Cancelling the task cancels the child (``cancel:``; its compensations
    run there); so does this thread ending while the child runs. ``TypeError`` here, at the
    call, if ``arg`` is not JSON.
    """
    inst = _instance("child")
    child_id, ref = inst.start_child(workflow, arg, id, awaited=True)
    assert ref is not None
    return inst.loop.create_task(_child_result(inst, ref, workflow, child_id),
                                 name=f"child {child_id}")


async def _child_result(inst: Instance, ref: Suspend, workflow: str, child_id: str) -> Any:
    try:
        return await ref
    except RemoteError as e:
        raise ChildFailed.from_payload(child_id, workflow, e.payload) from None
    except asyncio.CancelledError:
        inst.cancel_child(child_id)
        raise


def start_child(workflow: str, arg: Any = None, *, id: str | None = None) -> str:
    """Start a child workflow and forget it (fire and forget); returns its thread id.

    Like ``kwf.child``, but nothing waits for its end and it outlives this thread; the link
    to this thread shows in the child's status.
    """
    return _instance("start_child").start_child(workflow, arg, id, awaited=False)[0]


def journal_length() -> int:
    """Events this run of the thread has applied (its journal's length), identical on replay.

    Compare it with a budget to ``kwf.continue_as_new`` before ``KWF_MAX_JOURNAL_EVENTS``.
    """
    return _instance("journal_length").journal_length()


def rng() -> _random.Random:
    """The thread's seeded ``random.Random`` (for ``choice``, ``shuffle``, ...)."""
    return _instance("rng").rng


# -- combinators ------------------------------------------------------------------------
def _start(loop: WorkflowLoop, item: Any) -> asyncio.Future[Any]:
    if isinstance(item, Suspend):
        return item._future
    if isinstance(item, asyncio.Future):
        return item
    if asyncio.iscoroutine(item):
        return loop.start_eagerly(item)
    if hasattr(item, "__await__"):
        return loop.start_eagerly(_awaiting(item))
    msg = f"kwf combinators take coroutines and awaitables, got {item!r}"
    raise TypeError(msg)


async def _awaiting(item: Awaitable[Any]) -> Any:
    return await item


class _Combinator(_Future):
    """One future over children: settles on all values, the first failure, or the first settlement.

    Cancelling it cancels the children and ends cancelled once they all have ended, as
    ``asyncio.gather`` does, so compensations in the children run before the caller resumes.
    """

    __slots__ = ("_children", "_first", "_cancel_rest", "_results", "_left", "_ended",
                 "_cancelling")  # no dict: a live thread keeps one per pending combinator

    def __init__(self, loop: WorkflowLoop, children: list[asyncio.Future[Any]],
                 first: bool, cancel_rest: bool) -> None:
        self._kwf_n = next(loop._counter)  # numbered as ``loop.create_future`` numbers
        super().__init__(loop=loop)
        self._children = children
        self._first = first
        self._cancel_rest = cancel_rest
        self._results: list[Any] = [None] * len(children)
        self._left = len(children)
        self._ended = 0
        self._cancelling = False
        for i, child in enumerate(children):
            child.add_done_callback(partial(_Combinator._child_done, self, i))  # no bound method
        if not children and not first:
            self.set_result([])

    def _child_done(self, i: int, child: asyncio.Future[Any]) -> None:
        self._ended += 1
        if self._cancelling:
            if self._ended == len(self._children):
                super().cancel()
            return
        if self.done():
            return
        if child.cancelled():
            self._settle(error=asyncio.CancelledError())
        elif child.exception() is not None:
            self._settle(error=child.exception())
        elif self._first:
            self._settle(value=child.result())
        else:
            self._results[i] = child.result()
            self._left -= 1
            if self._left == 0:
                self.set_result(self._results)

    def _settle(self, *, value: Any = None, error: BaseException | None = None) -> None:
        # Cancel first: the losers' cleanup (withdrawals) then runs before the caller resumes.
        if self._cancel_rest:
            for child in self._children:
                child.cancel()
        if error is not None:
            self.set_exception(error)
        else:
            self.set_result(value)

    def cancel(self, msg: Any = None) -> bool:
        if self.done() or self._cancelling:
            return False
        self._cancelling = True
        for child in self._children:
            child.cancel(msg)
        if self._ended == len(self._children):
            super().cancel(msg)
        return True


def _combine(items: Iterable[Any], first: bool, cancel_rest: bool, what: str) -> asyncio.Future[Any]:
    loop = _instance(what).loop
    return _Combinator(loop, [_start(loop, item) for item in items], first, cancel_rest)


def all(items: Iterable[Any]) -> asyncio.Future[list[Any]]:
    """All values, in argument order; on the first failure, fail and cancel the others.

    The seed's ``Promise.all``. Items are started now, in order; an empty list gives ``[]``.
    The cancelled ones' cleanup starts before the caller resumes.
    """
    return _combine(items, first=False, cancel_rest=True, what="all")


def race(items: Iterable[Any]) -> asyncio.Future[Any]:
    """The first settlement, value or error, wins; the others are cancelled.

    The seed's ``Promise.race``. An empty race stays pending for ever. The losers' cleanup
    starts before the caller resumes.
    """
    return _combine(items, first=True, cancel_rest=True, what="race")


def gather(items: Iterable[Any]) -> asyncio.Future[list[Any]]:
    """Like ``kwf.all`` but without cancelling the others on a failure (the seed's ``W.all``)."""
    return _combine(items, first=False, cancel_rest=False, what="gather")


def first(items: Iterable[Any]) -> asyncio.Future[Any]:
    """Like ``kwf.race`` but without cancelling the others (the seed's ``W.any``)."""
    return _combine(items, first=True, cancel_rest=False, what="first")


def cancel(item: Any) -> bool:
    """Cancel a task, a combinator or a ``Suspend``: ``CancelledError`` at its bottom-most await.

    Returns False when it had already settled (cancelling is then a no-op, as in the seed).
    """
    if isinstance(item, Suspend):
        return item._future.cancel()
    if isinstance(item, asyncio.Future):
        return item.cancel()
    msg = (f"kwf.cancel() takes a task, a combinator or a Suspend, got {item!r}; start a "
           "coroutine with asyncio.create_task() to be able to cancel it")
    raise TypeError(msg)


async def wait(items: Sequence[Any], *, timeout: float | None = None,
               return_when: str = asyncio.ALL_COMPLETED,
               ) -> tuple[list[asyncio.Future[Any]], list[asyncio.Future[Any]]]:
    """``asyncio.wait`` with ``(done, pending)`` as lists in argument order, not sets."""
    loop = _instance("wait").loop
    futures = [_start(loop, item) for item in items]
    done, _ = await asyncio.wait(futures, timeout=timeout, return_when=return_when)
    return [f for f in futures if f in done], [f for f in futures if f not in done]


async def as_completed(items: Sequence[Any]) -> AsyncIterator[asyncio.Future[Any]]:
    """Yield futures as they complete; ones completing in the same step come in argument order."""
    loop = _instance("as_completed").loop
    pending = [_start(loop, item) for item in items]
    while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for future in [f for f in pending if f in done]:
            yield future
        pending = [f for f in pending if f not in done]
