"""``kwf dlq list | show | resend``: the dead letters in ``workflow-dlq``.

Each dead letter is the refused record (key and value as they came) with two headers: the
reason ``kwf-error`` (``<code>: <what to do>``, the code stable) and where it came from,
``kwf-source`` (``topic/partition/offset``). ``list`` groups them by code, ``show`` prints one
whole, and ``resend`` writes it again (fixed with ``--value``/``--key``) to its source topic;
to ``workflow-resume`` it goes through ``ops.submit``, so a record refused again is reported.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from confluent_kafka import TopicPartition

from kwf.cli._kafka import (NOT_FOUND, OK, USAGE, CliError, Message, open_consumer, to_message,
                            add_json, add_kafka, print_json, produce, reach, read, settings_of)
from kwf.cli.ops import add_check, submit
from kwf.config import Settings


def register_dlq(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = commands.add_parser("dlq", help="dead letters: list, show, resend")
    actions = dlq.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="dead letters, counted by code")
    listing.add_argument("--code", help="only this code (bad-json, unknown-thread, ...)")
    listing.add_argument("--key", help="only records with this key (thread id)")
    show = actions.add_parser("show", help="one dead letter, whole")
    resend = actions.add_parser("resend", help="write a dead letter again to its source topic")
    for action in (show, resend):
        action.add_argument("address", help="PARTITION/OFFSET in workflow-dlq (as list shows)")
    resend.add_argument("--value", help="the fixed value (default: the record's own)")
    resend.add_argument("--key", help="the fixed key (default: the record's own)")
    add_check(resend)
    for action, handler in ((listing, list_command), (show, show_command),
                            (resend, resend_command)):
        add_kafka(action)
        if action is not resend:
            add_json(action)
        action.set_defaults(handler=handler)


def code_of(msg: Message) -> str:
    """The stable code of a dead letter: ``kwf-error`` up to its first colon."""
    return msg.headers.get("kwf-error", "?").split(":", 1)[0]


def list_command(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    reach(settings, [settings.dlq_topic], args.timeout)
    letters = [m for m in read(settings, settings.dlq_topic, args.timeout)
               if (args.code is None or code_of(m) == args.code)
               and (args.key is None or m.key == args.key)]
    counts = Counter(code_of(m) for m in letters)
    if args.json:
        print_json({"counts": dict(counts), "letters": [
            {**m.as_dict(), "code": code_of(m), "address": f"{m.partition}/{m.offset}"}
            for m in letters]})
        return OK
    for code, n in counts.most_common():
        print(f"{n:6}  {code}")
    for m in letters:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.timestamp))
        print(f"{m.partition}/{m.offset}  {stamp}  {code_of(m):<16} key={_clip(m.key)}  "
              f"from {m.headers.get('kwf-source', '?')}  value={_clip(m.value)}")
    print(f"{len(letters)} dead letters in {settings.dlq_topic}")
    return OK


def fetch(settings: Settings, address: str, timeout: float) -> Message:
    """The dead letter at ``PARTITION/OFFSET``, or ``CliError`` (not found / bad address)."""
    try:
        partition, offset = (int(x) for x in address.rsplit("/", 2)[-2:])
    except ValueError:
        raise CliError(f"{address!r} is not PARTITION/OFFSET (kwf dlq list shows them)",
                       USAGE) from None
    consumer = open_consumer(settings)
    try:
        consumer.assign([TopicPartition(settings.dlq_topic, partition, offset)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [raw for raw in consumer.consume(1, 0.2) if raw.error() is None]
            if got:
                if got[0].offset() == offset:
                    return to_message(got[0])
                break  # compacted or deleted: Kafka skipped to the next one
    finally:
        consumer.close()
    raise CliError(f"no dead letter at {settings.dlq_topic} {partition}/{offset}", NOT_FOUND)


def show_command(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    reach(settings, [settings.dlq_topic], args.timeout)
    m = fetch(settings, args.address, min(args.timeout, 3.0))
    if args.json:
        print_json({**m.as_dict(), "code": code_of(m)})
        return OK
    print(f"dead letter {settings.dlq_topic} {m.partition}/{m.offset} "
          f"({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(m.timestamp))})")
    print(f"code      {code_of(m)}")
    for name, value in m.headers.items():
        print(f"{name:<15} {value}")
    print(f"key       {m.key!r}\nvalue     {m.value!r}")
    return OK


def resend_command(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    reach(settings, [settings.dlq_topic], args.timeout)
    m = fetch(settings, args.address, min(args.timeout, 3.0))
    source = m.headers.get("kwf-source", "").split("/", 1)[0]
    if not source:
        raise CliError(f"dead letter {args.address} has no kwf-source header: where to?", USAGE)
    if "kwf-truncated" in m.headers and args.value is None:
        raise CliError(f"dead letter {args.address} was cut ({m.headers['kwf-truncated']}); "
                       "pass the whole value with --value", USAGE)
    key = args.key if args.key is not None else m.key
    value = args.value if args.value is not None else m.value
    if source == settings.resume_topic and key is not None and value is not None:
        return submit(settings, key, value, args)
    reach(settings, [source], args.timeout)
    partition, offset = produce(settings, source, key, value, args.timeout)
    print(f"sent to {source}/{partition}/{offset} key={key!r}")
    return OK


def _clip(text: str | None, limit: int = 40) -> str:
    if text is None:
        return "null"
    return repr(text if len(text) <= limit else text[:limit] + "...")
