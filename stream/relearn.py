"""Read back the events a previous worker applied after the last model snapshot, so the models learn them again.

A restarted worker restores the models' snapshot with the Kafka offsets it covers
(:func:`models.learning.core.load_snapshot`) and resumes consuming at the group's committed offsets, usually further
on: the events in between are complete in Redis, but the in-memory models never learnt them (a redelivery would
find them duplicates). :func:`fetch_ranges` reads exactly those offsets with a plain aiokafka consumer (no group,
nothing committed); :class:`stream.handler.BatchHandler` decodes them and hands them to
:meth:`models.learning.core.LearningCore.relearn` before the partition's first batch is processed.
"""

from __future__ import annotations

import asyncio
import time

from stream.settings import Settings

__all__ = ["fetch_ranges"]


async def fetch_ranges(settings: Settings, ranges: dict[tuple[str, int], tuple[int, int]],
                       timeout_s: float = 30.0) -> dict[tuple[str, int], list[bytes]]:
    """Message values of offsets ``[start, end)`` per ``(topic, partition)``; a range not complete within
    ``timeout_s`` (retention removed it, the broker is slow) is returned as far as it was read."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    out: dict[tuple[str, int], list[bytes]] = {tp: [] for tp in ranges}
    todo = {TopicPartition(t, p): (start, end) for (t, p), (start, end) in ranges.items() if end > start}
    if not todo:
        return out
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                **settings.kafka_client_kwargs())
    await consumer.start()
    try:
        consumer.assign(list(todo))
        for tp, (start, _) in todo.items():
            consumer.seek(tp, start)
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            batch = await consumer.getmany(*todo, timeout_ms=200)
            for tp, msgs in batch.items():
                start, end = todo.get(tp, (0, 0))
                values = out[(tp.topic, tp.partition)]
                for m in msgs:
                    if start <= m.offset < end:
                        values.append(m.value)
                if msgs and msgs[-1].offset >= end - 1:
                    del todo[tp]
                    consumer.pause(tp)
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return out
