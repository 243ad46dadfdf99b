"""The engine: the Bytewax dataflow and its Kafka I/O (sources, sink, input clock, preflight).

``python -m bytewax.run kwf.engine -r DIR -s 5 -b 0`` runs it from an installed kwf: Bytewax
looks up ``kwf.engine.flow``, which is built on first access from the ``KWF_*`` settings (so
that importing ``kwf.engine.sink`` or ``kwf.engine.flow`` builds nothing). The engine imports the
runtime core, never the tools (``kwf.cli``, the local broker).
"""

from __future__ import annotations

from typing import Any

from kwf.engine.flow import StartupError, build_flow, from_env, run_flow

__all__ = ["StartupError", "build_flow", "engine_flow", "from_env", "run_flow"]


def engine_flow() -> Any:
    """The engine's dataflow from ``KWF_*``, or ``SystemExit`` saying why it cannot start."""
    import structlog

    from kwf.engine import logs
    from kwf.engine.admin import KafkaSetupError

    logs.capture_stderr()  # every line of the engine's stderr is a log event from here on
    try:
        return from_env()
    except (KafkaSetupError, StartupError) as e:
        structlog.get_logger("kwf.engine").error("engine_not_started", reason=str(e),
                                                 message=f"kwf engine not started: {e}")
        raise SystemExit(1) from None


def __getattr__(name: str) -> Any:
    if name == "flow":  # what `python -m bytewax.run kwf.engine` asks for
        return engine_flow()
    msg = f"module 'kwf.engine' has no attribute {name!r}"
    raise AttributeError(msg)
