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


class ChildFailed(Exception):
    """Raised at ``await kwf.child(...)`` when the child did not complete.

    ``status`` is ``"failed"`` (its error text in ``error``), ``"cancelled"``, or ``"refused"``
    (the start was refused: unknown workflow, or ``child`` id already used by another thread).
    """

    def __init__(self, child: str, workflow: str, status: str, error: str) -> None:
        super().__init__(f"child workflow {workflow!r} (thread {child!r}) {status}: {error}")
        self.child, self.workflow, self.status, self.error = child, workflow, status, error

    @classmethod
    def from_payload(cls, child: str, workflow: str, payload: Any) -> ChildFailed:
        """From the error a child (or the engine refusing it) sent to the parent's ref."""
        if isinstance(payload, dict) and isinstance(payload.get("status"), str):
            return cls(child, workflow, payload["status"], str(payload.get("error", "")))
        return cls(child, workflow, "failed", str(RemoteError(payload)))


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
