"""Dead-letter records and the mapping from exceptions to DLQ reasons.

A message that cannot be applied goes to the dead-letter topic (``<prefix>.events.dlq``, same key as the
original) as one JSON record (schema ``stream/schemas/dlq.v1.json``)::

    {"reason", "error", "raw", "raw_encoding", "topic", "partition", "offset"}

``raw`` is the original value as text when it is valid UTF-8 (``raw_encoding: "text"``), else base64
(``"base64"``); ``null`` for a tombstone. A value larger than ``max_raw_bytes`` (default 64 KiB) is cut, so the
record always fits a Kafka message, and two more keys say so: ``"raw_truncated": true, "raw_size": <bytes>``.

Which exceptions go to the DLQ (in the spirit of Arroyo's ``dlq.py``, where only ``InvalidMessage`` is
dead-lettered and everything else is the consumer's problem):

* :class:`stream.validation.InvalidEvent` -> its own ``reason`` (one of :data:`stream.validation.REASONS`).
* An unexpected exception while applying one message (a bug, or input the models cannot handle) ->
  :data:`INTERNAL_ERROR`. It is dead-lettered rather than retried forever (a poison message must not stop
  the partition), with the exception type and message as ``error``. ``internal_error`` is deliberately NOT in
  ``REASONS`` (those describe the *input*); :data:`DLQ_REASONS` is the full, fixed set of DLQ reasons and of
  ``promo_events_invalid_total{reason}`` label values, so that counter always equals the DLQ rate.
* Infrastructure failures (Redis/Kafka connection errors, timeouts, a full or busy Redis) are never
  dead-lettered: the message is fine, the world is not. :func:`stream.faults.classify_fault` gives every
  exception its verdict (retry, dead-letter, stop); the worker retries or stops. :func:`classify` still returns
  ``("internal_error", ...)`` for them if asked.

>>> from stream.validation import InvalidEvent
>>> classify(InvalidEvent("wrong_type", "user_id must be a string, got an integer"))
('wrong_type', 'user_id must be a string, got an integer')
>>> classify(ZeroDivisionError("division by zero"))
('internal_error', 'ZeroDivisionError: division by zero')
"""

from __future__ import annotations

import base64
import json
from typing import Callable

from stream.validation import REASONS, InvalidEvent

INTERNAL_ERROR = "internal_error"
DLQ_REASONS: tuple[str, ...] = REASONS + (INTERNAL_ERROR,)
"""Every ``reason`` a DLQ record can carry (fixed: metric label values)."""

MAX_RAW_BYTES = 65536
MAX_ERROR_CHARS = 1000


def _invalid_event(exc: BaseException) -> tuple[str, str]:
    assert isinstance(exc, InvalidEvent)
    return exc.reason, exc.error


def _unexpected(exc: BaseException) -> tuple[str, str]:
    msg = " ".join(str(exc).split())
    return INTERNAL_ERROR, (f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)[:MAX_ERROR_CHARS]


# Ordered (exception class, handler) table: the first class the exception is an instance of wins.
# Extend it with register() - e.g. a models/ error type that should get its own handling.
_HANDLERS: list[tuple[type[BaseException], Callable[[BaseException], tuple[str, str]]]] = [
    (InvalidEvent, _invalid_event),
    (Exception, _unexpected),
]


def register(exc_type: type[BaseException], handler: Callable[[BaseException], tuple[str, str]]) -> None:
    """Map ``exc_type`` (and subclasses) to ``handler(exc) -> (reason, error)``; ``reason`` must be in
    :data:`DLQ_REASONS`. Registered types take precedence over the built-in catch-all.

    >>> class CatalogueMiss(Exception): ...
    >>> register(CatalogueMiss, lambda e: ("bad_value", f"unknown item: {e}"))
    >>> classify(CatalogueMiss("i9"))
    ('bad_value', 'unknown item: i9')
    >>> unregister(CatalogueMiss)
    >>> classify(CatalogueMiss("i9"))[0]
    'internal_error'
    """
    _HANDLERS.insert(len(_HANDLERS) - 1, (exc_type, handler))


def unregister(exc_type: type[BaseException]) -> None:
    """Remove a mapping added with :func:`register`."""
    _HANDLERS[:] = [(t, h) for t, h in _HANDLERS if t is not exc_type or h in (_invalid_event, _unexpected)]


def classify(exc: BaseException) -> tuple[str, str]:
    """``(reason, error)`` for an exception raised while decoding or applying one message."""
    for exc_type, handler in _HANDLERS:
        if isinstance(exc, exc_type):
            reason, error = handler(exc)
            if reason not in DLQ_REASONS:
                return INTERNAL_ERROR, f"handler for {exc_type.__name__} returned unknown reason {reason!r}: {error}"
            return reason, error
    return _unexpected(exc)  # BaseException that is not an Exception


def dlq_record(
    raw: bytes | None,
    reason: str,
    error: str,
    topic: str,
    partition: int,
    offset: int,
    max_raw_bytes: int = MAX_RAW_BYTES,
) -> bytes:
    """The DLQ record for one message, as compact UTF-8 JSON bytes.

    Examples
    --------
    >>> dlq_record(b'{"type":1}', "missing_field", "required field event_id is missing or null",
    ...            "promo.events", 3, 42)
    b'{"reason":"missing_field","error":"required field event_id is missing or null","raw":"{\\\\"type\\\\":1}","raw_encoding":"text","topic":"promo.events","partition":3,"offset":42}'
    >>> json.loads(dlq_record(b"\\xff\\xfe", "bad_json", "not UTF-8", "promo.events", 0, 7))["raw"]
    '//4='
    >>> r = json.loads(dlq_record(b"x" * 10, "oversized", "too big", "t", 0, 1, max_raw_bytes=4))
    >>> r["raw"], r["raw_truncated"], r["raw_size"]
    ('xxxx', True, 10)
    """
    record: dict = {"reason": reason, "error": error[:MAX_ERROR_CHARS]}
    truncated = False
    size = 0
    if raw is None:
        record["raw"], record["raw_encoding"] = None, "text"
    else:
        raw = bytes(raw)
        size = len(raw)
        if size > max_raw_bytes:
            raw, truncated = raw[:max_raw_bytes], True
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = None
            # a cut in the middle of a multi-byte character is not a reason for base64
            if truncated and exc.start >= len(raw) - 3 and exc.reason == "unexpected end of data":
                try:
                    text = raw[: exc.start].decode("utf-8")
                except UnicodeDecodeError:
                    text = None
        if text is not None:
            record["raw"], record["raw_encoding"] = text, "text"
        else:
            record["raw"], record["raw_encoding"] = base64.b64encode(raw).decode("ascii"), "base64"
    record["topic"] = topic
    record["partition"] = partition
    record["offset"] = offset
    if truncated:
        record["raw_truncated"] = True
        record["raw_size"] = size
    try:
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in `error`: escape it
        return json.dumps(record, separators=(",", ":")).encode("ascii")


def raw_from_record(record: dict) -> bytes | None:
    """The original bytes stored in a DLQ record (inverse of :func:`dlq_record` when not truncated).

    >>> raw_from_record(json.loads(dlq_record(b"\\x00\\xff", "bad_json", "e", "t", 0, 0)))
    b'\\x00\\xff'
    """
    raw = record.get("raw")
    if raw is None:
        return None
    if record.get("raw_encoding") == "base64":
        return base64.b64decode(raw)
    return raw.encode("utf-8")
