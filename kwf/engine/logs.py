"""The engine process's one log format: every line it writes to stderr is one log event.

JSON objects by default (one per line, compact, for collectors), console lines with
``KWF_LOG_FORMAT=console``; ``KWF_LOG_LEVEL`` (debug, info, warning, error) filters them. Each
line carries ``process`` (the Bytewax process id) and ``worker`` (the global worker index, or
null for a line no worker wrote). This module owns:

- structlog's configuration for the engine process (a library must not impose one);
- stdlib ``logging`` routed into structlog: Python warnings, and librdkafka's messages, which
  confluent-kafka hands to the ``logger`` that ``kafka_client_config`` puts into every Kafka
  client's settings, rate limited per client and facility (a broker outage makes thousands);
- Python's last-resort hooks: an uncaught exception is one event with its traceback, a stop
  by SIGINT or SIGTERM is ``engine_stopped`` without a traceback, a lost cluster peer is
  ``cluster_peer_lost``;
- the capture of file descriptor 2 (``capture_stderr``): what native code writes there (the
  Rust panic message Bytewax's single-worker run prints when it stops, a library's stray
  print) becomes a log event. Bytewax's own Rust ``tracing`` output is off unless someone
  calls ``bytewax.tracing.setup_tracing``, which the engine does not.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, TextIO

import structlog

from kwf.config import Settings

log = structlog.get_logger("kwf.engine")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
FORMATS = ("json", "console")

KAFKA_LOG_INTERVAL_S = 30.0
"""librdkafka messages of one client and facility: ``KAFKA_LOG_BURST`` per this many seconds."""
KAFKA_LOG_BURST = 3

_PEER_LOST = re.compile(r"timely communication|Send thread panic|Connection reset by peer|"
                        r"Broken pipe|connection refused|unexpected end of file|"
                        r"failed to fill whole buffer", re.IGNORECASE)
"""What Timely's network threads panic with when another process of the cluster goes away."""


def _dumps(obj: Any, **_: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=repr)


# -- process and worker ids ------------------------------------------------------------------------

def _flag(argv: Sequence[str], short: str, long: str) -> str | None:
    """The value of ``-x V``, ``-xV``, ``--long V`` or ``--long=V`` in ``argv``, if given."""
    for i, arg in enumerate(argv):
        if arg in (short, long) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(long + "="):
            return arg[len(long) + 1:]
        if arg.startswith(short) and len(arg) > len(short) and not arg.startswith("--"):
            return arg[len(short):]
    return None


def cluster_position(argv: Sequence[str] | None = None,
                     env: Mapping[str, str] | None = None) -> tuple[int, int, bool]:
    """(process id, workers per process, single worker on the main thread) as ``bytewax.run``
    reads them: its ``-i``/``-w``/``-a`` flags, their ``BYTEWAX_*`` variables, or the Helm
    chart's pod name."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    proc = _flag(argv, "-i", "--process-id") or env.get("BYTEWAX_PROCESS_ID")
    pod, sts = env.get("BYTEWAX_POD_NAME"), env.get("BYTEWAX_STATEFULSET_NAME")
    if proc is None and pod and sts:
        proc = pod.replace(f"{sts}-", "")
    workers = _flag(argv, "-w", "--workers-per-process") or env.get("BYTEWAX_WORKERS_PER_PROCESS")
    addresses = _flag(argv, "-a", "--addresses") or env.get("BYTEWAX_ADDRESSES")
    try:
        process, per_process = int(proc or 0), int(workers or 1)
    except ValueError:
        process, per_process = 0, 1
    return process, per_process, per_process == 1 and not addresses


class _Ids:
    """A structlog processor adding ``process`` and ``worker`` to every event.

    A Bytewax worker is an OS thread named ``timely:work-<local index>`` (or the main thread
    when the process runs a single worker); the name is read once per thread from ``/proc``.
    """

    def __init__(self) -> None:
        self.process, self.per_process, self.single = cluster_position()
        self._workers: dict[int, int | None] = {}

    def worker(self) -> int | None:
        ident = threading.get_ident()
        try:
            return self._workers[ident]
        except KeyError:
            pass
        worker: int | None = None
        if threading.current_thread() is threading.main_thread():
            worker = self.process if self.single else None
        else:
            try:
                name = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text()
            except OSError:
                name = ""
            if name.startswith("timely:work-") and name[12:].strip().isdigit():
                worker = self.process * self.per_process + int(name[12:])
        self._workers[ident] = worker
        return worker

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", self.process)
        event.setdefault("worker", self.worker())
        return event


# -- configuration -----------------------------------------------------------------------------

def settings_from_env(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """``KWF_LOG_FORMAT`` and ``KWF_LOG_LEVEL``, checked: ``ValueError`` names what is allowed."""
    env = os.environ if env is None else env
    fmt = env.get("KWF_LOG_FORMAT", "json").strip().lower() or "json"
    level = env.get("KWF_LOG_LEVEL", "info").strip().lower() or "info"
    if fmt not in FORMATS:
        msg = f"KWF_LOG_FORMAT={fmt!r}: use one of {', '.join(FORMATS)}"
        raise ValueError(msg)
    if level not in LEVELS:
        msg = f"KWF_LOG_LEVEL={level!r}: use one of {', '.join(LEVELS)}"
        raise ValueError(msg)
    return fmt, LEVELS[level]


_state: dict[str, Any] = {"stream": None, "level": logging.INFO, "format": "json"}


def configure(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> None:
    """Configure structlog and stdlib logging for the engine process (idempotent).

    Raises ``ValueError`` for a bad ``KWF_LOG_FORMAT``/``KWF_LOG_LEVEL`` (after configuring
    the defaults, so that the error itself is logged in the engine's format).
    """
    try:
        fmt, level = settings_from_env(env)
        error = None
    except ValueError as e:
        (fmt, level), error = ("json", logging.INFO), e
    _state.update(stream=stream or _state["stream"] or sys.stderr, level=level, format=fmt)
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                     else structlog.processors.JSONRenderer(serializer=_dumps))
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars,
                    structlog.processors.add_log_level, _Ids(),
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(_state["stream"]),
        cache_logger_on_first_use=False)
    _route_stdlib(level)
    _install_hooks()
    if error is not None:
        raise error


# -- stdlib logging and librdkafka ---------------------------------------------------------------

class _Throttle:
    """At most ``burst`` messages per key and ``interval_s``; counts what it holds back."""

    def __init__(self, interval_s: float, burst: int) -> None:
        self.interval_s, self.burst = interval_s, burst
        self._windows: dict[Any, list[float]] = {}  # key -> [window start, shown, held back]
        self._lock = threading.Lock()

    def allow(self, key: Any, now: float | None = None) -> int | None:
        """None to drop the message; else how many were held back since the last one shown."""
        now = time.monotonic() if now is None else now
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval_s:
                held = int(window[2]) if window is not None else 0
                self._windows[key] = [now, 1, 0]
                return held
            if window[1] < self.burst:
                window[1] += 1
                held, window[2] = int(window[2]), 0
                return held
            window[2] += 1
            return None


class _ToStructlog(logging.Handler):
    """Stdlib log records as structlog events (so they share the format and the ids)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            structlog.get_logger().log(record.levelno, record.getMessage(), **fields)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _KafkaHandler(logging.Handler):
    """librdkafka's messages (``fac``, client name, text), throttled per client and facility."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = _Throttle(KAFKA_LOG_INTERVAL_S, KAFKA_LOG_BURST)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            args = record.args if isinstance(record.args, tuple) else ()
            if len(args) == 3:
                facility, client, text = (str(a) for a in args)
            else:
                facility, client, text = "", "", record.getMessage()
            held = self.throttle.allow((client, facility))
            if held is None:
                return
            fields: dict[str, Any] = {"facility": facility, "client": client, "message": text}
            if held:
                fields["suppressed"] = held
            structlog.get_logger().log(max(record.levelno, logging.DEBUG), "kafka_client_log",
                                       **fields)
        except Exception:  # noqa: BLE001
            self.handleError(record)


KAFKA_LOGGER = logging.getLogger("kwf.engine.librdkafka")
"""Where librdkafka's messages go (confluent-kafka's ``logger`` client setting)."""
KAFKA_LOGGER.propagate = False
KAFKA_LOGGER.setLevel(logging.DEBUG)
KAFKA_LOGGER.addHandler(_KafkaHandler())


_CLIENT_ERRORS = _Throttle(KAFKA_LOG_INTERVAL_S, KAFKA_LOG_BURST)


def kafka_client_error(err: Any) -> None:
    """librdkafka's client-level errors (``error_cb``: brokers down, DNS, TLS, auth...) as
    ``kafka_client_error`` events, throttled per error code like ``KAFKA_LOGGER``. They are
    retried by librdkafka; a record is lost only if its own delivery fails, which the sink's
    delivery callback reports."""
    held = _CLIENT_ERRORS.allow(err.code())
    if held is None:
        return
    log.warning("kafka_client_error", error=err.str(), code=err.name(), fatal=err.fatal(),
                **({"suppressed": held} if held else {}))


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """The librdkafka settings of EVERY Kafka client the engine creates; use nothing else.

    Consumers, producers and admin clients alike: ``Settings.kafka_config()`` (the brokers,
    the properties file with TLS/SASL settings) plus ``logger``, which makes confluent-kafka
    hand librdkafka's messages to ``KAFKA_LOGGER`` (served by the client's ``poll``/``consume``
    calls) instead of letting librdkafka print its own lines on stderr, and ``error_cb``
    (``kafka_client_error``). Those messages become ``kafka_client_log`` events, at most
    ``KAFKA_LOG_BURST`` per client and facility every ``KAFKA_LOG_INTERVAL_S`` seconds, the
    next one counting the ``suppressed``; errors likewise per error code. A client built
    from another dict prints non-JSON lines (caught by ``capture_stderr`` at best), and one
    that sets its own ``error_cb`` must throttle it. The values are strings except
    ``logger`` and ``error_cb``; callers add their own settings on top.
    """
    return {**settings.kafka_config(), "logger": KAFKA_LOGGER, "error_cb": kafka_client_error}


def _route_stdlib(level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    root.setLevel(level)
    logging.captureWarnings(True)


# -- last-resort hooks -----------------------------------------------------------------------

_stop: dict[str, str] = {}
"""The signal that asked the engine to stop, once one did."""


def stopping() -> str | None:
    """The name of the signal that asked the engine to stop, if one did."""
    return _stop.get("signal")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stop.setdefault("signal", signal.Signals(signum).name)
    raise KeyboardInterrupt  # Bytewax checks for it between activations, then stops the workers


def _excepthook(kind: type[BaseException], error: BaseException,
                tb: TracebackType | None) -> None:
    if stopping() or _caused_by(error, KeyboardInterrupt):  # Bytewax wraps it, at times
        log.info("engine_stopped", signal=stopping() or "SIGINT")
    elif _PEER_LOST.search(str(error)):
        log.error("cluster_peer_lost", error=str(error).strip(),
                  what_to_do="another process of the cluster stopped or became unreachable; "
                             "this one stops too, restart them all: the engine resumes from "
                             "its recovery store")
    else:
        log.critical("engine_crashed", error=str(error), error_type=kind.__qualname__,
                     exc_info=(kind, error, tb))


def _caused_by(error: BaseException | None, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    log.error("thread_crashed", thread=getattr(args.thread, "name", None),
              error=str(args.exc_value), error_type=args.exc_type.__qualname__,
              exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisablehook(args: Any) -> None:
    log.warning("unraisable_exception", error=repr(args.exc_value), where=repr(args.object),
                message=args.err_msg)


def _install_hooks() -> None:
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _on_signal)


# -- file descriptor 2 -------------------------------------------------------------------------

_PANIC = re.compile(r"thread '(?P<thread>[^']*)' panicked at (?P<where>.*?):?$")


class _StderrReader:
    """Reads what is written to fd 2 and logs it: a JSON line passes, other lines are events.

    A Rust panic message (``thread 'x' panicked at f.rs:1:2:``, its text, the ``note: run
    with RUST_BACKTRACE`` line) becomes one ``rust_panic`` event: at debug level when a
    signal stopped the engine (the normal way Bytewax stops), else a warning (the exception
    it becomes is logged by the excepthook too).
    """

    def __init__(self, pipe: int) -> None:
        self.pipe = pipe
        self.panic: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._run, name="kwf-stderr", daemon=True)

    def _run(self) -> None:
        with os.fdopen(self.pipe, "rb") as lines:
            for raw in lines:
                try:
                    self._line(raw.decode("utf-8", "replace").rstrip("\r\n"))
                except Exception:  # noqa: BLE001, S110 - never stop draining the pipe
                    pass
        self._flush_panic()

    def _line(self, text: str) -> None:
        match = _PANIC.match(text)
        if match:
            self._flush_panic()
            self.panic = {"thread": match["thread"], "at": match["where"], "text": []}
            return
        if self.panic is not None:
            if text.startswith("note: ") or not text.strip():
                self._flush_panic()
            else:
                self.panic["text"].append(text)
            return
        if not text.strip():
            return
        if text.startswith("{"):
            try:
                json.loads(text)
            except ValueError:
                pass
            else:
                stream = _state["stream"]
                stream.write(text + "\n")
                stream.flush()
                return
        log.warning("stderr", text=text)

    def _flush_panic(self) -> None:
        panic, self.panic = self.panic, None
        if panic is None:
            return
        message = "\n".join(panic["text"])
        level = logging.DEBUG if stopping() or "KeyboardInterrupt" in message else logging.WARNING
        log.log(level, "rust_panic", thread=panic["thread"], at=panic["at"], message=message)


def capture_stderr() -> Callable[[], None]:
    """Route file descriptor 2 through ``_StderrReader``; return what undoes it.

    Only for the engine process (``kwf.engine.engine_flow`` calls it): log events then go to
    a duplicate of the original stderr, and everything else that writes to fd 2 (Python's
    ``sys.stderr``, native code) goes through the reader. Undone at exit, after the last
    uncaught-exception event, so the reader can drain the pipe.
    """
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    stream: TextIO = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace")
    _state["stream"] = stream
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(stream))
    reader = _StderrReader(read_end)
    reader.thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 2)  # the pipe's last write end closes: the reader sees its end
        reader.thread.join(5.0)

    atexit.register(restore)
    return restore
