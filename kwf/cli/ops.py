"""``kwf send`` and ``kwf status``: poke a running engine from a shell, as an operator would.

``send`` writes one record to ``workflow-resume`` (the wire protocol verbatim) and then watches
``workflow-dlq`` briefly for a dead letter of that very record (``kwf-source`` names its
partition and offset), so a refused record is reported instead of "sent". ``submit`` is that
write-and-watch, shared with ``start``, ``signal`` and ``cancel``. ``status`` reads threads'
latest records from the compacted ``workflow-events`` topic. All use the engine's settings
(``KWF_*``), so they talk to the same topics.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from confluent_kafka import TopicPartition

from kwf._timeline import duration
from kwf.cli._kafka import (DEAD_LETTERED, NOT_FOUND, OK, USAGE, CliError, Message, open_consumer,
                            to_message, add_json, add_kafka, ends, latest, print_json, produce,
                            reach, read, settings_of)
from kwf.config import Settings
from kwf.protocol import ProtocolError, parse_command


def register_ops(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = commands.add_parser("send", help="write one record to workflow-resume")
    send.add_argument("thread", help="the thread id (the record's key)")
    send.add_argument("value", help="new:<json>, new:<name>:<json>, {\"ref\": ..., \"value\": ...}"
                                    ", cancel:, ... (the wire protocol, verbatim)")
    add_check(send)
    send.set_defaults(handler=send_command)
    status = commands.add_parser("status", help="threads' latest status from workflow-events")
    status.add_argument("threads", nargs="*", help="thread ids (all threads if none)")
    status.set_defaults(handler=status_command)
    add_json(status)
    for action in (send, status):
        add_kafka(action)


def add_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", type=float, default=5.0, metavar="S",
                        help="seconds to watch workflow-dlq for this record (%(default)s; 0: "
                             "do not watch)")


# -- writing to workflow-resume --------------------------------------------------------------


def submit(settings: Settings, thread: str, value: str, args: argparse.Namespace) -> int:
    """Write ``value`` for ``thread`` and report whether the engine took or dead-lettered it.

    Watches ``workflow-dlq`` (for this record's ``kwf-source``) and ``workflow-events`` (a status
    of the thread stamped at or after the record means the engine applied it) for ``--check`` s.
    """
    try:  # the engine would dead-letter it: say so here, and send nothing
        parse_command(value)
    except ProtocolError as e:
        raise CliError(f"not sent: {e}", USAGE) from None
    topic = settings.resume_topic
    reach(settings, [topic, settings.dlq_topic, settings.events_topic], args.timeout)
    since = {t: ends(settings, t, args.timeout)
             for t in (settings.dlq_topic, settings.events_topic)}
    sent_at = time.time()
    partition, offset = produce(settings, topic, thread, value, args.timeout)
    source = f"{topic}/{partition}/{offset}"
    print(f"sent to {source} key={thread!r}", flush=True)
    if args.check <= 0:
        return OK
    seen = _watch(settings, since, source, thread, sent_at, args.check)
    if seen is None:
        print(f"no word from the engine within {args.check:g} s (is it running? `kwf status "
              f"{thread}` shows when it applies the record)")
        return OK
    if seen.topic == settings.dlq_topic:
        print(f"DEAD-LETTERED by the engine: {seen.headers.get('kwf-error', '?')}")
        print(f"  see it with `kwf dlq show {seen.address}`")
        return DEAD_LETTERED
    status = json.loads(seen.value or "{}")
    print(f"applied: thread {thread!r} {status.get('status')} at step {status.get('step')}")
    return OK


def _watch(settings: Settings, since: dict[str, dict[int, int]], source: str, thread: str,
           sent_at: float, seconds: float) -> Message | None:
    consumer = open_consumer(settings)
    try:
        consumer.assign([TopicPartition(t, p, o) for t, parts in since.items()
                         for p, o in parts.items()])
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for raw in consumer.consume(100, 0.2):
                if raw.error() is not None:
                    continue
                msg = to_message(raw)
                if msg.topic == settings.dlq_topic and msg.headers.get("kwf-source") == source:
                    return msg
                if (msg.topic == settings.events_topic and msg.key == thread
                        and msg.value is not None and msg.timestamp >= sent_at - 1):
                    return msg
    finally:
        consumer.close()
    return None


def send_command(args: argparse.Namespace) -> int:
    return submit(settings_of(args), args.thread, args.value, args)


# -- reading workflow-events -------------------------------------------------------------------


def read_statuses(settings: Settings, threads: set[str] | None,
                  timeout: float) -> dict[str, dict[str, Any]]:
    """The latest ``workflow-events`` value per thread (all of them, or those named)."""
    last = latest(read(settings, settings.events_topic, timeout))
    return {k: json.loads(m.value or "null") for k, m in last.items()
            if threads is None or k in threads}


def when(t: float | None, now: float | None = None) -> str:
    """A time as a date and how far from now: ``2026-12-02 05:00:00 UTC (in 3 h)``."""
    if t is None:
        return "-"
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    rel = f"in {duration(t - now)}" if t > now else f"{duration(now - t)} ago"
    return f"{stamp} UTC ({rel})"


def status_line(s: dict[str, Any]) -> str:
    timers = ", ".join(when(t) for t in s.get("timers", [])) or "-"
    line = (f"{s['thread']}  {s['workflow']}  {s['status']}  step {s['step']}  "
            f"pending {s.get('pending') or '-'}  timers {timers}")
    if s.get("error"):
        line += f"  error: {str(s['error']).splitlines()[0]}"
    return line


def status_command(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    reach(settings, [settings.events_topic], args.timeout)
    wanted = set(args.threads) or None
    statuses = read_statuses(settings, wanted, args.timeout)
    missing = sorted((wanted or set()) - set(statuses))
    if args.json:
        print_json({"threads": statuses, "unknown": missing})
    else:
        for thread in sorted(statuses):
            print(status_line(statuses[thread]))
        for thread in missing:
            print(f"{thread}  unknown (never started, or forgotten after its retention)")
    return NOT_FOUND if missing else OK
