"""Request/reply to another service from workflow code: ``await kwf.call(topic, payload)``.

A call is a ``kwf.suspend()`` plus one output, with what every real integration adds around
them: a durable timeout per attempt, retries with exponential backoff and deterministic jitter,
an idempotency key that stays the same across attempts, and a cancel message when the call is
abandoned. Everything here is built from the public workflow API (suspend, output, the loop's
durable timers, ``kwf.random``), so it replays exactly and adds no engine feature. It never does
I/O itself and never reads the wall clock.

Wire shape of a request (JSON, key = thread id, headers ``kwf-thread``/``kwf-seq``/``kwf-step``)::

    {"ref": "3:1", "key": "order-17/3:1", "attempt": 1, "payload": <payload>}

The service answers on ``workflow-resume`` with key = the thread id (header ``kwf-thread``) and
``{"ref": <ref>, "value": v}`` or ``{"ref": <ref>, "error": e}``; it should act once per ``key``.
A reply to an earlier attempt arrives at a ref nothing waits for any more and is ignored.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Union

from kwf.api import output_json, random, suspend, thread_id
from kwf.errors import RemoteError

__all__ = ["CallTimeout", "RetryOn", "call"]

RetryOn = Union[tuple[type[BaseException], ...], Callable[[BaseException], bool]]
"""Which failures of an attempt are retried: exception types, or a predicate."""

DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (RemoteError, TimeoutError)


class CallTimeout(TimeoutError):
    """No reply came within ``timeout`` on the last attempt of a ``kwf.call``.

    ``key`` is the call's idempotency key, for a compensation to name what to undo.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _retryable(error: BaseException, retry_on: RetryOn) -> bool:
    if isinstance(retry_on, tuple):
        return isinstance(error, retry_on)
    return retry_on(error)


def backoff_delay(attempt: int, backoff: float, max_backoff: float, jitter: float,
                  draw: float) -> float:
    """The wait after failed attempt ``attempt`` (1-based): exponential, capped, jittered down.

    ``draw`` is a number in [0, 1) (``kwf.random()`` in a workflow), so the jitter spreads
    retries of many threads apart without ever exceeding ``max_backoff``.

    >>> [backoff_delay(n, 1.0, 5.0, 0.0, 0.5) for n in (1, 2, 3, 4)]
    [1.0, 2.0, 4.0, 5.0]
    >>> backoff_delay(2, 1.0, 60.0, 0.5, 0.5)
    1.5
    """
    return min(max_backoff, backoff * 2.0 ** (attempt - 1)) * (1.0 - jitter * draw)


async def call(topic: str, payload: Any = None, *, timeout: float | None = None,
               retries: int = 0, backoff: float = 1.0, max_backoff: float = 300.0,
               jitter: float = 0.2, retry_on: RetryOn = DEFAULT_RETRY_ON,
               key: str | None = None, cancel_topic: str | None = None) -> Any:
    """Send a request to ``topic`` and return the reply's value; retry failed attempts.

    Each attempt is a new ``kwf.suspend()`` and one request record (shape in the module
    docstring). Timeouts and backoff waits are durable timers: they survive restarts and run
    on virtual time in ``kwf.testing.Engine``. The jitter comes from ``kwf.random()``, so a
    replay waits exactly as the first run did.

    Cancellation (a ``kwf.race`` lost, an outer timeout, ``cancel:`` of the thread) raises
    ``asyncio.CancelledError`` out of the call; with ``cancel_topic`` the call first writes
    ``{"ref": ..., "key": ...}`` there, so the service can drop or undo the request. The
    caller compensates what earlier calls did in its own ``except`` block.

    >>> import kwf
    >>> from kwf.calls import call          # also exported as kwf.call
    >>> kwf.config.output_topics |= {"doc-price"}
    >>> @kwf.workflow("doc-call")
    ... async def quote(arg):
    ...     return await call("doc-price", {"sku": arg}, timeout=5, retries=2)
    >>> from kwf.testing import Engine
    >>> eng = Engine(workflows=[quote])
    >>> answers = iter([None, 42])          # the first request goes unanswered
    >>> eng.handle("doc-price", lambda rec: next(answers))
    >>> _ = eng.send("t1", 'new:"apple"')
    >>> _ = eng.advance(60)                  # 5 s timeout, then ~1 s backoff, then the reply
    >>> eng.result("t1")
    42
    >>> [r.json()["attempt"] for r in eng.outputs("doc-price")]
    [1, 2]

    Args:
        topic: the service's request topic; it must be in ``kwf.config.output_topics``.
        payload: any JSON value; the service reads it as the request's ``"payload"``.
        timeout: seconds to wait for each attempt's reply; None waits for ever.
        retries: further attempts after the first one fails with a ``retry_on`` error.
        backoff: seconds to wait after the first failed attempt; doubles after each one.
        max_backoff: cap of the wait between attempts, in seconds.
        jitter: fraction of the wait taken off at random (0 for none, at most 1).
        retry_on: exception types, or a predicate, saying which failures are retried.
        key: idempotency key sent with every attempt; ``"<thread>/<first ref>"`` by default.
        cancel_topic: where to say the call was abandoned (cancelled, or its last attempt
            timed out); must be declared like ``topic``.

    Returns:
        The reply's ``"value"`` (None when it has none).

    Raises:
        kwf.RemoteError: the service answered ``"error"`` and no retry is left or allowed.
        CallTimeout: the last attempt got no reply within ``timeout``.
        asyncio.CancelledError: the call was cancelled from outside.
    """
    if retries < 0 or backoff < 0 or not 0.0 <= jitter <= 1.0:
        msg = (f"kwf.call({topic!r}): retries={retries}, backoff={backoff} must be >= 0 and "
               f"jitter={jitter} within [0, 1]")
        raise ValueError(msg)
    attempt = 0
    while True:
        attempt += 1
        ref = suspend()
        key = key or f"{thread_id()}/{ref.id}"
        output_json({"ref": ref.id, "key": key, "attempt": attempt, "payload": payload}, topic)
        try:
            try:
                async with asyncio.timeout(timeout):
                    return await ref
            except Exception as error:
                if not (attempt <= retries and _retryable(error, retry_on)):
                    if not isinstance(error, TimeoutError):
                        raise
                    msg = (f"call to {topic!r} got no reply within {timeout} s "
                           f"(attempt {attempt} of {retries + 1}, key {key!r})")
                    raise CallTimeout(msg, key) from None
            await asyncio.sleep(backoff_delay(attempt, backoff, max_backoff, jitter, random()))
        except (asyncio.CancelledError, CallTimeout):
            if cancel_topic is not None:  # the service may hold the request: let it drop it
                output_json({"ref": ref.id, "key": key}, cancel_topic)
            raise
