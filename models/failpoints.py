"""Crash points and injected faults, for tests: ``PROMO_FAILPOINT=<point>:<n>[*<times>]``.

The crash tests use the **kill points** (:data:`POINTS`) to ``kill -9`` a worker exactly inside each window of a
batch's life, which killing it from outside at random moments hits only by chance (an idle worker is almost
always killed between batches): the worker kills itself the n-th time it passes the point.

The fault tests use the **fault points** (:data:`FAULTS`) to make one operation fail as the infrastructure would:
from its n-th pass on, ``times`` passes in a row (default 1) fail, and the worker must retry them.

Unarmed (the default, and in production) :func:`hit` and :func:`fault` cost one attribute test.

The kill points, in the order one batch passes them: a batch's budgets reserved, its users' commits in Redis,
its decisions on the broker, the decisions marked as sent, and the models taught (offsets not yet acknowledged).
A point is counted only when the batch has something for that window: a reservation, a committed or sent
decision, new events.

Examples
--------
>>> fp = Failpoints("sent:2", action=lambda point: print(f"killed at {point}"))
>>> fp.hit("committed")
>>> fp.hit("sent")
>>> fp.hit("sent")
killed at sent
>>> Failpoints("").armed
False
>>> ack = Failpoints("decision_ack:2*2")
>>> [ack.fault("decision_ack") for _ in range(5)]
[False, True, True, False, False]
>>> Failpoints("comitted:1")
Traceback (most recent call last):
...
ValueError: PROMO_FAILPOINT='comitted:1': unknown point 'comitted'; points: reserved, committed, sent, marked, learnt, timer_committed, timer_sent, decision_ack, bug
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
    "sent": "the decisions are on the broker; stale reservations of their ids not released, not marked as sent",
    "marked": "the decisions are marked as sent; item contributions still parked, the models not taught",
    "learnt": "everything of the batch is applied; its offsets are not yet acknowledged",
    "timer_committed": "the sweep's commits with timer-fired decisions are in Redis, no decision of them is sent",
    "timer_sent": "the sweep's timer-fired decisions are on the broker, not marked as sent",
}

FAULTS = {
    "decision_ack": "the broker's acknowledgement of a decision fails (KafkaTimeoutError), as when the broker is "
                    "slow or gone",
    "bug": "a bug: RuntimeError after a batch's users' commits, before its decisions are sent (the worker must "
           "stop without acknowledging the batch)",
}


def _sigkill(point: str) -> None:
    log.warning("failpoint %r reached (PROMO_FAILPOINT): killing this worker with SIGKILL", point)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Failpoints:
    """``spec`` is ``""`` (unarmed) or ``"<point>:<n>[*<times>]"``: at a kill point ``action(point)`` runs at the
    n-th :meth:`hit`; at a fault point :meth:`fault` answers True from its n-th pass, ``times`` passes in a row."""

    def __init__(self, spec: str = "", action: Callable[[str], None] = _sigkill) -> None:
        self.point, self.remaining, self.times, self.action = "", 0, 0, action
        if not spec:
            return
        name, _, n = spec.partition(":")
        if name not in POINTS and name not in FAULTS:
            raise ValueError(f"PROMO_FAILPOINT={spec!r}: unknown point {name!r}; points: "
                             f"{', '.join([*POINTS, *FAULTS])}")
        n, _, times = n.partition("*")
        if not n.isdigit() or int(n) < 1 or (times and (not times.isdigit() or int(times) < 1)):
            raise ValueError(f"PROMO_FAILPOINT={spec!r}: expected <point>:<n>[*<times>] with whole numbers >= 1")
        if times and name in POINTS:
            raise ValueError(f"PROMO_FAILPOINT={spec!r}: *<times> is for fault points ({', '.join(FAULTS)})")
        self.point, self.remaining, self.times = name, int(n), int(times or 1)

    @property
    def armed(self) -> bool:
        return self.remaining > 0 or self.times > 0 and self.point in FAULTS

    def hit(self, point: str) -> None:
        if self.remaining and point == self.point:
            self.remaining -= 1
            if not self.remaining:
                self.action(point)

    def fault(self, point: str) -> bool:
        """True when this pass of fault point ``point`` must fail."""
        if point != self.point or not self.times:
            return False
        if self.remaining > 1:
            self.remaining -= 1
            return False
        self.remaining = 0
        self.times -= 1
        return True


_ACTIVE = Failpoints()


def arm(spec: str) -> None:
    """Arm this process (the worker, from ``Settings.failpoint``); ``""`` disarms."""
    global _ACTIVE
    _ACTIVE = Failpoints(spec)
    if _ACTIVE.armed and _ACTIVE.point in POINTS:
        log.warning("failpoint armed: this worker kills itself at the %d-th pass of %r (%s)",
                    _ACTIVE.remaining, _ACTIVE.point, POINTS[_ACTIVE.point])
    elif _ACTIVE.armed:
        log.warning("failpoint armed: from the %d-th pass of %r, %d in a row fail (%s)",
                    _ACTIVE.remaining, _ACTIVE.point, _ACTIVE.times, FAULTS[_ACTIVE.point])


def hit(point: str) -> None:
    """Pass ``point`` (a name of :data:`POINTS`); kills the process if it is armed for this pass."""
    if _ACTIVE.remaining:
        _ACTIVE.hit(point)


def fault(point: str) -> bool:
    """Pass fault point ``point`` (a name of :data:`FAULTS`); True when this pass must fail."""
    return _ACTIVE.times > 0 and _ACTIVE.fault(point)
