"""``kwf history | replay | timeline``: a thread's journal, read from the recovery store.

The journal is the thread's history (DESIGN section 7). These commands read it read-only from
the engine's recovery directory (``_store``: safe while the engine runs; the newest snapshot,
so up to ``-s`` seconds behind) and replay it under today's code with ``kwf.history.replay``,
the same function ``kwf.testing.Engine.history`` uses: ``history`` prints each step (its event,
its time, its outputs), ``replay`` checks every step against the journal and names the first
that diverges (``--pdb`` stops inside the workflow), ``timeline`` draws the same as SVG.
"""

from __future__ import annotations

import argparse
import json
import pdb
import time
from pathlib import Path

from kwf._timeline import Timeline, duration
from kwf.cli._kafka import (DIVERGED, NOT_FOUND, OK, USAGE, CliError, add_json, print_json,
                            settings_of)
from kwf.cli._store import StoreError, read_journals
from kwf.cli.ops import when
from kwf.config import Settings
from kwf.history import History, Step, replay
from kwf.journal import Journal
from kwf.registry import Registry, Workflow, load_modules

DEFAULT_RECOVERY = ".kwf/recovery"
"""Where ``kwf run`` (``--state .kwf``) keeps its recovery partitions."""


def register_history(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    history = commands.add_parser("history", help="a thread's journal as a timeline of steps")
    replaying = commands.add_parser("replay", help="rebuild a thread under today's code; report "
                                                   "the first step that diverges")
    replaying.add_argument("--pdb", action="store_true",
                           help="stop in the debugger at the workflow's first line")
    timeline = commands.add_parser("timeline", help="a picture of a thread (SVG)")
    timeline.add_argument("-o", "--output", help="the SVG file (default: THREAD.svg)")
    for parser, handler in ((history, history_command), (replaying, replay_command),
                            (timeline, timeline_command)):
        parser.add_argument("thread")
        parser.add_argument("--recovery", default=DEFAULT_RECOVERY,
                            help="the engine's recovery directory (%(default)s, as kwf run)")
        if parser is not timeline:
            add_json(parser)
        parser.set_defaults(handler=handler)


def load(args: argparse.Namespace) -> tuple[Journal, Workflow | None, Settings]:
    """The thread's journal from the store, and today's code for its workflow (if served)."""
    settings = settings_of(args)
    try:
        journals = list(read_journals(args.recovery, [args.thread]))
    except StoreError as e:
        raise CliError(str(e), USAGE) from None
    if not journals:
        msg = (f"no thread {args.thread!r} in {args.recovery} (not started, not snapshotted yet,"
               " or discarded after its retention)")
        raise CliError(msg, NOT_FOUND)
    journal = journals[0]
    try:
        load_modules(settings.workflows)
    except ImportError as e:
        msg = f"cannot import the workflow modules {settings.workflows} (KWF_WORKFLOWS): {e}"
        raise CliError(msg, USAGE) from None
    return journal, Registry().workflows.get(journal.workflow), settings


def history_command(args: argparse.Namespace) -> int:
    journal, workflow, settings = load(args)
    history = replay(journal, workflow, settings)
    if args.json:
        print_json(history.as_dict(settings.events_topic))
        return OK
    _print(history, settings)
    return OK


def replay_command(args: argparse.Namespace) -> int:
    journal, workflow, settings = load(args)
    if workflow is None:
        msg = (f"thread {args.thread!r} runs workflow {journal.workflow!r}, which the modules "
               f"{settings.workflows} (KWF_WORKFLOWS) do not define")
        raise CliError(msg, USAGE)
    if args.pdb:
        replayed = _debug(journal, workflow, settings)
        if replayed is None:
            print("replay abandoned in the debugger")
            return OK
        history = replayed
    else:
        history = replay(journal, workflow, settings)
    if args.json:
        print_json(history.as_dict(settings.events_topic))
    else:
        _print(history, settings)
    if not history.replayed:
        return OK
    bad = history.divergence
    if bad is None:
        print(f"replay matches the journal: {len(history.steps)} steps under today's code")
        return OK
    print(f"DIVERGED at step {bad.number} ({_what(bad)}): {bad.diverged}")
    return DIVERGED


def _debug(journal: Journal, workflow: Workflow, settings: Settings) -> History | None:
    """``replay`` under pdb, stopped at the workflow's first line; None if the user quit."""
    debugger = _Pdb()
    code = workflow.fn.__code__
    body = min((line for *_, line in code.co_lines()
                if line is not None and line > code.co_firstlineno), default=code.co_firstlineno)
    debugger.set_break(code.co_filename, body)
    print(f"stopping at {code.co_filename}:{body}, the workflow's first line; `c` goes on, "
          "`q` abandons the replay", flush=True)
    debugger.cmdqueue.append("continue")  # from replay's own first line to the breakpoint
    history: History | None = debugger.runcall(replay, journal, workflow, settings)
    # Quitting raises BdbQuit inside the workflow, which fails it: that replay proves nothing.
    return None if debugger.quit_asked else history


class _Pdb(pdb.Pdb):
    """pdb that remembers whether the user quit (``q`` or end of input)."""

    quit_asked = False

    def set_quit(self) -> None:
        self.quit_asked = True
        super().set_quit()


def timeline_command(args: argparse.Namespace) -> int:
    journal, workflow, settings = load(args)
    target = Path(args.output or f"{args.thread}.svg")
    Timeline(replay(journal, workflow, settings), settings).save(target)
    print(f"wrote {target} ({len(journal.events) + 1} journal steps)")
    return OK


def _what(step: Step) -> str:
    return step.kind if step.ref is None else f"{step.kind} {step.ref!r}"


def _print(history: History, settings: Settings) -> None:
    j = history.journal
    print(f"thread {j.thread}  workflow {history.workflow}  {j.status}  step {j.step}  "
          f"started {when(j.started)}")
    if history.note:
        print(f"  ({history.note})")
    if j.finished and not history.steps:
        print(f"  {'result' if j.status == 'completed' else 'error'}: {j.result}")
    for step in history.steps:
        millis = int(step.time * 1000) % 1000
        stamp = time.strftime("%H:%M:%S", time.gmtime(step.time)) + f".{millis:03d}"
        payload = j.arg if step.event is None else step.payload
        origin = step.origin or j.origin  # a timer's ("17.1") is no record of its own
        record = f"  (record at offset {origin})" if "." not in origin else ""
        print(f"step {step.number:<3} {stamp} (+{duration(step.time - j.started)})  "
              f"{_what(step)}  {json.dumps(payload)[:200]}{record}")
        for rec in step.outputs:
            if rec.topic != settings.events_topic:
                print(f"    -> {rec.topic}  {str(rec.value)[:200]}")
        if step.diverged:
            print(f"    !! diverged: {step.diverged}")
        elif history.replayed:
            print(f"    waiting {list(step.pending) or '-'}  timers "
                  f"{', '.join(when(t, step.time) for t in step.timers) or '-'}")
