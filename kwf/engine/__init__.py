"""The engine: the Bytewax dataflow and its Kafka I/O (sources, sink, input clock, preflight).

``python -m bytewax.run kwf.engine:engine_flow -r DIR -s 5 -b 0`` runs it from an installed kwf
(``dataflow.py`` of a checkout is the same engine). Bytewax calls ``engine_flow``, which reads
the ``KWF_*`` settings, runs the startup checks of ``kwf.engine._startup`` (the recovery
directory's lock, every process serving the same workflows, the recovery partitions) and builds
the flow; importing ``kwf.engine`` builds nothing. (``python -m bytewax.run kwf.engine`` cannot
work: Bytewax would find the submodule ``kwf.engine.flow``, not a dataflow.) The engine imports
the runtime core, never the tools (``kwf.cli``, the local broker).
"""

from __future__ import annotations

from typing import Any

from kwf.engine.flow import StartupError, build_flow, from_env, run_flow

__all__ = ["ENTRY", "StartupError", "build_flow", "engine_flow", "from_env", "run_flow"]

ENTRY = "kwf.engine:engine_flow"
"""What ``python -m bytewax.run`` is given to run the engine."""


def engine_flow() -> Any:
    """The engine's dataflow from ``KWF_*``, or ``SystemExit`` saying why it cannot start."""
    import structlog

    from kwf.config import Settings
    from kwf.engine import logs
    from kwf.engine._startup import guard, launch_from_argv
    from kwf.engine.recovery import compact, start_settler
    from kwf.engine.admin import KafkaSetupError
    from kwf.registry import Registry

    logs.capture_stderr()  # every line of the engine's stderr is a log event from here on
    try:
        flow = from_env()
        settings = Settings.from_env()
        launch = launch_from_argv()
        guard(settings, Registry(None, settings.default_workflow), launch)
        if launch is not None and launch.recovery is not None:
            compact(launch.recovery)  # before Bytewax opens it: its loader pays for every row
            start_settler(launch.recovery)  # keeps Bytewax's per-commit GC small
        return flow
    except (KafkaSetupError, StartupError) as e:
        structlog.get_logger("kwf.engine").error("engine_not_started", reason=str(e),
                                                 message=f"kwf engine not started: {e}")
        raise SystemExit(1) from None
