"""The kwf command line against the real broker and one running engine (shared by the module).

Most commands run in-process (``kwf.cli.main``, output captured), which is the console
script minus interpreter start-up; ``replay`` under edited code and ``--pdb`` run as
subprocesses, since they need a fresh import of the workflow module or a terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from kwf.config import Settings

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"

WORKFLOW = '''
import kwf

OUT = "{out}"
kwf.config.output_topics |= {{OUT}}


@kwf.workflow("cli_steps")
async def cli_steps(arg):
    a = await kwf.suspend("a")
    kwf.output_json({{"got": a{extra}}}, OUT)
    b = await kwf.suspend("b")
    return {{"a": a, "b": b}}


@kwf.workflow("cli_boom")
async def cli_boom(arg):
    return arg["missing"]
'''


@dataclass
class Stack:
    env: dict[str, str]
    home: Path
    settings: Settings
    run: str

    def thread(self, name: str) -> str:
        return f"{self.run}-{name}"


@pytest.fixture(scope="module")
def stack(kafka_brokers: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Topics of its own, a workflow module ``cliwf`` in a temp dir, and ``kwf run`` on them."""
    from kwf.engine.admin import ensure_topics

    run = f"cli-{uuid.uuid4().hex[:10]}"
    home = tmp_path_factory.mktemp("cli")
    (home / "cliwf.py").write_text(WORKFLOW.format(out=f"{run}-out", extra=""))
    v2 = home / "v2"
    v2.mkdir()
    (v2 / "cliwf.py").write_text(WORKFLOW.format(out=f"{run}-out", extra=', "v": 2'))
    topics = {f"KWF_{name}_TOPIC": f"{run}-{name.lower()}"
              for name in ("RESUME", "SCHEDULER", "RESULT", "ERROR", "EVENTS", "DLQ")}
    env = {**os.environ, **topics, "KWF_BROKERS": kafka_brokers,
           "KWF_WORKFLOWS": "workflows,cliwf", "PYTHONPATH": str(ROOT)}
    sys.path.insert(0, str(home))
    settings = Settings.from_env(env)
    ensure_topics(settings)
    log = (home / "engine.log").open("wb")
    engine = subprocess.Popen([sys.executable, "-m", "kwf.cli", "run", "--state",
                               str(home / ".kwf"),
                               "-s", "1"], env=env, cwd=home, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        yield Stack(env, home, settings, run)
    finally:
        engine.terminate()
        engine.wait(30)
        sys.path.remove(str(home))


def kwf(stack: Stack, *args: str, code: int = 0) -> str:
    """Run ``kwf ARGS`` in-process; assert its exit code; return what it printed."""
    out, err = _capture(stack, list(args))
    assert out[0] == code, f"kwf {' '.join(args)} -> {out[0]}\n{out[1]}\n{err}"
    return out[1] + err


def _capture(stack: Stack, argv: list[str]) -> tuple[tuple[int, str], str]:
    import contextlib
    import io

    from kwf.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, stack.env), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr), contextlib.chdir(stack.home):
        code = main(argv)
    return (code, stdout.getvalue()), stderr.getvalue()


def kwf_json(stack: Stack, *args: str, code: int | None = 0) -> Any:
    (rc, out), err = _capture(stack, [*args, "--json"])
    assert code is None or rc == code, out + err
    return json.loads(out)


def until(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def subprocess_kwf(stack: Stack, *args: str, cwd: Path | None = None,
                   stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kwf.cli", *args], env=stack.env,
                          cwd=cwd or stack.home, capture_output=True, text=True, timeout=120,
                          input=stdin)


# -- start, signal, result, describe, list -----------------------------------------------------


def test_start_describe_signal_result(stack: Stack):
    a = stack.thread("approval")
    assert "unknown workflow 'aproval'" in kwf(stack, "start", "aproval", "--id", a, code=2)
    assert "--input is not JSON" in kwf(stack, "start", "approval", "--id", a, "--input", "{x",
                                        code=2)
    # The engine may still be starting: give this first record time to be applied.
    out = kwf(stack, "start", "approval", "--id", a, "--input", '{"subject": "laptop"}',
              "--check", "60")
    assert "applied" in out and "running" in out
    described = kwf(stack, "describe", a)
    assert "waiting   'decision'" in described and "(in 2 d)" in described
    assert kwf_json(stack, "describe", a)["pending"] == ["decision"]
    assert "running (step 0, pending ['decision'])" in kwf(stack, "result", a, code=7)
    listed = kwf_json(stack, "list", "--status", "running", "--workflow", "approval")
    assert [s["thread"] for s in listed if s["thread"] == a] == [a]
    assert not [s for s in kwf_json(stack, "list", "--status", "completed") if s["thread"] == a]
    assert "--value is not JSON" in kwf(stack, "signal", a, "decision", "--value", "yes", code=2)
    kwf(stack, "signal", a, "decision", "--value", '{"approved": true, "by": "approver"}')
    out = kwf(stack, "result", a, "--wait", "30")
    assert json.loads(out.splitlines()[0])["status"] == "approved"
    assert kwf_json(stack, "result", a)["value"]["by"] == "approver"
    assert "no thread" in kwf(stack, "result", stack.thread("never"), code=4)
    assert "no thread" in kwf(stack, "describe", stack.thread("never"), code=4)
    assert "unknown" in kwf(stack, "status", stack.thread("never"), code=4)


def test_cancel_and_a_failed_thread(stack: Stack):
    c, f = stack.thread("cancelled"), stack.thread("failed")
    kwf(stack, "start", "approval", "--id", c, "--check", "60")
    kwf(stack, "cancel", c)
    until(lambda: kwf_json(stack, "describe", c)["status"] == "cancelled")
    assert "cancelled" in kwf(stack, "result", c, code=6)
    kwf(stack, "start", "cli_boom", "--id", f, "--input", "{}", "--check", "60")
    failed = until(lambda: (d := kwf_json(stack, "describe", f))["status"] == "failed" and d)
    assert failed["error_type"] == "KeyError" and failed["value"] == "'missing'"
    assert "failed: 'missing' (KeyError)" in kwf(stack, "result", f, code=6)
    described = kwf(stack, "describe", f)
    assert "error     \"'missing'\" (KeyError)" in described
    assert "traceback" in described and "cliwf.py" in described  # the workflow's own frame
    assert 'return arg["missing"]' in failed["traceback"]
    r = stack.thread("refused")
    kwf(stack, "start", "approval", "--id", r, "--check", "60")
    kwf(stack, "start", "approval", "--id", r, "--init", "--input", '{"subject": "again"}',
        "--check", "0")  # init: on a thread that exists is ignored by the engine
    kwf(stack, "signal", r, "decision", "--error", '{"reason": "no budget"}')
    refused = until(lambda: (d := kwf_json(stack, "result", r, code=None))["status"] != "running"
                    and d)
    assert refused["error_type"] == "RemoteError" and "no budget" in refused["value"]


# -- send and the dead letters ---------------------------------------------------------------


def test_send_tells_a_dead_letter_and_dlq_resends_it_fixed(stack: Stack):
    t = stack.thread("dlq")
    out = kwf(stack, "send", t, '{"ref": "x", "value": 1}', "--check", "60", code=5)
    assert "DEAD-LETTERED" in out and "unknown-thread" in out
    out = kwf(stack, "send", t, "new:aproval:{}", "--check", "60", code=5)
    assert "unknown-workflow" in out
    address = out.split("kwf dlq show ")[1].split("`")[0]
    assert "not sent" in kwf(stack, "send", t, "not a record", code=2)

    letters = kwf_json(stack, "dlq", "list", "--key", t)
    assert letters["counts"] == {"unknown-thread": 1, "unknown-workflow": 1}
    assert "unknown-workflow" in kwf(stack, "dlq", "list", "--code", "unknown-workflow")
    shown = kwf_json(stack, "dlq", "show", address)
    assert shown["value"] == "new:aproval:{}" and shown["key"] == t
    assert shown["headers"]["kwf-source"].startswith(stack.settings.resume_topic + "/")
    assert "no dead letter" in kwf(stack, "dlq", "show", "0/99999999", code=4)
    assert "not PARTITION/OFFSET" in kwf(stack, "dlq", "show", "x", code=2)
    assert "applied" in kwf(stack, "dlq", "resend", address, "--value",
                            'new:approval:{"subject": "fixed"}')
    assert kwf_json(stack, "describe", t)["workflow"] == "approval"


def test_watch_shows_transitions(stack: Stack):
    t = stack.thread("watched")
    watch = subprocess.Popen([sys.executable, "-m", "kwf.cli", "watch", "--duration", "10",
                              "--json"], env=stack.env, cwd=stack.home, stdout=subprocess.PIPE,
                             text=True)
    time.sleep(4)  # its start-up, and its first read of workflow-events
    kwf(stack, "start", "approval", "--id", t)
    out, _ = watch.communicate(timeout=60)
    assert watch.returncode == 0
    frames = [json.loads(line) for line in out.splitlines()]
    assert frames and frames[-1]["counts"]["running"] >= 1
    assert any(r["thread"] == t and r["to"] == "running" and r["from"] is None
               for r in frames[-1]["recent"])


def test_broker_down_is_answered_at_once(stack: Stack):
    down = "127.0.0.1:23001"  # nothing listens there
    for args in (["list"], ["describe", "x"], ["result", "x"], ["status"], ["dlq", "list"],
                 ["start", "approval", "--id", "x"], ["signal", "x", "r", "--value", "1"],
                 ["cancel", "x"], ["send", "x", "cancel:"], ["watch", "--duration", "1"]):
        started = time.monotonic()
        out = kwf(stack, *args, "--brokers", down, code=1)
        assert time.monotonic() - started < 4, args
        assert "unreachable" in out and "Connection refused" in out, out


# -- history, replay, timeline -----------------------------------------------------------------


def test_history_matches_the_engine_and_replay_finds_an_edit(stack: Stack):
    from kwf.testing import Engine

    t = stack.thread("steps")
    kwf(stack, "start", "cli_steps", "--id", t, "--input", '{"n": 1}', "--check", "60")
    sent = kwf(stack, "signal", t, "a", "--value", '"first"')
    offset = sent.split("sent to ")[1].split()[0].rsplit("/", 1)[1]
    history = until(lambda: (h := _history(stack, t)) and len(h["steps"]) == 2 and h)
    assert history, "the journal was not snapshotted with both steps"
    assert [s["kind"] for s in history["steps"]] == ["start", "resume"]
    assert history["steps"][1]["outputs"][0]["value"] == '{"got":"first"}'
    assert history["steps"][1]["pending"] == ["b"]
    assert history["steps"][1]["origin"] == offset  # the signal's own record

    # The same records through the in-process Engine give the same history.
    import cliwf

    with Engine(workflows=[cliwf.cli_steps], settings=stack.settings) as eng:
        eng.send(t, 'new:cli_steps:{"n": 1}', timestamp=history["started"])
        eng.send(t, '{"ref": "a", "value": "first"}', timestamp=history["steps"][1]["time"])
        mine = json.loads(json.dumps(eng.history(t).as_dict(stack.settings.events_topic)))
    # Equal but for the record offsets, which Kafka gave and the Engine numbers from 0.
    assert _offsets_dropped(mine) == _offsets_dropped(history)

    text = kwf(stack, "history", t)
    assert "step 1" in text and f'-> {stack.run}-out  {{"got":"first"}}' in text
    assert "replay matches the journal: 2 steps" in kwf(stack, "replay", t)

    edited = stack.home / "v2"  # cliwf.py with one output changed, imported from the cwd
    done = subprocess_kwf(stack, "replay", t, "--recovery", str(stack.home / ".kwf/recovery"),
                          cwd=edited)
    assert done.returncode == 8, done.stdout + done.stderr
    assert "DIVERGED at step 1 (resume 'a')" in done.stdout
    assert "the code changed since the thread started" in done.stdout

    done = subprocess_kwf(stack, "replay", t, "--pdb", stdin="p arg\nc\n")
    assert "(Pdb)" in done.stdout and "cliwf.py" in done.stdout and "{'n': 1}" in done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replay matches the journal" in done.stdout
    done = subprocess_kwf(stack, "replay", t, "--pdb", stdin="q\n")
    assert "replay abandoned in the debugger" in done.stdout and done.returncode == 0

    svg = stack.home / "steps.svg"
    assert "2 journal steps" in kwf(stack, "timeline", t, "-o", str(svg))
    root = ET.parse(svg).getroot()
    steps = [g for g in root.iter(f"{SVG}g") if g.get("class") == "step"]
    assert len(steps) == len(history["steps"]) == 2
    assert [g.get("data-kind") for g in steps] == ["start", "resume"]

    assert "no thread" in kwf(stack, "history", stack.thread("never"), code=4)
    assert "no recovery directory" in kwf(stack, "history", t, "--recovery",
                                          str(stack.home / "nope"), code=2)


def _offsets_dropped(history: dict[str, Any]) -> dict[str, Any]:
    return {**history, "origin": None,
            "steps": [{**step, "origin": None} for step in history["steps"]]}


def _history(stack: Stack, thread: str) -> Any:
    (rc, out), _ = _capture(stack, ["history", thread,
                                    "--json"])
    return json.loads(out) if rc == 0 else None
