"""The deterministic event loop that one workflow thread runs on.

Everything a replay must reproduce is decided here: callbacks run in FIFO order, time is the
logical time the instance sets (never the wall clock), timers are recorded rather than slept,
and tasks and futures hash by a per-loop creation counter, so that the sets CPython keeps
inside ``asyncio.wait`` and ``TaskGroup`` iterate in the same order in every process. The loop
does no I/O: every I/O method raises ``WorkflowNotAvailable`` naming the workflow.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import math
import threading
import zlib
from asyncio import events, format_helpers, tasks
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import structlog

from kwf.errors import WorkflowNotAvailable

log = structlog.get_logger("kwf.loop")


class _Future(asyncio.Future):  # type: ignore[type-arg]
    """A future whose hash is its creation number in the loop, not its memory address.

    Made by ``WorkflowLoop.create_future``, which numbers it (an ``__init__`` doing so would
    cost a Python frame per future; asyncio's own does not hash it). A subclass numbers
    itself in its ``__init__``, before anything may hash it.
    """

    __slots__ = ("_kwf_n",)  # else a dict per future, 160 bytes
    _kwf_n: int

    def __hash__(self) -> int:
        return self._kwf_n


class _Task(asyncio.Task):  # type: ignore[type-arg]
    """A task whose hash is its creation number, for the same reason as ``_Future``."""

    __slots__ = ("_kwf_n",)
    _kwf_n: int

    def __init__(self, coro: Any, *, loop: WorkflowLoop, **kwargs: Any) -> None:
        self._kwf_n = next(loop._counter)  # asyncio adds the task to a WeakSet in __init__
        super().__init__(coro, loop=loop, **kwargs)

    def __hash__(self) -> int:
        return self._kwf_n


_new_handle = object.__new__


class _Current(threading.local):
    """The ``WorkflowLoop`` running in this OS thread, if any. It is asyncio's running loop
    then too; kept here as well so that ``kwf.api`` finds its instance without asyncio's
    ``get_running_loop``, which calls ``getpid()`` each time on CPython 3.11."""

    loop: WorkflowLoop | None = None


_current = _Current()


def _refuser(name: str, what: str) -> Callable[..., Any]:
    """A loop method that workflow code must not reach: it raises, naming the thread and why."""
    def refuse(self: WorkflowLoop, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse(f"{name} ({what})")
    refuse.__name__ = name
    return refuse


class WorkflowLoop(asyncio.AbstractEventLoop):
    """An asyncio loop for one workflow thread: FIFO, logical time, no I/O.

    The owner drives it: ``run_until_idle()`` runs ready callbacks until none is left,
    ``fire_timers(t)`` moves the clock to ``t`` and readies every timer due by then.
    """

    __slots__ = ("_ready", "_head", "_timers", "_cancelled_timers", "_time", "_counter", "_owner",
                 "_workflow", "_closed", "_running", "_eager", "tasks", "instance")

    def __init__(self, start_time: float, owner: str, workflow: str = "?") -> None:
        self._ready: list[asyncio.Handle] = []
        self._head = 0
        """``_ready[_head:]`` is the FIFO of callbacks to run (a list is 700 bytes smaller
        than a deque, for each thread kept live)."""
        self._timers: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._cancelled_timers = 0
        self._time = start_time
        # Hashes are salt + creation number: the same in every process for this thread, and
        # spread across threads, so asyncio's global WeakSet of tasks does not collide.
        self._counter = itertools.count(zlib.crc32(owner.encode()) << 16)
        self._owner = owner
        self._workflow = workflow
        self._closed = False
        self._running = False
        self._eager: list[asyncio.Handle] | None = None
        self.tasks: list[_Task] = []
        """Every task created on this loop, in creation order (disposal walks it)."""
        self.instance: Any = None
        """The ``Instance`` this loop runs; ``kwf.suspend()`` and friends find it here."""

    # -- what asyncio calls -------------------------------------------------------------
    def time(self) -> float:
        return self._time

    def call_soon(self, callback: Callable[..., Any], *args: Any,
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        # ``asyncio.Handle(callback, args, self, context)`` without its ``__init__``, which
        # asks the loop whether it debugs: several times a step, a Python frame each.
        handle: Any = _new_handle(asyncio.Handle)
        handle._callback = callback
        handle._args = args
        handle._loop = self
        handle._context = contextvars.copy_context() if context is None else context
        handle._cancelled = False
        handle._repr = None
        handle._source_traceback = None
        if self._eager is not None:  # the first step of an eagerly started task
            self._eager.append(handle)
        else:
            self._ready.append(handle)
        return handle  # type: ignore[no-any-return]

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any,
                   context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        return self.call_at(self._time + delay, callback, *args, context=context)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        if math.isnan(when) or when == -math.inf:
            msg = f"a durable timer needs a time; got {when} (thread {self._owner!r})"
            raise ValueError(msg)
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        if when != math.inf:  # sleep(inf) waits for ever: nothing to record
            heapq.heappush(self._timers, (when, next(self._counter), handle))
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        """Cancelled timers stay in the heap and are skipped, until they are half of it.

        A loop around ``asyncio.timeout`` cancels a timer per iteration: without the sweep, a
        thread that runs for months would carry every one of them (and each step's status
        record walks the heap).
        """
        self._cancelled_timers += 1
        if self._cancelled_timers > 64 and 2 * self._cancelled_timers > len(self._timers):
            self._timers = [t for t in self._timers if not t[2]._cancelled and t[2] is not handle]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def create_future(self) -> _Future:
        future = _Future(loop=self)
        future._kwf_n = next(self._counter)
        return future

    def create_task(self, coro: Any, *, name: str | None = None,
                    context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        task = _Task(coro, loop=self, name=name, context=context)
        self.tasks.append(task)
        return task

    def start_eagerly(self, coro: Any) -> asyncio.Task[Any]:
        """Create a task and run it to its first suspension now, as a JavaScript call does.

        This is how ``kwf.all([a(), b()])`` gives ``a`` its suspend ids before ``b``.
        """
        captured: list[asyncio.Handle] = []
        self._eager = captured
        try:
            task = self.create_task(coro)
        finally:
            self._eager = None
        current = tasks.current_task(self) if self._running else None
        if current is not None:
            tasks._leave_task(self, current)
        try:
            for handle in captured:
                handle._run()
        finally:
            if current is not None:
                tasks._enter_task(self, current)
        return task

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._ready.clear()
        self._head = 0
        self._timers.clear()

    get_debug = staticmethod(bool)
    """Always False, without a Python frame: asyncio asks on every future and task."""

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        # Reached for "exception never retrieved" and the like: worth a log line, no more.
        log.debug("asyncio_exception", thread=self._owner, message=context.get("message"))

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    # -- what the instance calls --------------------------------------------------------
    @contextmanager
    def running(self) -> Iterator[None]:
        """Make this the running loop of the calling OS thread for the duration.

        Restores whatever loop was running before, so an Engine works inside a notebook,
        whose own asyncio loop is running.
        """
        previous, outer = events._get_running_loop(), _current.loop
        events._set_running_loop(self)
        _current.loop = self
        self._running = True
        try:
            yield
        finally:
            self._running = False
            _current.loop = outer
            events._set_running_loop(previous)

    def run_until_idle(self) -> None:
        """Run ready callbacks, FIFO, until nothing is ready (the workflow is waiting)."""
        ready = self._ready
        previous, outer = events._get_running_loop(), _current.loop  # ``running()``, inline
        events._set_running_loop(self)
        _current.loop = self
        self._running = True
        try:
            while (head := self._head) < len(ready):
                handle = ready[head]
                self._head = head + 1
                if not handle._cancelled:
                    try:  # ``handle._run()``, inline
                        handle._context.run(  # type: ignore[attr-defined]
                            handle._callback, *handle._args)  # type: ignore[attr-defined]
                    except SystemExit:  # the task that raised it holds it as its exception,
                        pass            # so that workflow fails alone
                    except KeyboardInterrupt:
                        raise
                    except BaseException as e:
                        self._callback_failed(handle, e)
            ready.clear()
            self._head = 0
        finally:
            self._running = False
            _current.loop = outer
            events._set_running_loop(previous)

    def _callback_failed(self, handle: asyncio.Handle, error: BaseException) -> None:
        """What ``Handle._run`` does with an exception: hand it to the exception handler."""
        source = format_helpers._format_callback_source(
            handle._callback, handle._args)  # type: ignore[attr-defined]
        self.call_exception_handler({"message": f"Exception in callback {source}",
                                     "exception": error, "handle": handle})

    def next_timer(self) -> float | None:
        """The due time of the earliest live timer, or None."""
        timers = self._timers
        while timers and timers[0][2]._cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def timer_dues(self) -> list[float]:
        """Due times of all live timers, sorted (for status records)."""
        return sorted(when for when, _, h in self._timers if not h._cancelled)

    def fire_timers(self, now: float) -> None:
        """Move logical time to ``now`` and ready every timer due by then, in due order."""
        self._time = max(self._time, now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, handle = heapq.heappop(timers)
            if not handle._cancelled:
                self._ready.append(handle)

    def set_time(self, now: float) -> None:
        """Logical time never goes backwards, whatever the timestamps of records."""
        self._time = max(self._time, now)

    # -- what a workflow must not do -----------------------------------------------------
    def _refuse(self, what: str) -> WorkflowNotAvailable:
        msg = (
            f"{what} is not available in workflow {self._workflow!r} (thread {self._owner!r}): "
            "workflow code is replayed and must be deterministic; do I/O in another service "
            "and talk to it with kwf.output + await kwf.suspend(), or kwf.call"
        )
        return WorkflowNotAvailable(msg)

    run_in_executor = _refuser("run_in_executor", "threads")
    getaddrinfo = _refuser("getaddrinfo", "DNS")
    getnameinfo = _refuser("getnameinfo", "DNS")
    create_connection = _refuser("create_connection", "sockets")
    create_server = _refuser("create_server", "sockets")
    create_datagram_endpoint = _refuser("create_datagram_endpoint", "sockets")
    create_unix_connection = _refuser("create_unix_connection", "sockets")
    create_unix_server = _refuser("create_unix_server", "sockets")
    sock_connect = _refuser("sock_connect", "sockets")
    sock_recv = _refuser("sock_recv", "sockets")
    sock_sendall = _refuser("sock_sendall", "sockets")
    sock_accept = _refuser("sock_accept", "sockets")
    subprocess_exec = _refuser("subprocess_exec", "subprocesses")
    subprocess_shell = _refuser("subprocess_shell", "subprocesses")
    add_reader = _refuser("add_reader", "file descriptors")
    add_writer = _refuser("add_writer", "file descriptors")
    connect_read_pipe = _refuser("connect_read_pipe", "pipes")
    connect_write_pipe = _refuser("connect_write_pipe", "pipes")
    add_signal_handler = _refuser("add_signal_handler", "signals")
    run_forever = _refuser("run_forever", "the engine drives this loop")
    run_until_complete = _refuser("run_until_complete", "the engine drives this loop")
