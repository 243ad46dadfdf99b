"""What the runtime core tells operators: tracebacks of workflow code, and counts of what it does.

``workflow_traceback`` formats an exception as Python prints it, keeping only the frames of
workflow code (kwf's own and asyncio's are left out) and capped, for the ``kwf-traceback``
header, the ``workflow-events`` record, the log and ``Engine.error``. Tracebacks name files
on the machine that ran the step, so they never enter a journal check (see
``Instance._emit``): replay elsewhere must not diverge over a path.

``Stats`` is the hook through which the core counts threads, records, steps, replays, journal
sizes, dead letters and timers. The default does nothing; an engine installs its own with
``install`` (``kwf.engine.metrics`` binds it to Prometheus), so the core never imports the
engine. The core calls the methods of ``stats`` (the module attribute, looked up at each call)
once per event; each must be cheap and must never raise.
"""

from __future__ import annotations

import asyncio
import os
import traceback
from typing import Iterator

TRACEBACK_FRAMES = 20
"""The last frames of each exception in a chain that a traceback keeps."""
TRACEBACK_CHARS = 4096
"""A traceback longer than this keeps its end (where the error is), after a ``...`` line."""

_HIDDEN = (os.path.dirname(__file__) + os.sep, os.path.dirname(asyncio.__file__ or "") + os.sep)


def _internal(filename: str) -> bool:
    return filename.startswith(_HIDDEN) or filename.startswith("<frozen ")


def _chain(te: traceback.TracebackException) -> Iterator[traceback.TracebackException]:
    """``te`` and every exception chained to it (causes, contexts, groups' members)."""
    todo, seen = [te], set()
    while todo:
        part = todo.pop()
        if id(part) in seen:
            continue
        seen.add(id(part))
        yield part
        todo += [p for p in (part.__cause__, part.__context__) if p is not None]
        todo += getattr(part, "exceptions", None) or []


def workflow_traceback(error: BaseException, frames: int = TRACEBACK_FRAMES,
                       chars: int = TRACEBACK_CHARS) -> str:
    """``error`` as Python prints it, with only workflow code's frames (the last ``frames``).

    >>> try:
    ...     {}["b"]
    ... except KeyError as e:
    ...     print(workflow_traceback(e).splitlines()[-1])
    KeyError: 'b'
    """
    te = traceback.TracebackException.from_exception(error, compact=True)
    for part in _chain(te):
        kept = [f for f in part.stack if not _internal(f.filename)][-frames:]
        part.stack = traceback.StackSummary.from_list(kept)
    text = "".join(te.format()).rstrip("\n")
    if len(text) > chars:
        text = "...\n" + text[-chars:].split("\n", 1)[-1]
    return text


def where(error: BaseException) -> str:
    """Where ``error`` was raised in user code: ``file:line in function``, or "" if unknown.

    A ``SyntaxError`` names its own file and line; otherwise the innermost frame outside
    kwf, asyncio and the import machinery.
    """
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not _internal(frame.filename):
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return ""


class Stats:
    """What the core counts; this base counts nothing (the default, and for ``Engine``)."""

    def thread_started(self, workflow: str) -> None:
        """A thread started (``new:``/``init:``, or a replacement)."""

    def thread_ended(self, workflow: str, status: str) -> None:
        """A thread ended: completed, failed, cancelled, parked (its replay diverged),
        replaced (by a ``new:`` with its id while it ran), or continued (its run called
        ``kwf.continue_as_new``: a new run starts at once)."""

    def record(self, kind: str, timestamp: float | None) -> None:
        """A record was applied: kind new, init, resume, error, cancel or schedule;
        ``timestamp`` is its Kafka timestamp (seconds), for the input lag, if known."""

    def step(self, workflow: str, seconds: float) -> None:
        """A live step ran (a start or an event), taking ``seconds`` of CPU-bound work."""

    def replay(self, workflow: str, seconds: float, events: int) -> None:
        """A thread was rebuilt from its journal of ``events`` events."""

    def journal(self, size: int) -> None:
        """A thread's journal was encoded for a snapshot: ``size`` bytes."""

    def dead_letter(self, code: str) -> None:
        """A record went to the dead-letter topic; ``code`` is its ``kwf-error`` prefix."""

    def timer_fired(self, due: float) -> None:
        """A durable timer due at ``due`` (seconds since the epoch) fired now."""

    def journal_long(self, workflow: str) -> None:
        """A thread's journal reached ``KWF_JOURNAL_WARN_EVENTS`` events (once per thread)."""


stats = Stats()
"""The installed hook; replace it with ``install``."""


def install(hook: Stats) -> Stats:
    """Make ``hook`` the core's ``stats``; returns the previous one."""
    global stats  # noqa: PLW0603 - one process-wide hook, swapped rarely
    previous, stats = stats, hook
    return previous
