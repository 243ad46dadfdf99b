"""The cluster check: before Bytewax starts, every process agrees with process 0.

Every process of a Bytewax cluster must serve the same workflows (by fingerprint) with the same
settings: old and new code in one Timely cluster dead-letter or fail each other's threads. Each
process sends process 0 what it serves and what its recovery directory holds (a JSON line over
TCP, on the port after process 0's Timely port); process 0 compares, answers, and decides which
recovery partitions each process creates (``kwf.engine._startup.plan_store``). A mismatch stops
every process with a message naming both sides. Nothing of this is kept: it is redone at every
start, so recovery never sees it, and a process that dies midway only makes the others time out
and restart with it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import structlog

from kwf.config import Settings
from kwf.engine._startup import Launch, create_partitions, plan_store, write_marker
from kwf.engine.flow import StartupError
from kwf.registry import Registry

log = structlog.get_logger("kwf.engine.cluster")

CHECK_PORT_OFFSET = 1
"""The cluster check listens on process 0's Timely port + 1 (2102 next to 2101)."""
_MATTERS = ("resume_topic", "scheduler_topic", "result_topic", "error_topic", "events_topic",
            "dlq_topic", "max_payload_bytes", "max_live", "tombstone_retention_s",
            "batch_size", "recovery_partitions")
"""Settings that change what a thread does or where records go: they must agree cluster-wide."""


def identity(settings: Settings, registry: Registry, launch: Launch) -> dict[str, Any]:
    """What must be equal in every process of one cluster."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # run from a source tree on PYTHONPATH
            return "not installed"

    return {
        "workflows": {name: wf.fingerprint for name, wf in sorted(registry.workflows.items())},
        "default workflow": registry.default,
        "kwf": installed("kwf"), "bytewax": installed("bytewax"),
        "processes": launch.processes, "addresses": list(launch.addresses),
        "workers per process": launch.workers, "snapshot interval": launch.snapshot_s,
        "backup interval": launch.backup_s, "recovery": launch.recovery is not None,
        **{f"KWF_{name.upper()}": getattr(settings, name) for name in _MATTERS},
    }


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], me: str, them: str) -> str:
    """``""`` when equal, else each differing item with both sides' values, named."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        if key == "workflows" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"workflow {name!r}: {a.get(name) or 'not served'} in {me}, "
                               f"{b.get(name) or 'not served'} in {them}")
        else:
            out.append(f"{key}: {a!r} in {me}, {b!r} in {them}")
    return "; ".join(out)


def _send(conn: socket.socket, message: Mapping[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive(reader: Any, what: str) -> dict[str, Any]:
    line = reader.readline()
    if not line:
        msg = f"the cluster check connection closed while waiting for {what}"
        raise StartupError(msg)
    result: dict[str, Any] = json.loads(line)
    return result


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port) + CHECK_PORT_OFFSET


def check_cluster(launch: Launch, mine: dict[str, Any], report: dict[str, Any],
                  partitions: int, timeout: float) -> None:
    """Agree with every other process (or alone) on identity and the recovery store; prepare it.

    On return this process's partitions exist and its marker is written; otherwise
    ``StartupError`` says what differs or what to do.
    """
    if launch.processes == 1:
        if launch.recovery is not None:
            plan, marker = plan_store({0: report}, partitions)
            create_partitions(launch.recovery, plan[0], marker["partitions"])
            write_marker(launch.recovery, marker)
        return
    if launch.process == 0:
        _lead(launch, mine, report, partitions, timeout)
    else:
        _follow(launch, mine, report, timeout)


def _lead(launch: Launch, mine: dict[str, Any], report: dict[str, Any], partitions: int,
          timeout: float) -> None:
    host, port = _split(launch.addresses[0])
    deadline = time.monotonic() + timeout
    peers: dict[int, tuple[socket.socket, Any, dict[str, Any]]] = {}
    with socket.create_server((_bind_host(host), port)) as server:
        while len(peers) < launch.processes - 1:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                waiting = sorted(set(range(1, launch.processes)) - set(peers))
                msg = (f"processes {waiting} did not report within {timeout:g} s "
                       "(KWF_CLUSTER_TIMEOUT_S); they may still be starting: they all restart "
                       "and try again")
                raise StartupError(msg) from None
            conn.settimeout(max(deadline - time.monotonic(), 1.0))
            reader = conn.makefile("rb")
            hello = _receive(reader, "a process's report")
            proc = int(hello["process"])
            if not 0 < proc < launch.processes:
                _send(conn, {"error": f"process {proc} ({hello['address']}) is not expected in "
                                      f"a cluster of {launch.processes}: check the process ids "
                                      "and the address lists"})
                conn.close()
                continue
            if proc in peers:  # it restarted since its first report: the newer one counts
                peers[proc][0].close()
            peers[proc] = (conn, reader, hello)
    # The listener is closed before anyone is answered: its port is often process 1's Timely
    # port (2102 beside 2101), which process 1 binds as soon as it has its answer.
    try:
        _decide(launch, mine, report, partitions, peers)
    finally:
        for conn, reader, _ in peers.values():
            reader.close()
            conn.close()


def _decide(launch: Launch, mine: dict[str, Any], report: dict[str, Any], partitions: int,
            peers: dict[int, tuple[socket.socket, Any, dict[str, Any]]]) -> None:
    def refuse(msg: str) -> NoReturn:
        for conn, _, _ in peers.values():
            _send(conn, {"error": msg})
        raise StartupError(msg)

    for proc, (_, _, hello) in sorted(peers.items()):
        diff = differences(mine, hello["identity"], f"process 0 ({launch.addresses[0]})",
                           f"process {proc} ({hello['address']})")
        if diff:
            refuse("the processes of this cluster differ (a rollout in progress, or a "
                   f"misconfigured pod); they must all run the same image and settings: {diff}")
    reports = {0: report, **{proc: hello["store"] for proc, (_, _, hello) in peers.items()}}
    plan: dict[int, list[int]] = {proc: [] for proc in reports}
    marker: dict[str, int] = {}
    if launch.recovery is not None:
        try:
            plan, marker = plan_store(reports, partitions)
        except StartupError as e:
            refuse(str(e))
    for proc, (conn, _, _) in peers.items():
        _send(conn, {"create": plan[proc], "marker": marker})
    if launch.recovery is not None:
        create_partitions(launch.recovery, plan[0], marker["partitions"])
    for proc, (_, reader, _) in sorted(peers.items()):
        done = _receive(reader, f"process {proc} to create its partitions")
        if "error" in done:
            refuse(f"process {proc} could not create its partitions: {done['error']}")
    for conn, _, _ in peers.values():
        _send(conn, {"go": True})
    write_marker(launch.recovery, marker)
    log.info("cluster_checked", processes=launch.processes, marker=marker)


def _follow(launch: Launch, mine: dict[str, Any], report: dict[str, Any], timeout: float) -> None:
    host, port = _split(launch.addresses[0])
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=2.0)
            break
        except OSError as e:  # process 0 not up yet (or its name not yet in DNS)
            if time.monotonic() > deadline:
                msg = (f"process 0's cluster check at {host}:{port} did not answer within "
                       f"{timeout:g} s ({e}); it restarts and tries again")
                raise StartupError(msg) from e
            time.sleep(0.2)
    with conn, conn.makefile("rb") as reader:
        conn.settimeout(max(deadline - time.monotonic(), 1.0) + timeout)
        _send(conn, {"process": launch.process, "address": launch.addresses[launch.process],
                     "identity": mine, "store": report})
        answer = _receive(reader, "process 0's verdict")
        if "error" in answer:
            raise StartupError(answer["error"])
        try:
            if launch.recovery is not None:
                create_partitions(launch.recovery, answer["create"],
                                  answer["marker"].get("partitions", 0))
        except Exception as e:  # noqa: BLE001 - reported to process 0, which stops everyone
            _send(conn, {"error": f"{type(e).__name__}: {e}"})
            raise
        _send(conn, {"done": True})
        if "error" in (go := _receive(reader, "process 0's go")):
            raise StartupError(go["error"])
    write_marker(launch.recovery, answer["marker"])


def _bind_host(host: str) -> str:
    """Listen on the address itself when it is an IP (loopback tests), else on every interface
    (a pod FQDN: the pod's IP, which the name may not resolve to yet)."""
    try:
        socket.inet_aton(host)
    except OSError:
        return ""
    return host
