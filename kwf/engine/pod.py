"""The engine in a Kubernetes pod: its place in the cluster, and its probes.

``python -m kwf.engine.pod run -r DIR -s 5 -b 0`` is the container's command (k8s/): it derives
this process's id and every peer's address from the pod's own name and FQDN (so a kustomize
``namePrefix``, another namespace or cluster domain need no edit), then becomes
``python -m bytewax.run kwf.engine:engine_flow`` with the remaining flags. The process count is
``KWF_PROCESSES`` (copied from the StatefulSet's ``replicas`` by kustomize); workers per process
come from ``BYTEWAX_WORKERS_PER_PROCESS`` as Bytewax reads it.

``python -m kwf.engine.pod probe DIR --max-age S`` is the liveness and readiness check: it
succeeds while this process's recovery partitions were written within ``S`` seconds. Every
closed epoch writes each worker's progress there, so a cluster whose epochs stop closing (a
stuck worker, a peer gone) fails it. It only reads file times (about 0.5 s of CPU, mostly
importing kwf, every 10 to 20 s).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DEFAULT_PORT = 2101
"""The Timely port (``KWF_CLUSTER_PORT``); the startup check uses the next one."""


class PodError(RuntimeError):
    """This pod cannot find its place in the cluster; the message says what to fix."""


def cluster_addresses(pod_name: str, fqdn: str, processes: int, port: int) -> list[str]:
    """Every process's ``host:port``, from this pod's name and FQDN (``<pod>.<service>.<ns>...``).

    >>> cluster_addresses("acme-kwf-1", "acme-kwf-1.acme-kwf.prod.svc.cluster.local", 2, 2101)
    ['acme-kwf-0.acme-kwf.prod.svc.cluster.local:2101', 'acme-kwf-1.acme-kwf.prod.svc.cluster.local:2101']
    """
    statefulset, ordinal = split_pod_name(pod_name)
    first, _, domain = fqdn.partition(".")
    if first != pod_name or not domain:
        msg = (f"the pod's FQDN is {fqdn!r}, not <pod>.<service>.<namespace>...: the "
               "StatefulSet's serviceName must name a headless Service (k8s/service.yaml)")
        raise PodError(msg)
    if not 0 <= ordinal < processes:
        msg = (f"pod {pod_name} is process {ordinal} but KWF_PROCESSES={processes}: set the "
               "process count in one place, the overlay's replicas (its replacement copies it)")
        raise PodError(msg)
    return [f"{statefulset}-{i}.{domain}:{port}" for i in range(processes)]


def split_pod_name(pod_name: str) -> tuple[str, int]:
    """``("acme-kwf", 1)`` from ``acme-kwf-1``: a StatefulSet pod is ``<statefulset>-<ordinal>``."""
    statefulset, _, ordinal = pod_name.rpartition("-")
    if not statefulset or not ordinal.isdigit():
        msg = f"POD_NAME={pod_name!r} is not <statefulset>-<ordinal>: run it in a StatefulSet"
        raise PodError(msg)
    return statefulset, int(ordinal)


def pod_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``BYTEWAX_PROCESS_ID`` and ``BYTEWAX_ADDRESSES`` for this pod.

    ``BYTEWAX_ADDRESSES`` already set wins (the tests run pods on loopback, where no pod FQDN
    resolves); ``KWF_POD_FQDN`` stands in for the FQDN the pod's ``/etc/hosts`` gives.
    """
    try:
        pod_name, processes = env["POD_NAME"], int(env["KWF_PROCESSES"])
    except (KeyError, ValueError) as e:
        msg = f"POD_NAME and KWF_PROCESSES must be set (the downward API, k8s/) ({e!r})"
        raise PodError(msg) from e
    _, ordinal = split_pod_name(pod_name)
    addresses = env.get("BYTEWAX_ADDRESSES")
    if not addresses:
        fqdn = env.get("KWF_POD_FQDN") or socket.getfqdn()
        port = int(env.get("KWF_CLUSTER_PORT") or DEFAULT_PORT)
        addresses = ";".join(cluster_addresses(pod_name, fqdn, processes, port))
    elif len(addresses.split(";")) != processes:
        msg = f"BYTEWAX_ADDRESSES lists {addresses.count(';') + 1} processes, not {processes}"
        raise PodError(msg)
    return {"BYTEWAX_PROCESS_ID": str(ordinal), "BYTEWAX_ADDRESSES": addresses}


def engine_argv(flags: Sequence[str]) -> list[str]:
    """The engine's command line: Bytewax running ``kwf.engine`` with ``flags``."""
    return [sys.executable, "-m", "bytewax.run", "kwf.engine:engine_flow", *flags]


def last_write(directory: Path) -> float | None:
    """When this process's recovery partitions were last written (``None``: it holds none)."""
    times = [p.stat().st_mtime for p in directory.glob("part-*.sqlite3*")]
    return max(times) if times else None


def probe(directory: Path, max_age: float, now: float | None = None) -> str | None:
    """``None`` when healthy, else why not.

    A process that holds no partition (more processes than partitions) has nothing to judge
    by: its peers' probes fail instead when epochs stop, and a stuck cluster restarts whole.
    """
    if not directory.is_dir():
        return f"no recovery directory {directory}"
    written = last_write(directory)
    if written is None:
        return None if (directory / "kwf-recovery.json").exists() else "recovery not ready"
    age = (time.time() if now is None else now) - written
    if age > max_age:
        return f"no epoch closed for {age:.0f} s (limit {max_age:g} s)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kwf.engine.pod", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the engine as this pod's process of the cluster")
    check = commands.add_parser("probe", help="exit 1 when no epoch closed lately")
    check.add_argument("directory", type=Path)
    check.add_argument("--max-age", type=float, default=60.0)
    args, rest = parser.parse_known_args(argv)
    if args.command == "probe":
        why = probe(args.directory, args.max_age)
        if why:
            print(why, file=sys.stderr)
        return 1 if why else 0
    try:
        env = {**os.environ, **pod_environment(os.environ)}
    except PodError as e:
        print(f"kwf pod not started: {e}", file=sys.stderr)
        return 2
    command = engine_argv(rest)
    os.execve(command[0], command, env)  # Bytewax gets the signals (SIGTERM) itself


if __name__ == "__main__":
    sys.exit(main())
