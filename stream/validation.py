"""Hot-path decoder: Kafka message bytes -> validated :class:`models.events.Event`, or :class:`InvalidEvent`.

The worker calls :func:`decode_event` for every message, so it is plain Python (no jsonschema at run time).
It enforces the event v1 contract (``stream/schemas/event.v1.json``) plus the limits the schema cannot
express: message size, timestamps relative to the wall clock, calendar-valid RFC 3339 dates.
``tests/unit/test_validation.py`` cross-checks both on generated documents.

Every rejection carries one ``reason`` from the small fixed set :data:`REASONS` (the label values of
``promo_events_invalid_total{reason}``) and an ``error`` that names the field and what was wrong.

Checks, in order (the first failure wins):

1. ``oversized``: more than ``max_event_bytes`` bytes (checked before parsing).
2. ``bad_json``: empty/null value, invalid UTF-8, invalid JSON, ``NaN``/``Infinity`` literals, arrays and
   objects nested more than :data:`MAX_NESTING` levels (checked before parsing, so the reason does not depend
   on how deep the worker's own stack happens to be).
3. ``not_object``: valid JSON that is not an object.
4. ``missing_field``: a required field (``event_id``, ``type``, ``user_id``, ``item_id``, ``ts``) is absent,
   ``null`` or ``""``.
5. Field by field: ``wrong_type`` (wrong JSON type: a boolean is not a number, ids are strings, ``quantity``
   and integer ``ts`` must be integral), ``unknown_type`` (``type`` not in :data:`models.events.EVENT_TYPES`),
   ``bad_timestamp`` (unparsable ``ts`` string, before ``min_ts_ms`` or after now + ``max_future_skew_s``),
   ``bad_value`` (negative or absurd ``price``, ``quantity`` outside 1..max, a string longer than
   ``max_string_len``, too many ``context`` keys, a ``context`` value that is not a string or a finite number,
   a control character U+0000-U+001F or U+007F in ``event_id``, ``user_id`` or ``item_id``: ids name Redis keys,
   and U+001F separates the two items of a pair in a user's contribution record).

Error texts never repeat the value of an id (``event_id``, ``user_id``, ``item_id``, ``session_id``, ``order_id``,
``decision_id``): they reach logs and the DLQ record's ``error``, where a user id must not appear in clear when
``PROMO_PSEUDONYMISE_KEY`` is set. The DLQ record's ``raw`` keeps the original message.

Leniencies (also in the schema): optional fields may be ``null`` (= absent); an optional string field equal to
``""`` is treated as absent; integral floats (``2.0``) are accepted where an integer is required, as JSON Schema
does; unknown top-level fields are ignored.

>>> limits = Limits()
>>> now = 1_700_000_000_000
>>> e = decode_event(b'{"event_id":"e1","type":"cart","user_id":"u1","item_id":"i9",'
...                  b'"ts":"2023-11-14T22:13:20Z","price":9.5,"quantity":2}', limits, now)
>>> (e.type, e.ts, e.value)
('cart', 1700000000000, 19.0)
>>> try:
...     decode_event(b'{"event_id":"e1","type":"cart","user_id":7,"item_id":"i9","ts":1}', limits, now)
... except InvalidEvent as exc:
...     print(exc.reason, "|", exc.error)
wrong_type | user_id must be a string, got an integer
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from models import jsoncodec
from models.events import EVENT_TYPES, Event

REASONS: tuple[str, ...] = (
    "bad_json",
    "not_object",
    "oversized",
    "missing_field",
    "wrong_type",
    "bad_value",
    "unknown_type",
    "bad_timestamp",
)
"""The ``reason`` values of a rejected event (fixed: they are metric label values)."""

REQUIRED: tuple[str, ...] = ("event_id", "type", "user_id", "item_id", "ts")
OPTIONAL_STRINGS: tuple[str, ...] = ("session_id", "category", "order_id", "decision_id")

_EVENT_TYPES = frozenset(EVENT_TYPES)


class InvalidEvent(Exception):
    """A message that is not a valid event v1.

    >>> exc = InvalidEvent("bad_value", "price must be >= 0, got -1")
    >>> exc.reason, str(exc)
    ('bad_value', 'bad_value: price must be >= 0, got -1')
    """

    __slots__ = ("reason", "error")

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(reason, error)
        self.reason = reason
        self.error = error

    def __str__(self) -> str:
        return f"{self.reason}: {self.error}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Input limits; defaults equal :class:`stream.settings.Settings` defaults.

    >>> Limits().max_event_bytes
    16384
    """

    max_event_bytes: int = 16384
    max_string_len: int = 256
    max_context_keys: int = 32
    max_price: float = 1_000_000.0
    max_quantity: int = 10_000
    min_ts_ms: int = 946_684_800_000
    max_future_skew_s: int = 300  # as stream.settings.Settings

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        """The limits configured in a :class:`stream.settings.Settings`.

        >>> from stream.settings import Settings
        >>> Limits.from_settings(Settings(_env_file=None, max_string_len=64)).max_string_len
        64
        """
        return cls(
            max_event_bytes=settings.max_event_bytes,
            max_string_len=settings.max_string_len,
            max_context_keys=settings.max_context_keys,
            max_price=float(settings.max_price),
            max_quantity=settings.max_quantity,
            min_ts_ms=settings.min_ts_ms,
            max_future_skew_s=settings.max_future_skew_s,
        )


# --- JSON -------------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (non-finite numbers are not allowed)")


_decode_json = json.JSONDecoder(parse_constant=_reject_constant).decode

MAX_NESTING = 64
"""Deepest nesting of arrays/objects accepted in a message (a valid event needs 2: the event and its context)."""

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def nesting_depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` outside JSON strings (for valid and invalid JSON alike).

    >>> nesting_depth('{"a": [1, {"b": "[[["}]}'), nesting_depth("[" * 70), nesting_depth("42")
    (3, 70, 0)
    """
    depth = top = 0
    for ch in _JSON_STRING.sub('""', text):
        if ch == "[" or ch == "{":
            depth += 1
            if depth > top:
                top = depth
        elif ch == "]" or ch == "}":
            depth -= 1
    return top


ID_FIELDS: tuple[str, ...] = ("event_id", "user_id", "item_id", "session_id", "order_id", "decision_id")
"""Fields whose value an error text never repeats (see the module docstring)."""

_KIND = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
         list: "an array", dict: "an object"}


def _kind(value) -> str:
    """The JSON type of a value, and nothing of the value itself (for the id fields).

    >>> _kind(541312140), _kind("u1"), _kind(None)
    ('an integer', 'a string', 'null')
    """
    return _KIND.get(type(value), type(value).__name__)


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def has_control_character(text: str) -> bool:
    """Whether ``text`` holds U+0000-U+001F or U+007F, which no id may (ids name Redis keys; U+001F separates a
    pair's items in a contribution record).

    >>> has_control_character("u1"), has_control_character("u\x01")
    (False, True)
    """
    return _CONTROL.search(text) is not None


def _describe(value) -> str:
    """Short, safe description of a JSON value for error messages."""
    t = type(value)
    if value is None:
        return "null"
    if t is bool:
        return f"boolean {'true' if value else 'false'}"
    if t is int:
        s = str(value) if abs(value) < 10**30 else f"{str(value)[:12]}... ({len(str(value))} digits)"
        return f"integer {s}"
    if t is float:
        return f"number {value!r}"
    if t is str:
        r = json.dumps(value[:40], ensure_ascii=True)
        return f"string {r}{'...' if len(value) > 40 else ''}"
    if t is list:
        return f"array of {len(value)} items"
    if t is dict:
        return f"object with {len(value)} keys"
    return t.__name__  # pragma: no cover - json produces no other types


# --- timestamps -------------------------------------------------------------------------------------
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))\Z"
)
_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_DAYS: dict[str, int] = {}  # "YYYY-MM-DD" -> days since the epoch (valid dates only); dates repeat a lot


def _days_of(text: str, y: int, mo: int, d: int) -> int:
    if not 1 <= mo <= 12:
        raise ValueError(f'"{text}" is not a valid date-time: month must be in 1..12')
    if not 1 <= d <= _MONTH_DAYS[mo] or (mo == 2 and d == 29 and not (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0))):
        raise ValueError(f'"{text}" is not a valid date-time: day is out of range for month')
    days = _days_from_civil(y, mo, d)
    if len(_DAYS) >= 4096:
        _DAYS.clear()
    _DAYS[text[:10]] = days
    return days


def parse_rfc3339_ms(text: str) -> int:
    """Epoch milliseconds of an RFC 3339 date-time (``T``, ``t`` or space separator; offset required).

    Raises ``ValueError`` with a message fit for the user.

    >>> parse_rfc3339_ms("2019-10-01T00:00:00Z")
    1569888000000
    >>> parse_rfc3339_ms("2019-10-01 02:00:00.5+02:00")
    1569888000500
    >>> parse_rfc3339_ms("2019-10-01T00:00:00")
    Traceback (most recent call last):
    ...
    ValueError: "2019-10-01T00:00:00" is not an RFC 3339 date-time with offset (e.g. 2019-10-01T00:00:00Z)
    >>> parse_rfc3339_ms("2019-02-29T00:00:00Z")
    Traceback (most recent call last):
    ...
    ValueError: "2019-02-29T00:00:00Z" is not a valid date-time: day is out of range for month
    """
    m = _RFC3339.match(text)
    if m is None:
        shown = json.dumps(text[:40], ensure_ascii=True)
        raise ValueError(f"{shown} is not an RFC 3339 date-time with offset (e.g. 2019-10-01T00:00:00Z)")
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    days = _DAYS.get(text[:10])
    if days is None:
        days = _days_of(text, int(y), int(mo), int(d))
    h, mi, s = int(h), int(mi), int(s)
    if h > 23 or mi > 59 or s > 59:
        raise ValueError(f'"{text}" is not a valid date-time: time of day out of range (leap seconds unsupported)')
    ms = ((days * 24 + h) * 60 + mi) * 60_000 + s * 1000
    if frac:
        ms += int((frac + "00")[:3])
    if z is None:
        ohi, omi = int(oh), int(om)
        if ohi > 23 or omi > 59:
            raise ValueError(f'"{text}" has an invalid UTC offset')
        off = (ohi * 60 + omi) * 60_000
        ms = ms - off if sign == "+" else ms + off
    return ms


# --- field checks (slow path helpers; only reached for the optional fields present) -------------------
def _bad(reason: str, error: str) -> InvalidEvent:
    return InvalidEvent(reason, error)


_TS_CACHE: dict[str, int] = {}  # timestamp strings repeat (second resolution, replays): parse each once
_TS_CACHE_MAX = 4096


def _check_ts(ts, limits: Limits, now_ms: int) -> int:
    t = type(ts)
    if t is int:
        ms = ts
    elif t is str:
        ms = _TS_CACHE.get(ts)
        if ms is None:
            try:
                ms = parse_rfc3339_ms(ts)
            except ValueError as exc:
                raise _bad("bad_timestamp", f"ts {exc}") from None
            if len(_TS_CACHE) >= _TS_CACHE_MAX:
                _TS_CACHE.clear()
            _TS_CACHE[ts] = ms
    elif t is float and ts.is_integer():
        ms = int(ts)
    else:
        raise _bad("wrong_type", f"ts must be an RFC 3339 string or integer epoch milliseconds, got {_describe(ts)}")
    if ms < limits.min_ts_ms:
        hint = " (looks like epoch seconds: ts must be in milliseconds)" if 0 < ms * 1000 < 10**14 else ""
        raise _bad("bad_timestamp", f"ts {ms} ms is before the minimum {limits.min_ts_ms} ms{hint}")
    latest = now_ms + limits.max_future_skew_s * 1000
    if ms > latest:
        hint = " (looks like microseconds or nanoseconds: ts must be in milliseconds)" if ms > 10**14 else ""
        raise _bad(
            "bad_timestamp",
            f"ts {ms} ms is more than {limits.max_future_skew_s} s after now ({now_ms} ms){hint}",
        )
    return ms


def _check_required_slow(doc: dict, limits: Limits) -> None:
    """Raise the right error for the first bad required string field (called only when the fast check fails)."""
    for name in REQUIRED:
        v = doc.get(name)
        if v is None or v == "":
            raise _bad("missing_field", f"required field {name} is {'empty' if v == '' else 'missing or null'}")
    for name in ("event_id", "type", "user_id", "item_id"):
        v = doc[name]
        if type(v) is not str:
            raise _bad("wrong_type", f"{name} must be a string, got {_kind(v) if name in ID_FIELDS else _describe(v)}")
        if len(v) > limits.max_string_len:
            raise _bad("bad_value", f"{name} is {len(v)} characters long, more than the maximum {limits.max_string_len}")


def _check_context(ctx, limits: Limits) -> dict:
    if type(ctx) is not dict:
        raise _bad("wrong_type", f"context must be an object, got {_describe(ctx)}")
    if len(ctx) > limits.max_context_keys:
        raise _bad("bad_value", f"context has {len(ctx)} keys, more than the maximum {limits.max_context_keys}")
    maxlen = limits.max_string_len
    for k, v in ctx.items():
        if len(k) > maxlen:
            raise _bad("bad_value", f"context key {_describe(k)} is longer than the maximum {maxlen} characters")
        t = type(v)
        if t is str:
            if len(v) > maxlen:
                raise _bad("bad_value", f"context.{k[:40]} is {len(v)} characters long, more than the maximum {maxlen}")
        elif t is int:
            if not -(2**63) <= v < 2**63:
                raise _bad("bad_value", f"context.{k[:40]} is an integer outside the 64-bit range")
        elif t is float:
            if not math.isfinite(v):
                raise _bad("bad_value", f"context.{k[:40]} is not a finite number")
        else:
            raise _bad(
                "bad_value",
                f"context.{k[:40]} must be a string or a number (no nesting, booleans or null), got {_describe(v)}",
            )
    return ctx


def _opt_str(doc: dict, name: str, maxlen: int) -> str | None:
    v = doc.get(name)
    if v is None or v == "":
        return None
    if type(v) is not str:
        raise _bad("wrong_type", f"{name} must be a string, got {_kind(v) if name in ID_FIELDS else _describe(v)}")
    if len(v) > maxlen:
        raise _bad("bad_value", f"{name} is {len(v)} characters long, more than the maximum {maxlen}")
    return v


# --- the decoder ------------------------------------------------------------------------------------
def decode_event(raw: bytes | None, limits: Limits, now_ms: int, recv_ns: int = 0) -> Event:
    """Decode and validate one message value.

    Parameters
    ----------
    raw
        The Kafka message value (``None`` for a tombstone).
    limits
        Input limits, see :class:`Limits`.
    now_ms
        Wall-clock now in epoch milliseconds (bounds ``ts`` from above with ``max_future_skew_s``).
    recv_ns
        Receipt time stored on the event (``time.perf_counter_ns()`` in the worker).

    Raises
    ------
    InvalidEvent
        With ``reason`` in :data:`REASONS` and an ``error`` naming the field.

    Examples
    --------
    >>> decode_event(b'{"event_id":"e","type":"view","user_id":"u","item_id":"i","ts":1569888000000,'
    ...              b'"context":{"channel":"app","pos":3},"extra":[1]}', Limits(), 1_700_000_000_000)
    ... # doctest: +NORMALIZE_WHITESPACE
    Event(event_id='e', type='view', user_id='u', item_id='i', ts=1569888000000, price=None, quantity=1,
          category=None, session_id=None, order_id=None, decision_id=None,
          context={'channel': 'app', 'pos': 3}, recv_ns=0)
    >>> for raw in (b'[1]', b'{"ts": NaN}', b'{"type":"view"}'):
    ...     try:
    ...         decode_event(raw, Limits(), 0)
    ...     except InvalidEvent as exc:
    ...         print(exc.reason)
    not_object
    bad_json
    missing_field
    """
    if raw is None:
        raise _bad("bad_json", "message value is empty (null tombstone); expected a JSON event object")
    if type(raw) is not bytes:
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise _bad("bad_json", f"message value is a {type(raw).__name__}, expected bytes")
        raw = bytes(raw)
    n = len(raw)
    if n > limits.max_event_bytes:
        raise _bad("oversized", f"message is {n} bytes, more than the maximum {limits.max_event_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad("bad_json", f"message is not valid UTF-8 at byte {exc.start}: {exc.reason}") from None
    if text.count("[") + text.count("{") > MAX_NESTING:  # C-speed pre-check; exact scan only when it could be deep
        depth = nesting_depth(text)
        if depth > MAX_NESTING:
            raise _bad("bad_json", f"JSON nested {depth} levels deep, more than {MAX_NESTING}; events are flat objects")
    try:
        # orjson where it reads as json does; the standard library's strict decoder otherwise, and for the errors
        doc = jsoncodec.loads(raw, lambda _raw: _decode_json(text))
    except json.JSONDecodeError as exc:
        if text.startswith("\ufeff"):
            raise _bad("bad_json", "message starts with a byte order mark (BOM); send plain UTF-8 JSON") from None
        where = f" at line {exc.lineno} column {exc.colno}" if text.strip() else ""
        raise _bad("bad_json", f"not valid JSON: {exc.msg}{where}") from None
    except ValueError as exc:  # NaN / Infinity literals (from _reject_constant)
        raise _bad("bad_json", str(exc)) from None
    except RecursionError:
        raise _bad("bad_json", "JSON nested too deeply to decode") from None
    if type(doc) is not dict:
        raise _bad("not_object", f"event must be a JSON object, got {_describe(doc)}")

    get = doc.get
    event_id = get("event_id")
    etype = get("type")
    user_id = get("user_id")
    item_id = get("item_id")
    maxlen = limits.max_string_len
    # fast path: all four required strings present, non-empty, not too long
    if not (
        type(event_id) is str and type(etype) is str and type(user_id) is str and type(item_id) is str
        and 0 < len(event_id) <= maxlen and 0 < len(etype) <= maxlen
        and 0 < len(user_id) <= maxlen and 0 < len(item_id) <= maxlen
        and get("ts") is not None
    ):
        _check_required_slow(doc, limits)
    ts = get("ts")
    if ts == "":
        raise _bad("missing_field", "required field ts is empty")
    if etype not in _EVENT_TYPES:
        raise _bad("unknown_type", f"type {_describe(etype)} is not one of {', '.join(EVENT_TYPES)}")
    ts_ms = _check_ts(ts, limits, now_ms)

    price = get("price")
    if price is not None:
        t = type(price)
        if t is float or t is int:
            if price < 0:
                raise _bad("bad_value", f"price must be >= 0, got {price!r}")
            if price > limits.max_price:
                raise _bad("bad_value", f"price {price!r} is more than the maximum {limits.max_price!r}")
            price = float(price)
        else:
            raise _bad("wrong_type", f"price must be a number, got {_describe(price)}")

    quantity = get("quantity")
    if quantity is None:
        quantity = 1
    else:
        t = type(quantity)
        if t is float and quantity.is_integer():
            quantity = int(quantity)
        elif t is not int:
            raise _bad("wrong_type", f"quantity must be an integer, got {_describe(quantity)}")
        if not 1 <= quantity <= limits.max_quantity:
            raise _bad("bad_value", f"quantity must be between 1 and {limits.max_quantity}, got {quantity}")

    context = get("context")
    context = {} if context is None else _check_context(context, limits)

    event = Event(
        event_id,
        etype,
        user_id,
        item_id,
        ts_ms,
        price,
        quantity,
        _opt_str(doc, "category", maxlen) if "category" in doc else None,
        _opt_str(doc, "session_id", maxlen) if "session_id" in doc else None,
        _opt_str(doc, "order_id", maxlen) if "order_id" in doc else None,
        _opt_str(doc, "decision_id", maxlen) if "decision_id" in doc else None,
        context,
        recv_ns,
    )
    if "\\ud" in text or "\\uD" in text:  # a \uD800-\uDFFF escape: maybe a lone surrogate
        _check_surrogates(event)
    # JSON strings hold control characters only as escapes (and DEL as itself): most messages skip the check
    if ("\\" in text or "\x7f" in text) and (
        _CONTROL.search(event_id) or _CONTROL.search(user_id) or _CONTROL.search(item_id)
    ):
        name = next(n for n in ("event_id", "user_id", "item_id") if _CONTROL.search(getattr(event, n)))
        raise _bad("bad_value", f"{name} contains a control character (U+0000-U+001F or U+007F); ids may not")
    return event


def _check_surrogates(event: Event) -> None:
    """Reject strings with unpaired surrogates (from ``\\uD800`` escapes): they cannot be encoded to UTF-8
    and would fail later in Redis or Kafka."""

    def bad(name: str, s: str) -> bool:
        try:
            s.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True

    for name in ("event_id", "user_id", "item_id", "category", "session_id", "order_id", "decision_id"):
        s = getattr(event, name)
        if s is not None and bad(name, s):
            raise _bad("bad_value", f"{name} contains an unpaired UTF-16 surrogate (\\uD800-\\uDFFF escape)")
    for k, v in event.context.items():
        if bad("context", k) or (type(v) is str and bad("context", v)):
            raise _bad("bad_value", "context contains an unpaired UTF-16 surrogate (\\uD800-\\uDFFF escape)")
