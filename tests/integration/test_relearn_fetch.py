"""stream.relearn.fetch_ranges on the real embedded broker: exactly the requested offsets come back."""

from __future__ import annotations

import asyncio

import pytest

from stream.relearn import fetch_ranges
from tests.helpers import consume_all, produce_raw

pytestmark = pytest.mark.integration


def test_fetch_ranges_reads_exactly_the_missing_offsets(engine_settings):
    s = engine_settings
    produce_raw(s, s.topic_events, [(b"same-key", f"m{i}".encode()) for i in range(12)])
    msgs = consume_all(s, s.topic_events, lambda ms: len(ms) >= 12, timeout=30)
    (partition,) = {m.partition for m in msgs}
    offsets = {m.value: m.offset for m in msgs}
    start, end = offsets[b"m3"], offsets[b"m9"]
    got = asyncio.run(fetch_ranges(s, {(s.topic_events, partition): (start, end),
                                       (s.topic_events, (partition + 1) % s.partitions): (0, 0)}, timeout_s=20))
    assert got[(s.topic_events, partition)] == [f"m{i}".encode() for i in range(3, 9)]
    assert got[(s.topic_events, (partition + 1) % s.partitions)] == []
