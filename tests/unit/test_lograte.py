"""The Kafka client's repeated lines are rate-limited (stream.lograte): a worker whose broker is gone logs a few
lines per kind, not one per retry (every 100 ms, in several loops)."""

from __future__ import annotations

import logging

from stream.lograte import RepeatFilter, quiet_kafka_client


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_every_kafka_client_logger_is_filtered_once_and_repeats_are_summarised():
    quiet_kafka_client()
    flt = quiet_kafka_client()  # idempotent: one filter per logger, the newest
    for name in ("aiokafka", "aiokafka.conn", "aiokafka.consumer.fetcher", "aiokafka.consumer.group_coordinator"):
        filters = [f for f in logging.getLogger(name).filters if isinstance(f, RepeatFilter)]
        assert filters == [flt], name
    logger = logging.getLogger("aiokafka.consumer.group_coordinator")
    out = _Collect()
    logger.addHandler(out)
    try:
        for i in range(500):
            logger.error("Group Coordinator Request failed: %s", f"NodeNotReadyError {i}")
        logger.error("Heartbeat send request failed: %s", "x")  # another kind passes
    finally:
        logger.removeHandler(out)
        for name in list(logging.Logger.manager.loggerDict):
            if name.startswith("aiokafka"):
                logging.getLogger(name).removeFilter(flt)
    assert out.lines == ["Group Coordinator Request failed: NodeNotReadyError 0", "Heartbeat send request failed: x"]


def test_the_summary_counts_what_was_dropped_and_the_window_backs_off_then_resets():
    now = [0.0]
    f = RepeatFilter(window_s=10.0, max_window_s=40.0, clock=lambda: now[0])

    def line(at: float) -> str | None:
        now[0] = at
        r = logging.LogRecord("aiokafka", logging.ERROR, "", 0, "down %s", ("n",), None)
        return r.getMessage() if f.filter(r) else None

    assert line(0) == "down n"
    assert line(5) is None
    assert line(10) == "down n [1 more like this in the last 10s, not shown]"  # window 20 s from here
    assert line(20) is None
    assert line(30) == "down n [1 more like this in the last 20s, not shown]"  # 40 s (the cap)
    assert line(69) is None
    assert line(70) == "down n [1 more like this in the last 40s, not shown]"
    assert line(200) == "down n"  # quiet for a window: nothing dropped, back to 10 s
    assert line(205) is None
    assert line(210) is not None
