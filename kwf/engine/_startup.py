"""What the engine process checks and prepares before Bytewax starts, in this order.

1. **The lock.** An exclusive ``flock`` on ``<recovery>/kwf.lock``, held for the life of the
   process: a second engine on the same directory would re-emit every output and leave
   partitions that no later start can resume from, so it refuses within seconds, naming the
   holder's pid.
2. **The cluster check** (``kwf.engine._cluster``): every process serves the same workflows
   with the same settings, and process 0 decides the recovery store for all.
3. **The recovery store.** Process 0 also sees every process's partitions (``part-N.sqlite3``)
   and ``kwf-recovery.json`` (written once the whole store exists), so it decides for the
   cluster: create the partitions of a first start (each index in exactly one process's
   directory: part ``i`` lives with process ``i % processes``), complete an interrupted first
   initialisation, or refuse, saying what to do, when partitions that held state are missing.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from kwf.config import Settings
from kwf.engine.flow import StartupError
from kwf.registry import Registry

log = structlog.get_logger("kwf.engine.startup")

LOCK_NAME = "kwf.lock"
MARKER_NAME = "kwf-recovery.json"
_PART = re.compile(r"^part-(\d+)\.sqlite3$")

_held: list[int] = []
"""Lock file descriptors, kept open (and so locked) until the process exits."""


@dataclass(frozen=True)
class Launch:
    """What ``python -m bytewax.run`` was asked to run: recovery, process id, peers, workers."""

    recovery: Path | None
    process: int = 0
    addresses: tuple[str, ...] = ()
    workers: int = 1
    snapshot_s: float | None = None
    backup_s: float | None = None

    @property
    def processes(self) -> int:
        return max(len(self.addresses), 1)


def launch_from_argv() -> Launch | None:
    """The launch as ``bytewax.run`` parses it (same flags, same ``BYTEWAX_*`` variables), or
    ``None`` when this process is not ``python -m bytewax.run`` (a test importing the flow)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or spec.name != "bytewax.run":
        return None
    from bytewax.run import _parse_args  # the very parser that runs the engine

    args = _parse_args()  # type: ignore[no-untyped-call]
    addresses = tuple(a for a in (args.addresses or "").split(";") if a)
    return Launch(
        recovery=Path(args.recovery_directory) if args.recovery_directory else None,
        process=int(args.process_id or 0), addresses=addresses,
        workers=int(args.workers_per_process or 1),
        snapshot_s=args.snapshot_interval.total_seconds() if args.snapshot_interval else None,
        backup_s=args.backup_interval.total_seconds() if args.backup_interval else None)


# -- 1. the lock ---------------------------------------------------------------------------------

def lock_recovery(directory: Path) -> None:
    """Hold ``directory/kwf.lock`` exclusively until this process exits, or ``StartupError``."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        msg = (f"the recovery directory {directory} is in use by another engine ({holder}); "
               "two engines on one directory would write every output twice and corrupt its "
               "partitions: stop that one, or give this one its own directory")
        raise StartupError(msg) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held.append(fd)


# -- 3. the recovery store (decided by process 0 from every process's report) --------------------

def store_report(directory: Path | None) -> dict[str, Any]:
    """What one process's recovery directory holds: partition indices and the marker."""
    if directory is None:
        return {"parts": [], "marker": None}
    parts = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _PART.match(p.name)))
    marker_path = directory / MARKER_NAME
    marker = json.loads(marker_path.read_text()) if marker_path.exists() else None
    return {"parts": parts, "marker": marker, "directory": str(directory)}


def plan_store(reports: Mapping[int, Mapping[str, Any]], partitions: int
               ) -> tuple[dict[int, list[int]], dict[str, int]]:
    """Which partitions each process must create, and the marker every process then keeps.

    ``reports`` maps each process id to its ``store_report``; ``partitions`` is
    ``KWF_RECOVERY_PARTITIONS`` (0: none may be created here). Raises ``StartupError`` saying
    what to do when the store cannot be used as it is.
    """
    processes = len(reports)
    where: dict[int, int] = {}
    for proc, report in sorted(reports.items()):
        for index in report["parts"]:
            if index in where:
                msg = (f"recovery partition {index} exists in the directories of processes "
                       f"{where[index]} and {proc}: each must exist once; keep the one with the "
                       "state (the larger file) and delete the other")
                raise StartupError(msg)
            where[index] = proc
    markers = {proc: r["marker"] for proc, r in reports.items() if r["marker"]}
    if markers:  # the store was complete once: partitions hold state, never recreate one
        counts = {m["partitions"] for m in markers.values()}
        if len(counts) > 1:
            msg = f"the processes' {MARKER_NAME} disagree on the partition count: {markers}"
            raise StartupError(msg)
        total = counts.pop()
        missing = sorted(set(range(total)) - set(where))
        if missing:
            first = markers[min(markers)]
            owners = sorted({i % first["processes"] for i in missing})
            msg = (f"recovery partitions {missing} of {total} are missing; the store was "
                   f"complete before, in the volumes of processes {owners} (counted when "
                   f"{first['processes']} processes first started), so their state is lost: "
                   "restore those volumes from a backup; or, to start over, delete every "
                   "process's recovery volume (every workflow's state is lost and the input "
                   "is read again from the start)")
            raise StartupError(msg)
        return {proc: [] for proc in reports}, {"partitions": total,
                                                "processes": next(iter(markers.values()))[
                                                    "processes"]}
    if partitions <= 0:
        if where and sorted(where) == list(range(len(where))):
            return {proc: [] for proc in reports}, {"partitions": len(where),
                                                    "processes": processes}
        msg = (f"no usable recovery partitions (found {sorted(where)}): set "
               "KWF_RECOVERY_PARTITIONS (the most workers you will ever run) and the engine "
               "creates them, or run `python -m bytewax.recovery DIR N` once")
        raise StartupError(msg)
    plan: dict[int, list[int]] = {}
    for proc in reports:
        strays = [i for i in reports[proc]["parts"] if i >= partitions or i % processes != proc]
        if strays:  # a first initialisation under another process count was interrupted
            msg = (f"process {proc} holds recovery partitions {strays} that a first start with "
                   f"{processes} processes and {partitions} partitions would not put there; no "
                   "engine has run on them yet: delete every process's recovery directory "
                   "(volume) and start again")
            raise StartupError(msg)
        plan[proc] = [i for i in range(proc, partitions, processes)
                      if i not in reports[proc]["parts"]]
    if where:
        log.warning("recovery_init_completed", present=sorted(where),
                    creating={p: c for p, c in plan.items() if c})
    return plan, {"partitions": partitions, "processes": processes}


def create_partitions(directory: Path, indices: list[int], total: int) -> None:
    """Create ``part-i.sqlite3`` for ``indices`` of ``total``: Bytewax can only create them all,
    so they are made in a scratch directory and each wanted one is renamed in (atomically)."""
    if not indices:
        return
    from bytewax.recovery import init_db_dir

    scratch = directory / ".kwf-init"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    init_db_dir(scratch, total)  # type: ignore[no-untyped-call]
    for index in indices:
        for suffix in ("", "-wal", "-shm"):
            made = scratch / f"part-{index}.sqlite3{suffix}"
            if made.exists():
                os.replace(made, directory / made.name)
    shutil.rmtree(scratch)
    log.info("recovery_partitions_created", directory=str(directory), parts=indices, of=total)


def write_marker(directory: Path | None, marker: Mapping[str, int]) -> None:
    """Record that the whole store exists (from now on a missing partition means lost state)."""
    if directory is None or not marker:
        return
    path = directory / MARKER_NAME
    if path.exists() and json.loads(path.read_text()) == dict(marker):
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(marker)) + "\n")
    os.replace(tmp, path)


def guard(settings: Settings, registry: Registry, launch: Launch | None = None) -> None:
    """Everything above, for the engine about to start; ``StartupError`` when it must not."""
    launch = launch if launch is not None else launch_from_argv()
    if launch is None:
        return
    if launch.recovery is not None:
        lock_recovery(launch.recovery)
    from kwf.engine._cluster import check_cluster, identity

    check_cluster(launch, identity(settings, registry, launch), store_report(launch.recovery),
                  settings.recovery_partitions, settings.cluster_timeout_s)
