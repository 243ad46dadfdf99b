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
from kwf.cli.demo import add_demo_arguments, demo_command
from kwf.engine.admin import KafkaSetupError, check_brokers, ensure_topics, required_topics
from kwf.kafka.broker import DEFAULT_PORT, LocalBroker

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: ``dataflow.py`` and ``workflows/`` live here."""


def register_up(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = commands.add_parser("up", help="local Kafka + topics + the engine + the example workflows")
    up.add_argument("--port", type=int, default=DEFAULT_PORT,
                    help="the local broker's port (%(default)s); --brokers uses another Kafka")
    up.add_argument("--state", default=".kwf", help="engine state directory (%(default)s)")
    up.add_argument("--serve", action="store_true",
                    help="keep the engine running after the demo, until Ctrl-C")
    add_demo_arguments(up, n=25)
    up.set_defaults(handler=up_command)


def up_command(args: argparse.Namespace) -> int:
    if not (ROOT / "dataflow.py").exists():
        msg = f"kwf up runs the engine from a kwf checkout; no dataflow.py in {ROOT}"
        raise KafkaSetupError(msg)
    if args.brokers is None:  # the local broker, started unless it runs
        broker = LocalBroker(port=args.port)
        if not broker.status().running:
            print(f"starting Kafka on {broker.bootstrap} (first run resolves its jars with "
                  "Maven)...", flush=True)
        args.brokers = broker.start().bootstrap
    settings = dataclasses.replace(Settings.from_env(), brokers=args.brokers)
    created = ensure_topics(settings)
    check_brokers(settings.kafka_config(), required_topics(settings))
    print(f"Kafka {args.brokers}: {len(created)} topics created, all present", flush=True)

    state = Path(args.state).resolve()
    engine = start_engine(settings, state)
    print(f"engine started (pid {engine.pid}, recovery in {state / 'recovery'}, "
          f"log {state / 'engine.log'})", flush=True)
    try:
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
        print(f"engine stopped; Kafka still runs on {args.brokers}")


def engine_command(state: Path, snapshot_s: int = 1, workers: int = 1,
                   partitions: int = 1) -> list[str]:
    """The engine's command line, after creating its recovery directory if need be.

    Bytewax panics when a recovery directory is initialised twice, so it is done only when
    ``part-0`` is missing; the partition count is fixed from then on.
    """
    recovery = state / "recovery"
    if not (recovery / "part-0.sqlite3").exists():
        recovery.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery),
                        str(partitions)], check=True, capture_output=True)
    # The entry point by path, not by module name from the checkout: the engine then runs in
    # the caller's directory, where KWF_WORKFLOWS modules and relative paths are found.
    return [sys.executable, "-m", "bytewax.run", str(ROOT / "dataflow.py"), "-r", str(recovery),
            "-s", str(snapshot_s), "-b", "0", "-w", str(workers)]


def start_engine(settings: Settings, state: Path) -> subprocess.Popen[bytes]:
    """The engine in a subprocess with recovery under ``state``, logging to a file there."""
    env = {**os.environ, "KWF_BROKERS": settings.brokers, "PYTHONUNBUFFERED": "1"}
    log = (state / "engine.log").open("ab")
    return subprocess.Popen(engine_command(state), env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def register_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run", help="the engine alone, in the foreground, with recovery (KWF_* settings)")
    run.add_argument("--state", default=".kwf", help="recovery lives in STATE/recovery")
    run.add_argument("-s", "--snapshot", type=int, default=5,
                     help="seconds between snapshots: outputs since the last one are "
                          "written again after a crash (%(default)s)")
    run.add_argument("-w", "--workers", type=int, default=1, help="worker threads")
    run.add_argument("--partitions", type=int, default=1,
                     help="recovery partitions, when creating the directory: the most workers "
                          "you will ever run (%(default)s)")
    run.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    if not (ROOT / "dataflow.py").exists():
        msg = f"kwf run starts dataflow.py from a kwf checkout; none in {ROOT}"
        raise KafkaSetupError(msg)
    command = engine_command(Path(args.state).resolve(), args.snapshot, args.workers,
                             args.partitions)
    print(" ".join(command[1:]), flush=True)
    os.execv(command[0], command)  # Bytewax gets the signals itself (Ctrl-C, SIGTERM)


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
