"""Create the engine's topics up front with the configured partition count.

The embedded broker cannot add partitions later and auto-creates topics with 4, so every process that needs the
topics (``promo stack up``, the worker at start, tests) calls :func:`ensure_topics` first.
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
            new = [NewTopic(t, settings.partitions, settings.replication_factor) for t in missing]
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
