"""Topic names and specs of the contract, and their creation at start-up.

Every topic name is `<prefix>.<suffix>`. The configs topic is compacted (it holds the latest
desired state of every config); the other three are plain logs. Instances create what is
missing and refuse to start when the configs topic exists but is not compacted, because
compaction is what lets a new instance rebuild every desired state from the log.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from streams.connection import KafkaConnection

log = logging.getLogger(__name__)


class TopicMisconfigured(Exception):
    """A topic exists with a setting the contract forbids; the instance must not start."""


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str

    @property
    def configs(self) -> str:
        return f"{self.prefix}.configs"

    @property
    def task_events(self) -> str:
        return f"{self.prefix}.task-events"

    @property
    def orders(self) -> str:
        return f"{self.prefix}.orders"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.configs.dlq"

    def specs(self, *, config_partitions: int, replication_factor: int) -> list[NewTopic]:
        return [
            NewTopic(
                self.configs,
                num_partitions=config_partitions,
                replication_factor=replication_factor,
                topic_configs={"cleanup.policy": "compact"},
            ),
            NewTopic(
                self.task_events,
                num_partitions=config_partitions,
                replication_factor=replication_factor,
            ),
            NewTopic(
                self.orders,
                num_partitions=config_partitions,
                replication_factor=replication_factor,
            ),
            NewTopic(self.dlq, num_partitions=1, replication_factor=replication_factor),
        ]


async def ensure_topics(
    connection: KafkaConnection, topics: Topics, *, config_partitions: int
) -> None:
    """Create missing topics; raise TopicMisconfigured if the configs topic is not compacted."""
    admin = AIOKafkaAdminClient(**connection.client_options(), request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        replication = await replication_factor(admin)
        missing = [
            spec
            for spec in topics.specs(
                config_partitions=config_partitions, replication_factor=replication
            )
            if spec.name not in existing
        ]
        for spec in missing:
            try:
                await admin.create_topics([spec])
                log.info("created topic %s with %d partitions", spec.name, spec.num_partitions)
            except TopicAlreadyExistsError:
                pass  # another instance created it first
        await _check_compacted(admin, topics.configs)
    finally:
        await admin.close()


async def replication_factor(admin: AIOKafkaAdminClient) -> int:
    """Three copies where the cluster has three brokers, fewer on a smaller cluster."""
    cluster = await admin.describe_cluster()
    return max(1, min(3, len(cluster.get("brokers", []))))


async def _check_compacted(admin: AIOKafkaAdminClient, topic: str) -> None:
    policy = await _cleanup_policy(admin, topic)
    if "compact" not in policy.split(","):
        raise TopicMisconfigured(
            f"topic {topic} has cleanup.policy={policy!r}; it must be compacted "
            "('compact' or 'compact,delete') so that every desired state survives"
        )


async def _cleanup_policy(admin: AIOKafkaAdminClient, topic: str) -> str:
    # A topic created a moment ago may be unknown to the broker that answers for a while
    # (error code 3 with no entries): ask again rather than report an empty policy.
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={"cleanup.policy": None})
    for attempt in range(50):
        responses = await admin.describe_configs([resource])
        for response in responses:
            for error_code, _message, _type, _name, entries in response.resources:
                if error_code == 0:
                    return {entry[0]: entry[1] for entry in entries}.get("cleanup.policy", "")
        await asyncio.sleep(0.2)
    raise TopicMisconfigured(f"the broker does not describe topic {topic}'s configuration")
