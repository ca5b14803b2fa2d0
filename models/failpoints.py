"""Crash points: a worker armed with ``PROMO_FAILPOINT=<point>:<n>`` kills itself the n-th time it passes a point.

The crash tests use them to ``kill -9`` a worker exactly inside each window of a batch's life, which killing it
from outside at random moments hits only by chance (an idle worker is almost always killed between batches).
Unarmed (the default, and in production) :func:`hit` costs one attribute test.

The points, in the order one batch passes them (:data:`POINTS`): a batch's budgets reserved, its users'
commits in Redis, its decisions on the broker, the decisions marked as sent, and the models taught (offsets not
yet acknowledged). A point is counted only when the batch has something for that window: a reservation, a
committed or sent decision, new events.

Examples
--------
>>> fp = Failpoints("sent:2", action=lambda point: print(f"killed at {point}"))
>>> fp.hit("committed")
>>> fp.hit("sent")
>>> fp.hit("sent")
killed at sent
>>> Failpoints("").armed
False
>>> Failpoints("comitted:1")
Traceback (most recent call last):
...
ValueError: PROMO_FAILPOINT='comitted:1': unknown point 'comitted'; points: reserved, committed, sent, marked, learnt
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

log = logging.getLogger("promo.failpoints")

POINTS = {
    "reserved": "the batch's budget reservations are in Redis, nothing of it is committed",
    "committed": "the users' commits (markers, profiles, decisions) are in Redis, no decision is sent",
    "sent": "the decisions are on the broker and not yet marked as sent",
    "marked": "the decisions are marked as sent; item contributions still parked, the models not taught",
    "learnt": "everything of the batch is applied; its offsets are not yet acknowledged",
}


def _sigkill(point: str) -> None:
    log.warning("failpoint %r reached (PROMO_FAILPOINT): killing this worker with SIGKILL", point)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Failpoints:
    """``spec`` is ``""`` (unarmed) or ``"<point>:<n>"``: ``action(point)`` runs at the n-th :meth:`hit` of it."""

    def __init__(self, spec: str = "", action: Callable[[str], None] = _sigkill) -> None:
        self.point, self.remaining, self.action = "", 0, action
        if not spec:
            return
        name, _, n = spec.partition(":")
        if name not in POINTS:
            raise ValueError(f"PROMO_FAILPOINT={spec!r}: unknown point {name!r}; points: {', '.join(POINTS)}")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"PROMO_FAILPOINT={spec!r}: the count after ':' must be a whole number >= 1")
        self.point, self.remaining = name, int(n)

    @property
    def armed(self) -> bool:
        return self.remaining > 0

    def hit(self, point: str) -> None:
        if self.remaining and point == self.point:
            self.remaining -= 1
            if not self.remaining:
                self.action(point)


_ACTIVE = Failpoints()


def arm(spec: str) -> None:
    """Arm this process (the worker, from ``Settings.failpoint``); ``""`` disarms."""
    global _ACTIVE
    _ACTIVE = Failpoints(spec)
    if _ACTIVE.armed:
        log.warning("failpoint armed: this worker kills itself at the %d-th pass of %r (%s)",
                    _ACTIVE.remaining, _ACTIVE.point, POINTS[_ACTIVE.point])


def hit(point: str) -> None:
    """Pass ``point`` (a name of :data:`POINTS`); kills the process if it is armed for this pass."""
    if _ACTIVE.remaining:
        _ACTIVE.hit(point)
