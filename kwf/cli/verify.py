"""``kwf verify``: the deploy gate. Replays every live thread of a recovery store against today's code.

A change to a workflow that running threads cannot replay parks them as failed on their next
rebuild, which may come days later. ``kwf verify --recovery DIR`` finds that out before the new
version starts: it reads each thread's newest journal from the store (read-only, safe while an
engine runs), rebuilds it with the workflows this checkout serves, and reports every thread whose
replay diverges, with its workflow, the step and what differed. Threads are spread over
processes by a hash of their key, each process reading the partitions itself.

Exit codes (the Kubernetes init container relies on them):

- ``0``: every live thread replays against this code (an empty store passes);
- ``1``: at least one thread diverged, runs a workflow this code does not serve, or has a
  journal this kwf cannot decode: do not start this version;
- ``2``: nothing could be verified (no such store, unreadable partitions, workflow modules that
  fail to import).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import time
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kwf.cli._kafka import DIVERGED, FAILED, OK, USAGE
from kwf.cli._store import StoreError, partitions, snapshots
from kwf.config import ENGINE_GC_THRESHOLDS, Settings
from kwf.errors import NonDeterminismError
from kwf.instance import Instance
from kwf.journal import decode
from kwf.registry import Registry, UnknownWorkflow, load_modules, registered

"""The exit codes; see the module docstring."""

SHOWN = 50
"""Divergences printed one by one; the rest are counted per workflow."""


@dataclass(frozen=True)
class Divergence:
    """One live thread that today's code cannot continue."""

    thread: str
    workflow: str
    step: int | None
    what: str

    def line(self) -> str:
        step = "?" if self.step is None else self.step
        return f"DIVERGED thread={self.thread!r} workflow={self.workflow} step={step}: {self.what}"


@dataclass
class Report:
    """What one verification found: counts, and every divergence."""

    live: int = 0
    finished: int = 0
    divergences: list[Divergence] = field(default_factory=list)

    def add(self, other: Report) -> None:
        self.live += other.live
        self.finished += other.finished
        self.divergences += other.divergences


def register_verify(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "verify", help="replay every live thread of a recovery store against this code",
        description="Exit 0: every live thread replays; 8: some diverged (listed); 1: no "
                    "usable store; 2: the workflow modules do not import.")
    parser.add_argument("--recovery", "-r", required=True, metavar="DIR",
                        help="the engine's recovery directory (part-*.sqlite3), read-only")
    parser.add_argument("--missing-ok", action="store_true",
                        help="a directory that is missing or holds no partitions yet passes: a "
                             "first deploy has no threads to verify (the StatefulSet's gate)")
    parser.add_argument("--workflows", metavar="MODULES",
                        help="comma-separated workflow modules (default: KWF_WORKFLOWS)")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                        help="processes (default: the CPU count, %(default)s)")
    parser.set_defaults(handler=verify_command)


def verify_command(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    modules = (tuple(m.strip() for m in args.workflows.split(",") if m.strip())
               if args.workflows else settings.workflows)
    began = time.perf_counter()
    if args.missing_ok and not any(Path(args.recovery).glob("part-*.sqlite3")):
        print(f"kwf verify: {args.recovery} holds no recovery partitions yet: nothing to verify")
        return OK
    try:
        report = verify_store(args.recovery, modules, settings, jobs=args.jobs)
    except StoreError as e:
        print(f"kwf verify: cannot verify: {e}")
        return FAILED
    except Exception as e:  # noqa: BLE001 - any failure of user code at import
        print(f"kwf verify: cannot verify: the workflow modules {list(modules)} do not import "
              f"({type(e).__name__}: {e})")
        return USAGE
    took = time.perf_counter() - began
    for divergence in report.divergences[:SHOWN]:
        print(divergence.line())
    rest = report.divergences[SHOWN:]
    if rest:
        per = Counter(d.workflow for d in rest)
        print(f"... and {len(rest)} more: " + ", ".join(f"{w} {n}" for w, n in per.most_common()))
    verdict = (f"{len(report.divergences)} diverged: do not deploy this code"
               if report.divergences else "all replay")
    print(f"kwf verify: {report.live} live threads checked ({report.finished} finished, skipped) "
          f"in {took:.1f} s with {max(args.jobs, 1)} processes: {verdict}")
    return DIVERGED if report.divergences else OK


def verify_store(recovery_dir: str | Path, modules: Iterable[str], settings: Settings,
                 jobs: int = 1) -> Report:
    """Verify every thread of a recovery store; ``StoreError``, or the import error, if it cannot.

    With ``jobs > 1`` the threads are split into ``jobs`` shards by a hash of their key, and each
    (partition, shard) is a task for a pool of processes.
    """
    modules = tuple(modules)
    load_modules(modules)  # fail here, once, before any process starts
    parts = partitions(recovery_dir)
    jobs = max(1, jobs)
    tasks = [(str(part), shard, jobs, modules, settings) for part in parts for shard in range(jobs)]
    report = Report()
    if jobs == 1:
        for task in tasks:
            report.add(_verify_task(task))
        return report
    context = multiprocessing.get_context("fork" if "fork" in
                                          multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(jobs) as pool:
        for part_report in pool.imap_unordered(_verify_task, tasks):
            report.add(part_report)
    return report


_Task = tuple[str, int, int, tuple[str, ...], Settings]


def _verify_task(task: _Task) -> Report:
    """One shard of one partition; runs in a pool process (or inline with one job)."""
    part, shard, shards, modules, settings = task
    load_modules(modules)  # already imported under fork; needed under spawn
    registry = served(modules)
    gc.set_threshold(*ENGINE_GC_THRESHOLDS)  # many short-lived loops: as the engine does

    def mine(key: str) -> bool:
        return shards == 1 or zlib.crc32(key.encode()) % shards == shard

    report = Report()
    for key, data in snapshots(Path(part), mine):
        divergence = verify_snapshot(key, data, registry, settings, report)
        if divergence is not None:
            report.divergences.append(divergence)
    return report


def served(modules: tuple[str, ...]) -> Registry:
    """The workflows an engine with ``KWF_WORKFLOWS=modules`` serves: those the modules define.

    An engine process imports only those modules, so it serves every registered workflow; this
    process may hold others (tests, a notebook), which must not make a thread look served.
    """
    def inside(module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in modules)

    return Registry([w for w in registered() if inside(getattr(w.fn, "__module__", ""))])


def verify_snapshot(key: str, data: bytes, registry: Registry, settings: Settings,
                    report: Report) -> Divergence | None:
    """Rebuild one thread from its snapshot; the divergence if today's code cannot continue it."""
    try:
        journal = decode(data)
    except Exception as e:  # an older journal format, or bytes that are not a journal
        report.live += 1
        return Divergence(key, "?", None, f"the journal cannot be decoded by this kwf: {e}")
    if journal.finished:
        report.finished += 1
        return None
    report.live += 1
    if journal.refused is not None:  # an older journal format: the engine would park it
        return Divergence(key, journal.workflow, journal.step, journal.refused)
    try:
        workflow = registry.resolve(journal.workflow)
    except UnknownWorkflow:
        return Divergence(key, journal.workflow, journal.step,
                          f"workflow {journal.workflow!r} is not served by this code (served: "
                          f"{sorted(registry.workflows)}); keep it until its threads finish")
    try:
        Instance.rebuild(workflow, journal, settings).dispose()
    except NonDeterminismError as e:
        return Divergence(key, journal.workflow, e.step, str(e))
    except Exception as e:  # replay must not raise anything else; report it, do not stop
        return Divergence(key, journal.workflow, None, f"replay raised {type(e).__name__}: {e}")
    return None
