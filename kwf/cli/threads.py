"""Threads from a shell: ``kwf start | signal | cancel | result | list | describe | watch``.

Writes go to ``workflow-resume`` through ``ops.submit`` (which reports a dead letter of the very
record sent); reads come from ``workflow-events`` (the latest status per thread, compacted),
``workflow-result`` and ``workflow-error`` (with its ``kwf-error-type`` and ``kwf-traceback``
headers). There is no server: what the engine wrote to Kafka is the whole truth here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, deque
from typing import Any

from confluent_kafka import TopicPartition

from kwf.cli._kafka import (NOT_FOUND, OK, THREAD_FAILED, USAGE, WAITING, CliError, Message,
                            open_consumer,
                            to_message, add_json, add_kafka, ends, latest, parse_json, print_json,
                            reach, read, settings_of)
from kwf.cli.ops import add_check, read_statuses, status_line, submit, when
from kwf.config import Settings
from kwf.registry import Registry, UnknownWorkflow, load_modules

def register_threads(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    start = commands.add_parser("start", help="start a workflow (checks the name first)")
    start.add_argument("workflow", help="a workflow the configured modules (KWF_WORKFLOWS) serve")
    start.add_argument("--id", required=True, help="the thread id")
    start.add_argument("--input", default="null", help="the argument, JSON (%(default)s)")
    start.add_argument("--init", action="store_true",
                       help="only if the thread does not exist (init:, not new:)")
    signal = commands.add_parser("signal", help="resume a thread's suspend (a value or error)")
    signal.add_argument("thread")
    signal.add_argument("ref", help="the suspend id (kwf describe shows the pending ones)")
    given = signal.add_mutually_exclusive_group(required=True)
    given.add_argument("--value", help="JSON the suspend returns")
    given.add_argument("--error", help="JSON the suspend raises (as kwf.RemoteError)")
    cancel = commands.add_parser("cancel", help="cancel a thread (its compensations run)")
    cancel.add_argument("thread")
    for parser, handler in ((start, start_command), (signal, signal_command),
                            (cancel, cancel_command)):
        add_kafka(parser)
        add_check(parser)
        parser.set_defaults(handler=handler)

    result = commands.add_parser("result", help="a thread's result or error")
    result.add_argument("thread")
    result.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="seconds to wait for the thread to finish (%(default)s)")
    listing = commands.add_parser("list", help="threads, from workflow-events")
    listing.add_argument("--status", help="running, completed, failed or cancelled")
    listing.add_argument("--workflow", help="only threads of this workflow")
    describe = commands.add_parser("describe", help="one thread: status, waits, timers, error")
    describe.add_argument("thread")
    watch = commands.add_parser("watch", help="counts and recent transitions, refreshed")
    watch.add_argument("--duration", type=float, help="stop after S seconds (default: Ctrl-C)")
    watch.add_argument("--interval", type=float, default=1.0, help="refresh every S seconds")
    watch.add_argument("--recent", type=int, default=15, help="transitions shown (%(default)s)")
    for parser, handler in ((result, result_command), (listing, list_command),
                            (describe, describe_command), (watch, watch_command)):
        add_kafka(parser)
        add_json(parser)
        parser.set_defaults(handler=handler)


# -- writing -----------------------------------------------------------------------------------


def start_command(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    parse_json(args.input, "--input")
    try:
        load_modules(settings.workflows)
        Registry().resolve(args.workflow)
    except UnknownWorkflow as e:
        msg = f"not sent: {e} (KWF_WORKFLOWS={','.join(settings.workflows)})"
        raise CliError(msg, USAGE) from None
    except ImportError as e:
        msg = f"cannot import the workflow modules {settings.workflows} (KWF_WORKFLOWS): {e}"
        raise CliError(msg, USAGE) from None
    prefix = "init" if args.init else "new"
    return submit(settings, args.id, f"{prefix}:{args.workflow}:{args.input}", args)


def signal_command(args: argparse.Namespace) -> int:
    field, text = ("value", args.value) if args.value is not None else ("error", args.error)
    value = parse_json(text, f"--{field}")
    return submit(settings_of(args), args.thread, json.dumps({"ref": args.ref, field: value}),
                  args)


def cancel_command(args: argparse.Namespace) -> int:
    return submit(settings_of(args), args.thread, "cancel:", args)


# -- reading -----------------------------------------------------------------------------------


def _outcome(settings: Settings, thread: str, timeout: float) -> dict[str, Any] | None:
    """The thread's status, with its result or error (and the error's headers) when finished."""
    status = read_statuses(settings, {thread}, timeout).get(thread)
    if status is None or status["status"] == "running":
        return status
    topic = {"completed": settings.result_topic, "failed": settings.error_topic}.get(
        status["status"])
    if topic is not None:
        last = latest(read(settings, topic, timeout)).get(thread)
        if last is not None:
            status = {**status, "value": json.loads(last.value or "null")}
            if topic == settings.error_topic:
                status["error_type"] = last.headers.get("kwf-error-type")
                status["traceback"] = last.headers.get("kwf-traceback") or status.get("traceback")
    return status


def result_command(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    reach(settings, [settings.events_topic, settings.result_topic, settings.error_topic],
          args.timeout)
    deadline = time.monotonic() + args.wait
    while True:
        outcome = _outcome(settings, args.thread, args.timeout)
        if outcome is None:
            raise CliError(f"no thread {args.thread!r} in {settings.events_topic} (never started,"
                           " or forgotten after its retention)", NOT_FOUND)
        if outcome["status"] != "running" or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    state = outcome["status"]
    if args.json:
        print_json(outcome)
    elif state == "completed":
        print(json.dumps(outcome.get("value")))
    elif state == "failed":
        print(f"failed: {outcome.get('value', outcome.get('error'))} "
              f"({outcome.get('error_type') or 'error'})")
        if outcome.get("traceback"):
            print(outcome["traceback"])
    else:
        print(f"{state} (step {outcome['step']}, pending {outcome['pending'] or '-'})")
    return {"completed": OK, "running": WAITING}.get(state, THREAD_FAILED)


def list_command(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    reach(settings, [settings.events_topic], args.timeout)
    rows = [s for _, s in sorted(read_statuses(settings, None, args.timeout).items())
            if (args.status is None or s["status"] == args.status)
            and (args.workflow is None or s["workflow"] == args.workflow)]
    if args.json:
        print_json(rows)
        return OK
    for s in rows:
        print(status_line(s))
    print(f"{len(rows)} threads")
    return OK


def describe_command(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    reach(settings, [settings.events_topic, settings.result_topic, settings.error_topic],
          args.timeout)
    d = _outcome(settings, args.thread, args.timeout)
    if d is None:
        raise CliError(f"no thread {args.thread!r} in {settings.events_topic} (never started, or "
                       "forgotten after its retention)", NOT_FOUND)
    if args.json:
        print_json(d)
        return OK
    print(f"thread    {d['thread']}\nworkflow  {d['workflow']}\nstatus    {d['status']}"
          f" (step {d['step']})\nupdated   {when(d.get('updated'))}")
    if d["status"] == "running":
        print(f"waiting   {', '.join(map(repr, d['pending'])) or 'on nothing (timers only)'}")
        for t in d.get("timers", []):
            print(f"timer     {when(t)}")
    if "value" in d:
        kind = f" ({d['error_type']})" if d.get("error_type") else ""
        print(f"{'result' if d['status'] == 'completed' else 'error':<10}"
              f"{json.dumps(d['value'])}{kind}")
    elif d.get("error"):
        print(f"error     {d['error']}")
    if d.get("traceback"):
        print("traceback\n" + "\n".join("  " + line for line in str(d["traceback"]).splitlines()))
    return OK


# -- watch -------------------------------------------------------------------------------------


def watch_command(args: argparse.Namespace) -> int:
    """Counts by status and recent transitions, redrawn in place every ``--interval`` s."""
    settings = settings_of(args)
    topic = settings.events_topic
    reach(settings, [topic], args.timeout)
    start = ends(settings, topic, args.timeout)
    state = {k: json.loads(m.value or "{}") for k, m in latest(read(settings, topic,
                                                                    args.timeout)).items()}
    recent: deque[dict[str, Any]] = deque(maxlen=args.recent)
    consumer = open_consumer(settings)
    consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
    stop = None if args.duration is None else time.monotonic() + args.duration
    tty = sys.stdout.isatty() and not args.json
    try:
        while True:
            refresh = time.monotonic() + args.interval
            while time.monotonic() < refresh:
                for raw in consumer.consume(500, 0.2):
                    if raw.error() is None:
                        _seen(to_message(raw), state, recent)
            _draw(state, recent, args.json, tty)
            if stop is not None and time.monotonic() >= stop:
                return OK
    finally:
        consumer.close()


def _seen(msg: Message, state: dict[str, dict[str, Any]], recent: deque[dict[str, Any]]) -> None:
    if msg.key is None:
        return
    old = state.get(msg.key, {}).get("status")
    if msg.value is None:
        state.pop(msg.key, None)
        return
    new = state[msg.key] = json.loads(msg.value)
    if new.get("status") != old:
        recent.append({"time": msg.timestamp, "thread": msg.key, "workflow": new.get("workflow"),
                       "from": old, "to": new.get("status"), "step": new.get("step")})


def _draw(state: dict[str, dict[str, Any]], recent: deque[dict[str, Any]], as_json: bool,
          tty: bool) -> None:
    counts = Counter(s.get("status") for s in state.values())
    if as_json:
        print(json.dumps({"counts": dict(counts), "recent": list(recent)}), flush=True)
        return
    lines = [time.strftime("kwf watch - %H:%M:%S UTC", time.gmtime()),
             "  ".join(f"{k} {counts.get(k, 0)}" for k in
                       ("running", "completed", "failed", "cancelled")),
             "", "recent transitions:"]
    lines += [f"  {time.strftime('%H:%M:%S', time.gmtime(r['time']))}  {r['thread']}  "
              f"{r['workflow']}  {r['from'] or 'new'} -> {r['to']} (step {r['step']})"
              for r in reversed(recent)] or ["  none yet"]
    print(("\x1b[H\x1b[2J" if tty else "\n") + "\n".join(lines), flush=True)
