"""Create the engine's topics up front with the configured partition count and retention.

The embedded broker cannot add partitions later and auto-creates topics with 4, so every process that needs the
topics (``promo stack up``, the worker at start, tests) calls :func:`ensure_topics` first.

Retention (``retention.ms``) is set when a topic is created: ``PROMO_EVENTS_RETENTION_S`` (7 days) for the events,
decisions and forget topics, which all carry user ids, and ``PROMO_DLQ_RETENTION_S`` (30 days) for the DLQ (time
to inspect and replay). A topic that exists already keeps its configuration (change it with the broker's tools);
:func:`topic_retention` reads what the broker reports.
"""

from __future__ import annotations

import asyncio

from stream.settings import Settings


async def ensure_topics_async(settings: Settings, topics: list[str] | None = None, timeout_s: float = 20.0) -> dict:
    """Create missing topics; return ``{topic: partitions}`` as the broker reports them afterwards."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    topics = topics or settings.all_topics
    admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout_s * 1000), **settings.kafka_client_kwargs())
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            new = [NewTopic(t, settings.partitions, settings.replication_factor,
                            topic_configs={"retention.ms": str(settings.topic_retention_ms(t))}) for t in missing]
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: fine
        described = await admin.describe_topics(topics)
        return {d["topic"]: len(d["partitions"]) for d in described}
    finally:
        await admin.close()


def ensure_topics(settings: Settings, topics: list[str] | None = None, timeout_s: float = 20.0) -> dict:
    return asyncio.run(ensure_topics_async(settings, topics, timeout_s))


async def topic_retention_async(settings: Settings, topics: list[str] | None = None, timeout_s: float = 20.0) -> dict:
    """``{topic: retention.ms}`` as the broker describes the topics (``None`` where it reports none)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    topics = topics or settings.all_topics
    admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout_s * 1000), **settings.kafka_client_kwargs())
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        out: dict = {t: None for t in topics}
        for resp in await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]):
            for _err, _msg, _rtype, name, entries in resp.resources:
                for entry in entries:
                    if entry[0] == "retention.ms" and entry[1] is not None:
                        out[name] = int(entry[1])
        return out
    finally:
        await admin.close()


def topic_retention(settings: Settings, topics: list[str] | None = None, timeout_s: float = 20.0) -> dict:
    return asyncio.run(topic_retention_async(settings, topics, timeout_s))
