"""``kwf run`` (the engine alone) and ``kwf up`` (the README's main command)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kwf.config import Settings

REPO = Path(__file__).resolve().parent.parent


def test_kwf_run_refuses_unreachable_brokers_before_touching_its_recovery_directory(
        tmp_path: Path):
    env = {**os.environ, "KWF_BROKERS": "127.0.0.1:1", "KWF_WORKFLOWS": "workflows"}
    kwf = [sys.executable, "-m", "kwf.cli", "run", "--state", str(tmp_path)]
    started = time.monotonic()
    done = subprocess.run(kwf, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode != 0
    assert time.monotonic() - started < 15
    assert "kwf engine not started" in done.stderr and "127.0.0.1:1" in done.stderr
    assert not list(tmp_path.glob("recovery/part-*"))  # nothing half-made


@pytest.mark.kafka
def test_kwf_up_runs_the_example_workflows_end_to_end(kafka_brokers, unique, tmp_path: Path):
    """The README's main command, on the test broker and topics of its own: topics created, the
    engine started with recovery, the demo's threads all finished, the engine stopped."""
    run = unique("up")
    topics = {f"KWF_{name}_TOPIC": f"{run}-{name.lower()}"
              for name in ("RESUME", "SCHEDULER", "RESULT", "ERROR", "EVENTS", "DLQ")}
    env = {**os.environ, **topics}
    done = subprocess.run(
        [sys.executable, "-m", "kwf.cli", "up", "--brokers", kafka_brokers, "-n", "3",
         "--state", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "12 of 12 threads finished" in done.stdout
    assert "engine stopped" in done.stdout
    assert (tmp_path / "recovery" / "part-0.sqlite3").exists()


def test_the_engine_refuses_bad_settings_and_broken_workflow_modules(tmp_path: Path):
    """A setting that does not parse, or a workflow module that fails at import, stops the
    engine at once with what to fix, not a traceback from deep inside."""
    (tmp_path / "broken_wf.py").write_text("import kwf\nraise RuntimeError('half-written')\n")
    entry = str(Path(__file__).parent.parent / "dataflow.py")
    for extra, expected in (({"KWF_BATCH_SIZE": "lots"}, "KWF_* variable does not parse"),
                            ({"KWF_WORKFLOWS": "broken_wf"}, "RuntimeError: half-written")):
        env = {**os.environ, "KWF_BROKERS": "127.0.0.1:1", **extra}
        done = subprocess.run([sys.executable, "-m", "bytewax.run", entry], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "kwf engine not started" in done.stderr and expected in done.stderr


@pytest.mark.kafka
def test_kwf_send_and_status_talk_to_a_running_engine(kafka_brokers, unique, tmp_path: Path):
    """Start an approval-like thread with ``kwf send``, see it waiting with ``kwf status``,
    answer it with ``kwf send``, and see it completed."""
    from kwf.engine.admin import ensure_topics

    run = unique("ops")
    topics = {f"KWF_{name}_TOPIC": f"{run}-{name.lower()}"
              for name in ("RESUME", "SCHEDULER", "RESULT", "ERROR", "EVENTS", "DLQ")}
    env = {**os.environ, **topics, "KWF_BROKERS": kafka_brokers, "KWF_WORKFLOWS": "workflows"}
    settings = Settings(brokers=kafka_brokers, workflows=("workflows",),
                        **{k[4:].lower(): v for k, v in topics.items()})
    ensure_topics(settings)
    kwf = [sys.executable, "-m", "kwf.cli"]
    engine = subprocess.Popen(kwf + ["run", "--state", str(tmp_path), "-s", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(kwf + list(args), env=env, capture_output=True, text=True,
                                  timeout=60)

        assert cli("send", "a1", "not a record").returncode == 2  # refused before sending
        assert cli("send", "a1", 'new:approval:{"subject": "laptop"}').returncode == 0

        def status_of(thread: str) -> str:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done = cli("status", thread, "--timeout", "5")
                if done.returncode == 0:
                    return done.stdout
                time.sleep(0.5)
            raise AssertionError(done.stdout + done.stderr)

        assert "approval  running" in status_of("a1") and "'decision'" in status_of("a1")
        cli("send", "a1", '{"ref": "decision", "value": {"approved": true, "by": "approver"}}')
        deadline = time.monotonic() + 60
        while "completed" not in status_of("a1") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "approval  completed" in status_of("a1")
    finally:
        engine.terminate()
        engine.wait(30)


def test_kwf_up_with_its_port_taken_advises_kwf_up_options(tmp_path: Path):
    """Port taken by something else: the advice is for ``kwf up`` (--port, --brokers), not for
    ``kwf kafka start``."""
    import shutil
    import socket

    if shutil.which("java") is None:
        pytest.skip("no java: the local broker cannot even be tried")
    with socket.create_server(("127.0.0.1", 22090)):
        env = {**os.environ, "KWF_KAFKA_HOME": str(tmp_path / "kafka")}
        done = subprocess.run([sys.executable, "-m", "kwf.cli", "up", "--port", "22090"],
                              env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "port 22090 on 127.0.0.1 is taken" in done.stderr
    assert "`kwf up --port N`" in done.stderr and "`kwf up --brokers HOST:PORT`" in done.stderr


def test_the_kwf_command_finds_workflow_modules_in_the_current_directory(tmp_path: Path):
    """As the engine does (``python -m bytewax.run`` puts the current directory on the path):
    ``KWF_WORKFLOWS=mine kwf topics check`` imports ./mine.py, then looks for Kafka."""
    (tmp_path / "mine_deploy.py").write_text(
        "import kwf\nkwf.config.output_topics.add('mine-out')\n")
    kwf_script = Path(sys.executable).with_name("kwf")
    env = {**os.environ, "KWF_WORKFLOWS": "mine_deploy", "KWF_BROKERS": "127.0.0.1:1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(kwf_script), "topics", "check", "--timeout", "2"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "ModuleNotFoundError" not in done.stderr and "unreachable" in done.stderr
