"""The exceptions kwf raises, in a module of their own so that every other module can import them."""

from __future__ import annotations

import json
from typing import Any


class RemoteError(Exception):
    """Raised at an ``await`` that was resumed with ``{"ref": ..., "error": payload}``.

    ``payload`` is the JSON value exactly as the other service sent it; ``str(error)`` is the
    payload itself when it is a string, else its compact JSON text (keys in the order sent), so
    ``workflow-error`` records read as the seed's did (``"\\"timeout\\""``) and an object reads
    as JSON, not as the seed's ``"[object Object]"``.
    """

    def __init__(self, payload: Any) -> None:
        super().__init__(payload)
        self.payload = payload

    def __str__(self) -> str:
        if isinstance(self.payload, str):
            return self.payload
        return json.dumps(self.payload, ensure_ascii=False, separators=(",", ":"))


class NonDeterminismError(RuntimeError):
    """Replaying a thread's journal did not reproduce what the journal recorded.

    The workflow code changed (or reads something outside kwf's control) since the thread
    started; the thread is parked as ``failed`` rather than continued from a wrong state.
    ``step`` is the step that diverged, when known (``kwf verify`` reports it).
    """

    def __init__(self, msg: str, step: int | None = None) -> None:
        super().__init__(msg)
        self.step = step


class ContinueAsNew(BaseException):  # noqa: N818 - named for what it does, as SystemExit is
    """Raised by ``kwf.continue_as_new``: the run ends and a new one starts with ``arg``.

    A ``BaseException``, as ``SystemExit`` is, so that ``except Exception`` in workflow code lets
    it through; the run ends even if code catches it, since the call itself is what counts.
    """

    def __init__(self, arg: Any, workflow: str | None) -> None:
        super().__init__(workflow)
        self.arg = arg
        self.workflow = workflow


class WorkflowNotAvailable(RuntimeError):
    """Workflow code asked for something a deterministic workflow cannot have (I/O, threads)."""
