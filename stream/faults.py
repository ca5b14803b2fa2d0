"""The worker's error policy: every exception in the batch loop has a class, and every class a verdict.

Three verdicts (in the spirit of Quix Streams' error callbacks, which decide "suppress or stop", and Arroyo's
``dlq.py``, which dead-letters only what is wrong with the message):

* :attr:`Verdict.RETRY` - a **transient infrastructure error**: Redis or Kafka is down, slow, full, busy,
  loading or read-only. The message is fine; the world is not. The batch step is retried with back-off while
  ``/readyz`` answers 503 naming the component, and ``promo_transient_errors_total{component,kind}`` counts it.
  Nothing is acknowledged meanwhile, and nothing is dead-lettered.
* :attr:`Verdict.DEAD_LETTER` - an error that is **deterministic for one event**: the event fails again when it
  is applied alone against a healthy store. Only the batch handler can establish that (it retries the batch
  event by event, :meth:`stream.handler.BatchHandler.handle`); :func:`classify_fault` never returns it.
* :attr:`Verdict.STOP` - **anything else**: a bug, a misconfiguration (wrong Redis password, a record the broker
  refuses as too large, a path or permission the file system refuses; a topic that does not exist stops the worker
  at start, while a partition missing from the metadata for a moment is retried), a broker that lost its log, lost
  Redis state, a dead-letter rate above its limit (:class:`DlqLimit`). The worker process stops with one line on
  stderr and a non-zero exit, without acknowledging the batch in hand, so the consumer group redelivers it to a
  fresh worker (:class:`WorkerStop` carries the line).

Examples
--------
>>> import redis.exceptions as rex
>>> classify_fault(rex.ConnectionError("Connection refused"))
Fault(verdict='retry', component='redis', kind='connection')
>>> classify_fault(rex.ResponseError("Error running script (call to f_1): @user_script:1: @user_script: 1: "
...                                  "-OOM command not allowed when used memory > 'maxmemory'."))
Fault(verdict='retry', component='redis', kind='oom')
>>> classify_fault(rex.ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL"))
Fault(verdict='retry', component='redis', kind='busy')
>>> classify_fault(rex.AuthenticationError("invalid username-password pair"))
Fault(verdict='stop', component='redis', kind='auth')
>>> classify_fault(rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
Fault(verdict='stop', component='redis', kind='error')
>>> import aiokafka.errors as kex
>>> classify_fault(kex.KafkaTimeoutError())
Fault(verdict='retry', component='kafka', kind='timeout')
>>> classify_fault(kex.RecordTooLargeError())
Fault(verdict='stop', component='kafka', kind='error')
>>> classify_fault(KeyError("segment"))
Fault(verdict='stop', component=None, kind='error')
>>> classify_fault(OSError("Multiple exceptions: [Errno 111] Connect call failed ('127.0.0.1', 6379)"))
Fault(verdict='retry', component=None, kind='connection')
>>> classify_fault(PermissionError(13, "Permission denied", "/data/promo")).verdict
'stop'
"""

from __future__ import annotations

import asyncio
import errno
import re
from collections import deque
from dataclasses import dataclass
from enum import Enum

import aiokafka.errors as kex
import redis.exceptions as rex

from models.learning.snapshot import ForgetsKeptLanding


class Verdict(str, Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    STOP = "stop"

    def __repr__(self) -> str:  # 'retry', not <Verdict.RETRY: 'retry'>, in docs and messages
        return repr(self.value)


COMPONENTS: tuple[str, ...] = ("redis", "kafka")
"""What a transient error can be about; ``/readyz`` reports each (the ``component`` metric label)."""

KINDS: tuple[str, ...] = (
    "connection", "timeout", "oom", "busy", "loading", "readonly", "tryagain", "masterdown", "misconf",
    "noreplicas", "not_leader", "unknown_topic", "retriable",
)
"""Every ``kind`` label of ``promo_transient_errors_total`` (fixed: metric label values)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """What an exception means for the worker: the verdict, the component at fault, and a short kind label."""

    verdict: Verdict
    component: str | None  # "redis" | "kafka" | None
    kind: str  # one of KINDS for RETRY; "auth", "error" otherwise

    def __repr__(self) -> str:
        return f"Fault(verdict={self.verdict!r}, component={self.component!r}, kind={self.kind!r})"


class WorkerStop(Exception):
    """Stop the worker process: the message is the one line an operator reads (what happened, to which input,
    what to do). Raised for conditions no retry can fix (a broker that lost its log, lost Redis state, a
    dead-letter rate above its limit); the worker exits non-zero without acknowledging the batch in hand."""


# Redis error replies that mean "not now" (the server is full, busy with a script, loading its data set,
# a read-only replica, failing over, or refusing writes after a failed save). They can come back as the
# reply's first word ("BUSY ...") or, when a command inside a Lua script failed, after a dash inside the
# script's error text ("... @user_script: 12: -OOM command not allowed ...").
_REDIS_TRANSIENT_CODES = {
    "OOM": "oom", "BUSY": "busy", "LOADING": "loading", "READONLY": "readonly", "TRYAGAIN": "tryagain",
    "MASTERDOWN": "masterdown", "CLUSTERDOWN": "masterdown", "MISCONF": "misconf", "NOREPLICAS": "noreplicas",
}
_REDIS_CODE_IN_TEXT = re.compile(r"(?:^|-|\s)(" + "|".join(_REDIS_TRANSIENT_CODES) + r")\b")
_REDIS_CLASS_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (rex.OutOfMemoryError, "oom"),
    (rex.BusyLoadingError, "loading"),
    (rex.ReadOnlyError, "readonly"),
    (rex.TryAgainError, "tryagain"),
    (rex.ClusterDownError, "masterdown"),
)

_KAFKA_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (kex.KafkaTimeoutError, "timeout"),
    (kex.RequestTimedOutError, "timeout"),
    (kex.KafkaConnectionError, "connection"),
    (kex.NodeNotReadyError, "connection"),
    (kex.NoBrokersAvailable, "connection"),
    (kex.BrokerNotAvailableError, "connection"),  # a broker restarting (not marked retriable by aiokafka)
    (kex.NotLeaderForPartitionError, "not_leader"),
    (kex.LeaderNotAvailableError, "not_leader"),
    (kex.UnknownTopicOrPartitionError, "unknown_topic"),
)


_LOCAL_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                           errno.EROFS, errno.ENAMETOOLONG})
"""``OSError`` numbers of a file system's answer, not a network's: a misconfiguration (a path, a permission) that a
retry cannot fix, so the worker stops. Every other ``OSError`` (refused, reset, unreachable, a DNS failure, the
``Multiple exceptions`` of asyncio's connect, a full disk) is retried."""


def _cause(exc: BaseException) -> BaseException:
    """The Kafka error under Faust's ``ProducerSendError`` wrapper (raised ``from`` it)."""
    from faust.exceptions import ProducerSendError

    if isinstance(exc, ProducerSendError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def classify_fault(exc: BaseException) -> Fault:
    """The verdict for an exception raised by a step of the batch loop (see the module docstring)."""
    exc = _cause(exc)
    if isinstance(exc, rex.RedisError):
        return _redis_fault(exc)
    if isinstance(exc, ForgetsKeptLanding):  # the snapshot's write lost to forgets each time: Redis' "try again"
        return Fault(Verdict.RETRY, "redis", "tryagain")
    if isinstance(exc, kex.KafkaError):
        for cls, kind in _KAFKA_KINDS:
            if isinstance(exc, cls):
                return Fault(Verdict.RETRY, "kafka", kind)
        if getattr(exc, "retriable", False):
            return Fault(Verdict.RETRY, "kafka", "retriable")
        return Fault(Verdict.STOP, "kafka", "error")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Fault(Verdict.RETRY, None, "timeout")
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.errno in _LOCAL_ERRNOS:
        return Fault(Verdict.STOP, None, "error")  # a missing file or a permission: no retry can fix it
    if isinstance(exc, (ConnectionError, OSError)):
        return Fault(Verdict.RETRY, None, "connection")
    return Fault(Verdict.STOP, None, "error")


def _redis_fault(exc: BaseException) -> Fault:
    if isinstance(exc, (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError)):
        return Fault(Verdict.STOP, "redis", "auth")  # a configuration error: retrying cannot fix it
    for cls, kind in _REDIS_CLASS_KINDS:
        if isinstance(exc, cls):
            return Fault(Verdict.RETRY, "redis", kind)
    if isinstance(exc, rex.TimeoutError):
        return Fault(Verdict.RETRY, "redis", "timeout")
    if isinstance(exc, rex.ConnectionError):
        return Fault(Verdict.RETRY, "redis", "connection")
    if isinstance(exc, rex.ResponseError):
        m = _REDIS_CODE_IN_TEXT.search(str(exc))
        if m:
            return Fault(Verdict.RETRY, "redis", _REDIS_TRANSIENT_CODES[m.group(1)])
    return Fault(Verdict.STOP, "redis", "error")


def transient(exc: BaseException) -> bool:
    """True when ``exc`` is a transient infrastructure error (retry; never dead-letter).

    >>> transient(ConnectionRefusedError(111, "Connection refused")), transient(KeyError("x"))
    (True, False)
    """
    return classify_fault(exc).verdict is Verdict.RETRY


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters (for logs, ``/readyz`` and stop lines).

    >>> describe(ValueError("two\\nlines"))
    'ValueError: two lines'
    >>> describe(rex.ResponseError("Command # 2 (EVALSHA 63 1 k) of pipeline caused error: (Error running script "
    ...                            "(call to f_63): @user_script: 44: -OOM command not allowed when used memory "
    ...                            "> 'maxmemory'.)"))
    "ResponseError: OOM command not allowed when used memory > 'maxmemory'."
    """
    exc = _cause(exc)
    msg = " ".join(str(exc).split())
    if isinstance(exc, rex.ResponseError):
        # redis-py wraps a failed pipeline command ("Command # 2 (EVALSHA ...) of pipeline caused error: (\"Error
        # running script (...): -OOM command not allowed ...\")"): keep the server's own words
        m = _REDIS_CODE_IN_TEXT.search(msg)
        if m:
            msg = msg[m.start(1):].rstrip("\"')")
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Backoff:
    """Exponential back-off between retries: ``initial_s``, doubling, at most ``max_s``.

    >>> b = Backoff(0.5, 2.0)
    >>> [b.next() for _ in range(4)]
    [0.5, 1.0, 2.0, 2.0]
    >>> b.reset(); b.next()
    0.5
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError(f"back-off needs 0 < initial_s <= max_s, got {initial_s}, {max_s}")
        self.initial_s, self.max_s = initial_s, max_s
        self._next = initial_s

    def next(self) -> float:
        out = self._next
        self._next = min(self.max_s, self._next * 2)
        return out

    def reset(self) -> None:
        self._next = self.initial_s


class DlqLimit:
    """Stop dead-lettering when too much of the traffic is failing (Arroyo's ``DlqLimit``).

    The engine dead-letters a schema-valid event only when applying it alone fails deterministically; when that
    happens to more than ``max_ratio`` of the last ``window`` schema-valid events, or to ``max_consecutive``
    of them in a row, it is no longer a poison message but a bug or a broken dependency, and dead-lettering
    the traffic would throw it away: :meth:`check` raises :class:`WorkerStop` instead, before the batch's
    records are sent. Invalid input (bad JSON, missing fields) is not counted: it is the sender's problem.

    Parameters
    ----------
    max_ratio
        Largest share of the window that may be dead-lettered by the engine (0 < max_ratio <= 1).
    window
        How many of the most recent schema-valid events the ratio is taken over; before that many were seen,
        the ratio is taken over ``window`` all the same (a young worker is not stopped by its first poison event).
    max_consecutive
        Most schema-valid events dead-lettered in a row.

    Examples
    --------
    >>> limit = DlqLimit(max_ratio=0.01, window=1000, max_consecutive=20)
    >>> limit.check(valid=100, poison=5)   # 5 of 1000 allowed 10
    >>> limit.check(valid=900, poison=5)
    >>> limit.check(valid=10, poison=1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stream.faults.WorkerStop: the engine failed on 11 of the last 1010 schema-valid events (limit 1%, ...
    """

    def __init__(self, max_ratio: float = 0.01, window: int = 1000, max_consecutive: int = 50) -> None:
        if not 0 < max_ratio <= 1:
            raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio}")
        if window < 1 or max_consecutive < 1:
            raise ValueError(f"window and max_consecutive must be >= 1, got {window}, {max_consecutive}")
        self.max_ratio, self.window, self.max_consecutive = max_ratio, window, max_consecutive
        self._batches: deque[tuple[int, int]] = deque()  # (valid, poison) of recent batches
        self._valid = self._poison = 0
        self._consecutive = 0

    def check(self, valid: int, poison: int, consecutive_tail: int | None = None) -> None:
        """Account a batch of ``valid`` schema-valid events of which ``poison`` failed alone; raise
        :class:`WorkerStop` when the limit is passed. ``consecutive_tail``: how many of the batch's last events
        in a row were poison (default: all of them when every event was, else none)."""
        if consecutive_tail is None:
            consecutive_tail = poison if poison == valid else 0
        run = self._consecutive + poison if poison == valid else consecutive_tail
        self._batches.append((valid, poison))
        self._valid += valid
        self._poison += poison
        while self._batches and self._valid - self._batches[0][0] >= self.window:
            v, p = self._batches.popleft()
            self._valid -= v
            self._poison -= p
        self._consecutive = run
        allowed = self.max_ratio * max(self.window, self._valid)
        if self._poison > allowed:
            raise WorkerStop(
                f"the engine failed on {self._poison} of the last {max(self.window, self._valid)} schema-valid "
                f"events (limit {self.max_ratio:.0%}, PROMO_DLQ_MAX_RATIO): this is a bug or a broken dependency, "
                f"not bad input; nothing of this batch was dead-lettered or acknowledged. See the errors logged "
                f"above, fix the cause and restart the worker"
            )
        if run >= self.max_consecutive:
            raise WorkerStop(
                f"the engine failed on {run} schema-valid events in a row (limit {self.max_consecutive}, "
                f"PROMO_DLQ_MAX_CONSECUTIVE): this is a bug or a broken dependency, not bad input; nothing of "
                f"this batch was dead-lettered or acknowledged. See the errors logged above, fix the cause and "
                f"restart the worker"
            )
