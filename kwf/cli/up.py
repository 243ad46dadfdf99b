"""``kwf up``: the whole local stack in one command, for the quick start and for trying kwf.

It starts (or reuses) the local broker, creates the topics, starts the engine exactly as
production runs it (``python -m bytewax.run kwf.engine:engine_flow`` with recovery on, in a
subprocess), runs the example workflows of the checkout through ``kwf demo`` with the demo
services, and stops the engine unless asked to keep serving. The broker is left running:
``kwf kafka stop`` stops it. ``kwf run`` is the engine alone, for any installed kwf.
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
from kwf.cli.demo import add_demo_arguments, demo_command, use_examples
from kwf.engine import ENTRY
from kwf.engine.admin import KafkaSetupError, check_brokers, ensure_topics, required_topics
from kwf.engine.recovery import partitions_for
from kwf.kafka.broker import DEFAULT_PORT, BrokerError, LocalBroker


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
    use_examples()
    if args.brokers is None:  # the local broker, started unless it runs
        broker = LocalBroker(port=args.port)
        if not broker.status().running:
            print(f"starting Kafka on {broker.bootstrap} (first run resolves its jars with "
                  "Maven)...", flush=True)
        try:
            args.brokers = broker.start().bootstrap
        except BrokerError as e:
            msg = (f"{str(e).split('; ')[0]}: run `kwf up --port N` for a local broker on "
                   "another port, or `kwf up --brokers HOST:PORT` for a Kafka already running")
            raise KafkaSetupError(msg) from e
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


SNAPSHOT_S = 5
"""Seconds between snapshots, the same in ``kwf run``, k8s/ and the README (``-s 5 -b 0``)."""


def engine_command(state: Path, snapshot_s: int = SNAPSHOT_S, workers: int = 1) -> list[str]:
    """The engine's command line, with recovery in ``state/recovery``.

    The engine creates the directory and its partitions itself, exactly once (Bytewax panics
    when a directory is initialised twice), with ``KWF_RECOVERY_PARTITIONS`` of them.
    """
    return [sys.executable, "-m", "bytewax.run", ENTRY, "-r", str(state / "recovery"),
            "-s", str(snapshot_s), "-b", "0", "-w", str(workers)]


def start_engine(settings: Settings, state: Path) -> subprocess.Popen[bytes]:
    """The engine in a subprocess with recovery under ``state``, logging to a file there."""
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KWF_BROKERS": settings.brokers, "PYTHONUNBUFFERED": "1",
           "KWF_RECOVERY_PARTITIONS": os.environ.get("KWF_RECOVERY_PARTITIONS") or "1"}
    log = (state / "engine.log").open("ab")
    return subprocess.Popen(engine_command(state), env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def register_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run", help="the engine alone, in the foreground, with recovery (KWF_* settings)")
    run.add_argument("--state", default=".kwf", help="recovery lives in STATE/recovery")
    run.add_argument("-s", "--snapshot", type=int, default=SNAPSHOT_S,
                     help="seconds between snapshots: outputs since the last one are "
                          "written again after a crash (%(default)s)")
    run.add_argument("-w", "--workers", type=int, default=1, help="worker threads")
    run.add_argument("--threads", type=int, default=1_000_000,
                     help="threads this node is expected to hold, waiting or finished within "
                          "retention: one recovery partition per 5,000 when the directory is "
                          "created, fixed for ever (%(default)s)")
    run.add_argument("--partitions", type=int,
                     default=int(os.environ.get("KWF_RECOVERY_PARTITIONS") or 0) or None,
                     help="recovery partitions instead of --threads' choice, when creating the "
                          "directory: at least the most workers you will ever run")
    run.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    partitions = args.partitions or max(args.workers, partitions_for(args.threads))
    command = engine_command(Path(args.state).resolve(), args.snapshot, args.workers)
    env = {**os.environ, "KWF_RECOVERY_PARTITIONS": str(partitions)}
    print(" ".join(command[1:]), flush=True)
    os.execve(command[0], command, env)  # Bytewax gets the signals itself (Ctrl-C, SIGTERM)


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
