"""Topic administration and preflight checks, so a misconfiguration fails fast with advice.

The engine runs with ``auto.create.topics.enable=false`` (a typo in a topic name must not
silently create a topic), so every topic is created up front by ``kwf topics create`` and checked
before the dataflow starts. Without the check, a missing topic or an unreachable broker shows up
as librdkafka retrying forever in the background.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import structlog
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic  # type: ignore[attr-defined]  # exported, not declared

from kwf.config import Settings

log = structlog.get_logger(__name__)

START_HINT = (
    "start the local broker with `kwf kafka start`, or point KWF_BROKERS at a running cluster"
)


class KafkaSetupError(RuntimeError):
    """Kafka is not usable as configured; the message says what to do about it."""


class _Admin:
    """An AdminClient that keeps librdkafka's errors for our messages instead of printing them."""

    def __init__(self, conf: Mapping[str, str]) -> None:
        self.servers = conf.get("bootstrap.servers", "?")
        self._errors: list[str] = []
        settings = {"log_level": 0, **conf, "error_cb": self._on_error}
        try:
            self.client = AdminClient(settings)  # type: ignore[arg-type]  # stubs omit callbacks
        except KafkaException as exc:  # a TLS file librdkafka cannot read, an unknown setting
            msg = (f"cannot set up a Kafka client for {self.servers}: {exc.args[0].str()}; check "
                   "the KWF_KAFKA_* settings (or KWF_KAFKA_PROPERTIES)")
            raise KafkaSetupError(msg) from exc

    def _on_error(self, err: KafkaError) -> None:
        if err.code() != KafkaError._ALL_BROKERS_DOWN and err.str() not in self._errors:
            self._errors.append(err.str())

    def metadata(self, timeout: float) -> ClusterMetadata:
        """Cluster metadata, or ``KafkaSetupError`` saying how to get a broker."""
        try:
            return self.client.list_topics(timeout=max(timeout, 0.1))
        except KafkaException as exc:
            self.client.poll(0)  # serves error_cb: the reason (refused, DNS, TLS, auth...)
            reason = "; ".join(self._errors[:2]) or exc.args[0].str()
            msg = f"Kafka at {self.servers} is unreachable within {timeout:g} s ({reason})"
            msg += f": {_hint(reason)}"
            raise KafkaSetupError(msg) from exc


def _hint(reason: str) -> str:
    """What to do about a failed connection: a refused login or TLS handshake is not a broker
    that is down, and starting a local broker would not help."""
    if "SASL" in reason or "Authentication" in reason or "authentication" in reason:
        return ("the brokers refused the SASL login: check KWF_KAFKA_SECURITY_PROTOCOL, "
                "KWF_KAFKA_SASL_MECHANISM, KWF_KAFKA_SASL_USERNAME and KWF_KAFKA_SASL_PASSWORD "
                "(the Secret in Kubernetes) against the listener's settings")
    if "SSL" in reason or "certificate" in reason:
        return ("the TLS handshake failed: check KWF_KAFKA_SECURITY_PROTOCOL, that the "
                "listener speaks TLS, and KWF_KAFKA_SSL_CA_LOCATION (the CA that signed it)")
    return START_HINT


def check_brokers(conf: Mapping[str, str], topics: Iterable[str], timeout: float = 10.0) -> None:
    """Raise ``KafkaSetupError`` in ``timeout`` s if the brokers or any of ``topics`` is missing."""
    admin = _Admin(conf)
    md = admin.metadata(timeout)
    missing = sorted(set(topics) - set(md.topics))
    if missing:
        msg = (
            f"topics missing on {admin.servers}: {', '.join(missing)}; create them with "
            "`kwf topics create` (topics are never auto-created)"
        )
        raise KafkaSetupError(msg)
    log.debug("kafka.checked", servers=admin.servers, topics=len(set(topics)))


def create_topics(
    conf: Mapping[str, str],
    topics: Iterable[str],
    partitions: int,
    replication: int,
    compacted: Iterable[str] = frozenset(),
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet and return their names; existing ones are kept.

    Idempotent, so it is safe in every start script. Topics in ``compacted`` get
    ``cleanup.policy=compact`` (the workflow-events topic keeps only the latest record per thread).
    Existing topics are not altered. Returns once the new topics have leaders, so a producer
    started right after does not see ``UNKNOWN_TOPIC_OR_PART``.
    """
    wanted = list(dict.fromkeys(topics))
    compact = set(compacted)
    deadline = time.monotonic() + timeout
    admin = _Admin(conf)
    existing = set(admin.metadata(timeout).topics)
    new = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=replication,
            config={"cleanup.policy": "compact"} if name in compact else {},
        )
        for name in wanted
        if name not in existing
    ]
    if not new:
        return []
    futures = admin.client.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    created, failures = [], []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:  # a concurrent creator won
                failures.append(f"{name}: {err.str()}")
    if failures:
        msg = (
            f"could not create topics on {admin.servers}: {'; '.join(failures)}. Check that "
            f"--replication ({replication}) is at most the number of brokers (1 for "
            "`kwf kafka start`) and that this client may create topics"
        )
        raise KafkaSetupError(msg)
    _wait_for_leaders(admin, created, deadline)
    log.info("kafka.topics_created", servers=admin.servers, topics=created)
    return created


def _wait_for_leaders(admin: _Admin, topics: list[str], deadline: float) -> None:
    while True:
        md = admin.metadata(max(deadline - time.monotonic(), 1.0))
        pending = [
            t
            for t in topics
            if t not in md.topics
            or md.topics[t].error is not None
            or any(p.leader < 0 for p in md.topics[t].partitions.values())
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            msg = (
                f"topics created on {admin.servers} but without a leader yet: {', '.join(pending)}"
            )
            raise KafkaSetupError(msg)
        time.sleep(0.1)


def workflow_output_topics(settings: Settings) -> set[str]:
    """The topics the configured workflow modules write to (``kwf.config.output_topics``).

    Workflow modules declare them on import, so the modules are imported first.
    """
    from kwf import config
    from kwf.registry import load_modules

    load_modules(settings.workflows)
    return set(config.output_topics)


def required_topics(settings: Settings, with_outputs: bool = True) -> list[str]:
    """Every topic kwf needs: the engine's own, then the workflows' output topics (sorted)."""
    outputs = workflow_output_topics(settings) if with_outputs else set()
    engine = list(settings.engine_topics)
    return engine + sorted(outputs - set(engine))


def ensure_topics(
    settings: Settings,
    partitions: int | None = None,
    replication: int | None = None,
    with_outputs: bool = True,
    timeout: float = 30.0,
) -> list[str]:
    """Create every topic kwf needs (idempotent); what ``kwf topics create`` runs."""
    return create_topics(
        settings.kafka_config(),
        required_topics(settings, with_outputs),
        partitions or settings.partitions,
        replication or settings.replication,
        compacted={settings.events_topic},
        timeout=timeout,
    )
