"""The kwf engine, for ``python -m bytewax.run dataflow -r <dir> -s <snapshot s> -b <backup s>``.

Configuration comes from ``KWF_*`` environment variables (see ``kwf.config.Settings``). Before
the flow is built, the brokers and every topic are checked with a timeout: Bytewax's Kafka
source would otherwise hang for ever on an unreachable broker. Launch through ``bytewax.run``
only: snapshots are stored by step id, and the engine's own are plain bytes.
"""

from __future__ import annotations

import structlog

from kwf.flow import StartupError, from_env
from kwf.kafka.admin import KafkaSetupError

try:
    flow = from_env()
except (KafkaSetupError, StartupError) as e:
    structlog.get_logger("kwf.engine").error("engine_not_started", reason=str(e))
    raise SystemExit(f"kwf engine not started: {e}") from None
