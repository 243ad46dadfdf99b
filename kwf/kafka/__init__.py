"""Kafka plumbing for kwf: the local development broker and topic administration."""

from kwf.engine.admin import (
    KafkaSetupError,
    check_brokers,
    create_topics,
    ensure_topics,
    required_topics,
    workflow_output_topics,
)
from kwf.kafka.broker import KAFKA_VERSION, BrokerError, BrokerStatus, LocalBroker

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "BrokerStatus",
    "KafkaSetupError",
    "LocalBroker",
    "check_brokers",
    "create_topics",
    "ensure_topics",
    "required_topics",
    "workflow_output_topics",
]
