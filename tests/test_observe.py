"""Seeing what the engine does, in-process: tracebacks, import errors, the stats hook, the log
format, and dead letters kept whole. The same on a real broker: ``test_observe_kafka.py``."""

from __future__ import annotations

import io
import json
import logging
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import kwf
from kwf import observe
from kwf.config import Settings
from kwf.engine import logs
from kwf.instance import Instance
from kwf.journal import Journal
from kwf.protocol import DLQ_KEEP_BYTES, Incoming, dead_letter
from kwf.registry import WorkflowImportError, load_modules
from kwf.testing import Engine

KWF_DIR = str(Path(kwf.__file__).parent)


def _dig(d: dict[str, Any], depth: int) -> Any:
    if depth == 0:
        return d["b"]
    return _dig(d, depth - 1)


@kwf.workflow("obs-fails")
async def fails(arg: dict[str, Any]) -> Any:
    ref = kwf.suspend("go")
    await kwf.all([ref])  # kwf's own frames in between: left out of the traceback
    return _dig(arg, int(arg.get("depth", 0)))


@pytest.fixture
def eng() -> Iterator[Engine]:
    with Engine(workflows=[fails]) as engine:
        yield engine


# -- tracebacks -------------------------------------------------------------------------------------

def test_a_failed_workflow_carries_the_traceback_of_its_frames_everywhere(eng: Engine) -> None:
    eng.send("t1", 'new:{"a": 1}')
    eng.send("t1", '{"ref": "go", "value": 1}')
    [error] = eng.outputs("workflow-error")
    assert error.value == json.dumps("'b'")  # the value stays the seed's: str(exception)
    assert error.header("kwf-error-type") == "KeyError"
    trace = error.header("kwf-traceback")
    assert trace is not None
    lines = trace.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "KeyError: 'b'"
    assert f'File "{__file__}"' in trace
    assert "in fails" in trace and "in _dig" in trace and 'return d["b"]' in trace
    assert KWF_DIR not in trace and "asyncio" not in trace
    status = eng.status("t1")
    assert status is not None
    assert status["status"] == "failed" and status["error"] == "'b'"
    assert status["traceback"] == trace
    assert eng.error("t1") == trace


def test_a_deep_traceback_keeps_its_last_frames_within_the_cap(eng: Engine) -> None:
    eng.send("t1", 'new:{"depth": 200}')
    eng.send("t1", '{"ref": "go", "value": 1}')
    trace = eng.error("t1")
    assert trace is not None
    # the innermost 20 frames: 3 shown, 16 folded by Python's formatting, the one that raised
    assert trace.count("in _dig") == 4 and "[Previous line repeated 16 more times]" in trace
    assert "in fails" not in trace
    assert len(trace) <= observe.TRACEBACK_CHARS + 4 and trace.endswith("KeyError: 'b'")


def test_engine_error_is_none_unless_the_thread_failed(eng: Engine) -> None:
    assert eng.error("nobody") is None
    eng.send("t1", 'new:{"a": 1}')
    assert eng.error("t1") is None
    eng.send("t1", "cancel:")
    assert eng.error("t1") is None


def test_the_journal_check_ignores_where_the_code_lives() -> None:
    """The traceback names this machine's files; replay on another machine must still agree,
    so the step's check covers the error's text but not its traceback."""
    source = "async def wf(arg):\n    return {}['b']\n"
    checks, traces = [], []
    for filename in ("/srv/a/wf.py", "/home/b/other/wf.py"):
        namespace: dict[str, Any] = {}
        exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the test's own code
        workflow = kwf.registry.Workflow("wf", namespace["wf"], "f", filename)
        journal = Journal(thread="t", workflow="wf", fingerprint="f", arg=None, started=0.0,
                          base_step=0, base_seq=0)
        inst, records = Instance.start(workflow, journal, Settings())
        inst.dispose()
        checks.append(journal.checks)
        traces.append(next(r.header("kwf-traceback") for r in records if r.topic == "workflow-error"))
    assert traces[0] != traces[1] and "/srv/a/wf.py" in str(traces[0])
    assert checks[0] == checks[1]


def test_an_import_error_of_a_workflow_module_names_its_file_and_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "obs_broken.py").write_text("import kwf\nX = {}\n\n\ndef f():\n    return X['m']\n\n\nf()\n")
    (tmp_path / "obs_syntax.py").write_text("x = 1\ndef (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(WorkflowImportError) as caught:
        load_modules(["obs_broken"])
    assert str(caught.value).startswith("cannot import workflow module 'obs_broken': KeyError: 'm'")
    assert f"{tmp_path / 'obs_broken.py'}:6 in f" in str(caught.value)
    with pytest.raises(WorkflowImportError, match=r"SyntaxError.*obs_syntax.py:2"):
        load_modules(["obs_syntax"])
    with pytest.raises(WorkflowImportError, match="No module named 'obs_nowhere'"):
        load_modules(["obs_nowhere"])


# -- the stats hook ---------------------------------------------------------------------------------

class Recording(observe.Stats):
    def __init__(self) -> None:
        self.calls: Counter[tuple[str, ...]] = Counter()

    def thread_started(self, workflow: str) -> None:
        self.calls["started", workflow] += 1

    def thread_ended(self, workflow: str, status: str) -> None:
        self.calls["ended", workflow, status] += 1

    def record(self, kind: str, timestamp: float | None) -> None:
        self.calls["record", kind] += 1

    def step(self, workflow: str, seconds: float) -> None:
        assert seconds >= 0
        self.calls["step", workflow] += 1

    def replay(self, workflow: str, seconds: float, events: int) -> None:
        self.calls["replay", workflow] += 1
        self.calls["replayed", workflow] += events

    def dead_letter(self, code: str) -> None:
        self.calls["dead", code] += 1


@pytest.fixture
def recording() -> Iterator[Recording]:
    hook = Recording()
    previous = observe.install(hook)
    yield hook
    observe.install(previous)


def test_the_core_counts_threads_records_steps_replays_and_dead_letters(
        eng: Engine, recording: Recording) -> None:
    for i in range(3):
        eng.send(f"t{i}", 'new:{"a": 1}')
    eng.evict()  # t0 is rebuilt by replay for its next record
    eng.send("t0", '{"ref": "go", "value": 1}')
    eng.send("t1", "cancel:")
    eng.send("nobody", '{"ref": "x"}')
    eng.send("t2", "garbage")
    eng.send("t2", 'new:{"a": 2}')  # replaces the running t2
    c = recording.calls
    assert c["started", "obs-fails"] == 4 and c["ended", "obs-fails", "replaced"] == 1
    assert c["ended", "obs-fails", "failed"] == 1 and c["ended", "obs-fails", "cancelled"] == 1
    assert c["record", "new"] == 4 and c["record", "resume"] == 2 and c["record", "cancel"] == 1
    assert c["step", "obs-fails"] == 6  # four starts, one resume, one cancel
    assert c["replay", "obs-fails"] == 2 and c["replayed", "obs-fails"] == 0
    assert c["dead", "unknown-thread"] == 1 and c["dead", "bad-form"] == 1


def test_the_engine_metrics_count_what_the_core_reports(eng: Engine) -> None:
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    from kwf.engine import metrics

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client import generate_latest

        text = generate_latest(REGISTRY).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    previous = observe.install(metrics.PrometheusStats())
    try:
        before = samples()
        for i in range(5):
            eng.send(f"m{i}", 'new:{"a": 1}', timestamp=100.0)
        eng.send("m0", '{"ref": "go", "value": 1}')
        after = samples()
    finally:
        observe.install(previous)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("kwf_threads_started_total", workflow="obs-fails") == 5
    assert grew("kwf_threads_ended_total", workflow="obs-fails", status="failed") == 1
    assert grew("kwf_records_total", kind="new") == 5 and grew("kwf_records_total", kind="resume") == 1
    assert grew("kwf_step_seconds_count", workflow="obs-fails") == 6
    assert grew("kwf_step_seconds_bucket", workflow="obs-fails", le="+Inf") == 6
    assert grew("kwf_input_lag_seconds_count") == 6
    assert grew("kwf_input_lag_seconds_bucket", le="3600.0") == 0  # stamped at 100 s: decades old
    assert after[("kwf_threads", (("state", "live"),))] >= 4


# -- dead letters -----------------------------------------------------------------------------------

def test_a_dead_letter_is_whole_whenever_kafka_can_take_it(eng: Engine) -> None:
    big_value, long_key = "x" * 900_001, "k" * 5_000
    eng.send("t1", big_value)
    eng.send(long_key, "new:{}")
    too_large, bad_key = eng.outputs("workflow-dlq")
    assert too_large.value == big_value and too_large.header("kwf-truncated") is None
    assert str(too_large.header("kwf-error")).startswith("too-large")
    assert bad_key.key == long_key and bad_key.header("kwf-truncated") is None


def test_a_dead_letter_is_cut_only_when_the_write_would_be_refused() -> None:
    rec = Incoming("workflow-resume", b"k" * 10, b"v" * 999_800, 0.0, "workflow-resume/0/7")
    cut = dead_letter(rec, "workflow-dlq", "too-large: ...")
    assert cut.value == b"v" * DLQ_KEEP_BYTES and cut.key == b"k" * 10
    assert cut.header("kwf-truncated") == "key 10 bytes, value 999800 bytes"
    whole = dead_letter(rec, "workflow-dlq", "too-large: ...", max_bytes=2_000_000)
    assert whole.value == rec.value and whole.header("kwf-truncated") is None


# -- the log format ---------------------------------------------------------------------------------

@pytest.fixture
def engine_logs() -> Iterator[io.StringIO]:
    """``logs.configure`` into a buffer; every process-wide hook it sets is restored after."""
    saved = (structlog.get_config(), sys.excepthook, threading.excepthook, sys.unraisablehook,
             signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
             list(logging.getLogger().handlers), logging.getLogger().level, dict(logs._state))
    buffer = io.StringIO()
    yield buffer
    config, sys.excepthook, threading.excepthook, sys.unraisablehook, sigint, sigterm, \
        handlers, level, state = saved
    structlog.configure(**config)
    signal.signal(signal.SIGINT, sigint)
    signal.signal(signal.SIGTERM, sigterm)
    logging.getLogger().handlers[:] = handlers
    logging.getLogger().setLevel(level)
    logs._state.update(state)
    logs._stop.clear()


def test_engine_lines_are_json_with_ids_at_the_chosen_level(engine_logs: io.StringIO) -> None:
    logs.configure(engine_logs, env={"KWF_LOG_LEVEL": "warning"})
    structlog.get_logger("kwf.x").info("hidden")
    structlog.get_logger("kwf.x").warning("shown", thread="t1", text="é")
    logging.getLogger("some.library").error("from %s", "stdlib")
    logs.KAFKA_LOGGER.warning("%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Connect failed")
    events = [json.loads(line) for line in engine_logs.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["shown", "from stdlib", "kafka_client_log"]
    assert all(e["process"] == 0 and "worker" in e and "timestamp" in e for e in events)
    assert events[0]["text"] == "é" and '"text":"é"' in engine_logs.getvalue()  # compact, UTF-8
    assert events[2]["facility"] == "FAIL" and events[2]["client"] == "rdkafka#consumer-1"


def test_console_format_and_bad_settings(engine_logs: io.StringIO) -> None:
    logs.configure(engine_logs, env={"KWF_LOG_FORMAT": "console"})
    structlog.get_logger().info("hello", thread="t1")
    line = engine_logs.getvalue().strip()
    assert "hello" in line and "thread=t1" in line and not line.startswith("{")
    with pytest.raises(ValueError, match="KWF_LOG_LEVEL='loud'"):
        logs.configure(engine_logs, env={"KWF_LOG_LEVEL": "loud"})


def test_librdkafka_messages_are_rate_limited_per_client_and_facility() -> None:
    throttle = logs._Throttle(interval_s=10.0, burst=2)
    shown = [throttle.allow(("c1", "FAIL"), now=t) for t in (0, 1, 2, 3, 4)]
    assert shown == [0, 0, None, None, None]
    assert throttle.allow(("c2", "FAIL"), now=5) == 0  # another client has its own budget
    assert throttle.allow(("c1", "FAIL"), now=11) == 3  # the next one says how many were held


def test_kafka_client_errors_are_rate_limited_per_code(engine_logs: io.StringIO) -> None:
    from confluent_kafka import KafkaError

    logs.configure(engine_logs)
    logs._CLIENT_ERRORS._windows.clear()
    for _ in range(50):
        logs.kafka_client_error(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
    events = [json.loads(line) for line in engine_logs.getvalue().splitlines()]
    assert len(events) == logs.KAFKA_LOG_BURST
    assert events[0]["event"] == "kafka_client_error" and events[0]["code"] == "_TRANSPORT"


def test_a_stop_by_signal_is_one_line_without_traceback(engine_logs: io.StringIO) -> None:
    logs.configure(engine_logs)
    with pytest.raises(KeyboardInterrupt):
        logs._on_signal(signal.SIGTERM, None)
    try:  # Bytewax wraps the interrupt in its own error at times
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("error calling next_batch") from e
    except RuntimeError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    [event] = [json.loads(line) for line in engine_logs.getvalue().splitlines()]
    assert event["event"] == "engine_stopped" and event["signal"] == "SIGTERM"
    assert "exception" not in event


def test_a_lost_cluster_peer_and_a_crash_are_named(engine_logs: io.StringIO) -> None:
    logs.configure(engine_logs)
    lost = RuntimeError("panicked at timely/src/network.rs: timely communication error: "
                        "Connection reset by peer (os error 104)")
    sys.excepthook(RuntimeError, lost, None)
    try:
        raise ValueError("boom")
    except ValueError as e:
        sys.excepthook(ValueError, e, e.__traceback__)
    peer, crash = [json.loads(line) for line in engine_logs.getvalue().splitlines()]
    assert peer["event"] == "cluster_peer_lost" and "Connection reset" in peer["error"]
    assert crash["event"] == "engine_crashed" and crash["level"] == "critical"
    assert "ValueError: boom" in crash["exception"]


def test_the_process_and_worker_ids_follow_bytewax_run_flags() -> None:
    assert logs.cluster_position(["dataflow", "-i", "2", "-w", "3", "-a", "a:1;b:2"], {}) == (2, 3, False)
    assert logs.cluster_position(["dataflow", "--process-id=1"], {}) == (1, 1, True)
    env = {"BYTEWAX_POD_NAME": "kwf-4", "BYTEWAX_STATEFULSET_NAME": "kwf",
           "BYTEWAX_WORKERS_PER_PROCESS": "2"}
    assert logs.cluster_position(["dataflow"], env) == (4, 2, False)
