"""``kwf up``: the whole local stack in one command, for the quick start and for trying kwf.

It starts (or reuses) the local broker, creates the topics, starts the engine exactly as
production runs it (``python -m bytewax.run dataflow`` with recovery on, in a subprocess), runs
the example workflows through ``kwf demo`` with the demo services, and stops the engine unless
asked to keep serving. The broker is left running: ``kwf kafka stop`` stops it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kwf.config import Settings
from kwf.demo import add_demo_arguments, demo_command
from kwf.kafka.admin import KafkaSetupError, check_brokers, ensure_topics, required_topics
from kwf.kafka.broker import DEFAULT_PORT, LocalBroker

ROOT = Path(__file__).resolve().parent.parent
"""The checkout: ``dataflow.py`` and ``workflows/`` live here."""


def register_up(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = commands.add_parser("up", help="local Kafka + topics + the engine + the example workflows")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help="broker port (%(default)s)")
    up.add_argument("--state", default=".kwf", help="engine state directory (%(default)s)")
    up.add_argument("--serve", action="store_true",
                    help="keep the engine running after the demo, until Ctrl-C")
    add_demo_arguments(up, n=25)
    up.set_defaults(handler=up_command)


def up_command(args: argparse.Namespace) -> int:
    if not (ROOT / "dataflow.py").exists():
        msg = f"kwf up runs the engine from a kwf checkout; no dataflow.py in {ROOT}"
        raise KafkaSetupError(msg)
    broker = LocalBroker(port=args.port)
    if not broker.status().running:
        print(f"starting Kafka on {broker.bootstrap} (first run resolves its jars with Maven)...",
              flush=True)
    broker.start()
    settings = dataclasses.replace(Settings.from_env(), brokers=broker.bootstrap)
    created = ensure_topics(settings)
    check_brokers(settings.kafka_config(), required_topics(settings))
    print(f"Kafka {broker.bootstrap}: {len(created)} topics created, all present", flush=True)

    state = Path(args.state).resolve()
    engine = start_engine(settings, state)
    print(f"engine started (pid {engine.pid}, recovery in {state / 'recovery'}, "
          f"log {state / 'engine.log'})", flush=True)
    try:
        args.brokers = broker.bootstrap
        code = demo_command(args)
        if engine.poll() is not None:
            print(f"kwf up: the engine exited with {engine.returncode}; see "
                  f"{state / 'engine.log'}", file=sys.stderr)
            return 1
        if args.serve:
            print("engine serving; Ctrl-C stops it (the broker keeps running)", flush=True)
            engine.wait()
        return code
    finally:
        stop_engine(engine)
        print(f"engine stopped; Kafka still runs on {broker.bootstrap} (kwf kafka stop)")


def start_engine(settings: Settings, state: Path) -> subprocess.Popen[bytes]:
    """``python -m bytewax.run dataflow -r <state>/recovery -s 1 -b 0``, logging to a file."""
    recovery = state / "recovery"
    if not (recovery / "part-0.sqlite3").exists():  # init twice panics in Bytewax
        recovery.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"],
                       check=True, capture_output=True)
    env = {**os.environ, "KWF_BROKERS": settings.brokers, "PYTHONUNBUFFERED": "1"}
    log = (state / "engine.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", "dataflow", "-r", str(recovery), "-s", "1",
         "-b", "0"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_engine(engine: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGINT (Bytewax finishes its epoch), then SIGKILL: recovery makes either safe."""
    if engine.poll() is not None:
        return
    engine.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    while engine.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if engine.poll() is None:
        engine.kill()
        engine.wait()
