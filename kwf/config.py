"""Settings: the workflow-level topic declarations and the engine's environment.

Two kinds of configuration live here. Workflow modules declare the topics they write to by
mutating the module-level ``output_topics`` set (the seed's ``W.config.outputTopics``), so that
``kwf.config.output_topics |= {"saga-reserve-car"}`` reads as it does in the seed. The engine's
own settings come from ``KWF_*`` environment variables, read once into a frozen ``Settings``;
nothing here talks to Kafka.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

output_topics: set[str] = set()
"""Topics workflow code may write to with ``kwf.output``; workflow modules add to it on import."""

ENGINE_GC_THRESHOLDS = (50_000, 20, 100)
"""What the engine process sets with ``gc.set_threshold``: it holds many long-lived objects
(live coroutines, tasks, futures) that the default thresholds traverse over and over; bench/core.py
measures the difference."""


class KafkaSettingsError(ValueError):
    """A Kafka setting names a file that is not there (a CA, a key); the message names it."""


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    """The engine's settings; every field has an environment variable ``KWF_<FIELD>``.

    Defaults are those of the seed's protocol (DESIGN section 4), so that a seed producer or
    consumer talks to kwf unchanged.
    """

    brokers: str = "127.0.0.1:9092"
    workflows: tuple[str, ...] = ()
    """Modules that register the workflows served; required by the engine (no default, so a
    forgotten setting never serves something else). ``kwf up`` and the demo name the examples."""
    default_workflow: str | None = None
    resume_topic: str = "workflow-resume"
    scheduler_topic: str = "workflow-scheduler"
    result_topic: str = "workflow-result"
    error_topic: str = "workflow-error"
    events_topic: str = "workflow-events"
    dlq_topic: str = "workflow-dlq"
    max_payload_bytes: int = 900_000
    """Under Kafka's default 1 MB message limit, leaving room for the key and headers."""
    max_live: int = 10_000
    tombstone_retention_s: float = 7 * 24 * 3600.0
    journal_warn_events: int = 10_000
    """A thread whose journal reaches this many events is logged (once) and counted."""
    max_journal_events: int = 50_000
    """A thread whose journal would exceed this fails: it should ``kwf.continue_as_new``."""
    batch_size: int = 500
    """The most Kafka records one input partition hands out at a time: bigger batches cost less
    per record under a backlog. While a timer is near, batches are at most 50
    (``kwf.engine.source.NEAR_TIMER_BATCH``): a due timer waits for the batch in hand."""
    kafka_properties: Path | None = None
    partitions: int = 3
    replication: int = 1
    recovery_partitions: int = 0
    """Recovery partitions the engine creates when its cluster has none (``kwf run``, the pods);
    fixed at the first start. 0: create them beforehand with ``python -m bytewax.recovery``."""
    cluster_timeout_s: float = 120.0
    """How long a process waits for its peers' startup check before it gives up (and restarts)."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """librdkafka settings from ``KWF_KAFKA_<SETTING>`` variables (see ``kafka_env``)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``KWF_*`` variables; unset ones keep their defaults."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"KWF_{f.name.upper()}")
            if raw is None or f.name == "extra":
                continue
            default = getattr(cls, f.name, None)
            if f.name == "workflows":
                values[f.name] = _split(raw)
            elif f.name == "kafka_properties":
                values[f.name] = Path(raw) if raw else None
            elif f.name == "default_workflow":
                values[f.name] = raw or None
            elif isinstance(default, bool):
                values[f.name] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        values["extra"] = kafka_env(env)
        return cls(**values)  # type: ignore[arg-type]

    def kafka_config(self) -> dict[str, str]:
        """librdkafka settings: ``bootstrap.servers``, the optional properties file, then the
        ``KWF_KAFKA_<SETTING>`` variables (which win: a Kubernetes Secret maps onto them).

        Raises ``KafkaSettingsError`` naming the variable when a file librdkafka would open is missing
        (a CA, a key, a keystore), instead of librdkafka's error from deep inside a client.
        """
        conf = {"bootstrap.servers": self.brokers}
        if self.kafka_properties is not None:
            conf.update(read_properties(self.kafka_properties))
        conf.update(self.extra)
        for key, value in conf.items():
            if key.endswith(".location") and value and not Path(value).exists():
                origin = (f"KWF_KAFKA_{key.upper().replace('.', '_')}" if key in self.extra
                          else f"{key} in {self.kafka_properties}")
                msg = (f"{origin}={value}: no such file; mount it (a Secret volume in Kubernetes) "
                       "or fix the path")
                raise KafkaSettingsError(msg)
        return conf

    @property
    def engine_topics(self) -> tuple[str, ...]:
        """The topics the engine itself reads or writes, whatever the workflows."""
        return (
            self.resume_topic,
            self.scheduler_topic,
            self.result_topic,
            self.error_topic,
            self.events_topic,
            self.dlq_topic,
        )


KAFKA_ENV_PREFIX = "KWF_KAFKA_"
_NOT_KAFKA = {"KWF_KAFKA_PROPERTIES", "KWF_KAFKA_HOME", "KWF_KAFKA_CACHE"}
"""``KWF_KAFKA_*`` variables that are kwf's own: the properties file, the local broker's home
and cache."""


def kafka_env(env: Mapping[str, str]) -> dict[str, str]:
    """librdkafka settings from ``KWF_KAFKA_<SETTING>``: lower case, ``_`` becomes ``.``.

    ``KWF_KAFKA_SASL_PASSWORD`` -> ``sasl.password``, ``KWF_KAFKA_SECURITY_PROTOCOL`` ->
    ``security.protocol``, ``KWF_KAFKA_SSL_CA_LOCATION`` -> ``ssl.ca.location``. librdkafka's
    setting names have no underscores, so the mapping is one to one.

    >>> kafka_env({"KWF_KAFKA_SASL_MECHANISM": "PLAIN", "KWF_KAFKA_PROPERTIES": "x", "HOME": "/"})
    {'sasl.mechanism': 'PLAIN'}
    """
    return {name[len(KAFKA_ENV_PREFIX):].lower().replace("_", "."): value
            for name, value in sorted(env.items())
            if name.startswith(KAFKA_ENV_PREFIX) and name not in _NOT_KAFKA and value != ""}


def read_properties(path: Path) -> dict[str, str]:
    """Parse a Java-style ``key=value`` properties file (``#``/``!`` comments, ``:`` also ok)."""
    conf: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        sep = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if sep < 0:
            msg = f"{path}:{lineno}: expected key=value, got {line!r}"
            raise ValueError(msg)
        conf[line[:sep].strip()] = line[sep + 1 :].strip()
    return conf
