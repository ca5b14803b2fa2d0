"""Rate-limit repeated log lines of the Kafka client, so a worker whose broker went away logs a bounded number.

aiokafka retries a broken connection every ``retry_backoff_ms`` (100 ms) in several loops at once (fetcher,
metadata, group coordinator, heartbeat, producer) and logs each failed try at ERROR: a worker left running while
the stack is down wrote hundreds of identical lines a minute. :class:`RepeatFilter` lets the first line of each
kind through, drops the repeats for ``window_s`` seconds and says how many it dropped on the next line of that
kind it lets through; while a kind keeps repeating, its window doubles up to ``max_window_s`` (a broker gone
for an hour costs a few lines per kind, not 120). A line's kind is its logger, level and message template
(``record.msg``, before its arguments), so "Unable connect to node with id %s: %s" is one kind whatever the node
and error.

Only the Kafka client's loggers are filtered (:func:`quiet_kafka_client`): the engine's own lines are rate-limited
where they are logged (the retry loop logs attempt 1 and every 20th), and tests read them.

>>> import logging
>>> f = RepeatFilter(window_s=30.0, clock=iter([0.0, 1.0, 2.0, 31.0, 60.0, 92.0]).__next__)
>>> rec = lambda: logging.LogRecord("aiokafka.client", logging.ERROR, "", 0, "Unable connect to %s", ("n1",), None)
>>> [f.filter(rec()) for _ in range(3)]
[True, False, False]
>>> r = rec(); f.filter(r), r.getMessage()
(True, 'Unable connect to n1 [2 more like this in the last 31s, not shown]')
>>> f.filter(rec()), f.filter(rec())  # the window is 60 s now: 92 - 31 > 60
(False, True)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

KAFKA_CLIENT_LOGGERS = ("aiokafka",)
"""Logger name prefixes :func:`quiet_kafka_client` filters."""


class RepeatFilter(logging.Filter):
    """At most one line per kind (logger, level, template) every ``window_s`` seconds; thread-safe (the consumer's
    connections log from Faust's consumer thread)."""

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 max_window_s: float = 600.0) -> None:
        super().__init__()
        self.window_s, self.max_window_s = window_s, max(window_s, max_window_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple, list] = {}  # kind -> [last line let through at, repeats dropped since, window]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is None:
                if len(self._kinds) > 1000:  # bounded memory whatever the templates
                    self._kinds.clear()
                self._kinds[kind] = [now, 0, self.window_s]
                return True
            if now - seen[0] < seen[2]:
                seen[1] += 1
                return False
            dropped, since = seen[1], now - seen[0]
            seen[0], seen[1] = now, 0
            seen[2] = min(self.max_window_s, seen[2] * 2) if dropped else self.window_s
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {since:.0f}s, not shown]"
        return True


def quiet_kafka_client(window_s: float = 30.0) -> RepeatFilter:
    """Put one :class:`RepeatFilter` on every logger of the Kafka client (call after importing it: a logger
    filter does not apply to its children, so each module's logger gets it); idempotent."""
    import aiokafka  # noqa: F401 - its modules' loggers exist once imported
    import aiokafka.consumer.fetcher  # noqa: F401
    import aiokafka.consumer.group_coordinator  # noqa: F401
    import aiokafka.producer.sender  # noqa: F401
    import aiokafka.admin  # noqa: F401

    names = [n for n in list(logging.Logger.manager.loggerDict)
             if any(n == p or n.startswith(p + ".") for p in KAFKA_CLIENT_LOGGERS)]
    flt = RepeatFilter(window_s)
    for name in names:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RepeatFilter)]:
            logger.removeFilter(old)
        logger.addFilter(flt)
    return flt
