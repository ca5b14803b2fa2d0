"""decode_event: every reason, the error texts, the leniencies, limits from settings, and agreement with the
JSON Schema on generated documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from jsonschema import Draft202012Validator

from models.events import EVENT_TYPES, Event
from stream.settings import Settings
from stream.validation import REASONS, InvalidEvent, Limits, decode_event, parse_rfc3339_ms

NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
LIMITS = Limits()
OK = {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1", "ts": 1_569_888_000_000}
SCHEMA = Draft202012Validator(
    json.loads((Path(__file__).resolve().parents[2] / "stream/schemas/event.v1.json").read_text())
)


def enc(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def with_(**kw) -> bytes:
    d = dict(OK)
    for k, v in kw.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return enc(d)


def reject(raw, limits=LIMITS, now_ms=NOW_MS) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw, limits, now_ms)
    assert info.value.reason in REASONS
    return info.value


# --- the happy path -----------------------------------------------------------------------------------
def test_minimal_event_gets_defaults():
    e = decode_event(enc(OK), LIMITS, NOW_MS, recv_ns=123)
    assert e == Event("e1", "view", "u1", "i1", 1_569_888_000_000, recv_ns=123)


def test_full_event_keeps_every_field_and_drops_unknown_ones():
    doc = dict(OK, type="purchase", ts="2019-10-01T02:00:00.123+02:00", price=12, quantity=3, category="c",
               session_id="s", order_id="o", decision_id="d", context={"ch": "app", "pos": 2, "w": 0.5},
               extra={"nested": [1, 2]})
    e = decode_event(enc(doc), LIMITS, NOW_MS)
    assert (e.ts, e.price, e.quantity, e.value) == (1_569_888_000_123, 12.0, 3, 36.0)
    assert type(e.price) is float
    assert (e.category, e.session_id, e.order_id, e.decision_id) == ("c", "s", "o", "d")
    assert e.context == {"ch": "app", "pos": 2, "w": 0.5}
    assert not hasattr(e, "extra")


@pytest.mark.parametrize("etype", EVENT_TYPES)
def test_every_event_type_is_accepted(etype):
    assert decode_event(with_(type=etype), LIMITS, NOW_MS).type == etype


def test_null_and_empty_optional_fields_mean_absent():
    raw = with_(price=None, quantity=None, category="", session_id=None, order_id="", decision_id=None, context=None)
    e = decode_event(raw, LIMITS, NOW_MS)
    assert (e.price, e.quantity, e.category, e.session_id, e.order_id, e.decision_id, e.context) == (
        None, 1, None, None, None, None, {})


def test_integral_floats_are_integers_like_in_json_schema():
    e = decode_event(with_(quantity=2.0, ts=1.5698880e12), LIMITS, NOW_MS)
    assert (e.quantity, e.ts) == (2, 1_569_888_000_000)
    assert type(e.quantity) is int and type(e.ts) is int


def test_bytearray_and_memoryview_are_accepted():
    assert decode_event(bytearray(enc(OK)), LIMITS, NOW_MS).event_id == "e1"
    assert decode_event(memoryview(enc(OK)), LIMITS, NOW_MS).event_id == "e1"


def test_paired_surrogate_escapes_are_fine():
    raw = enc(dict(OK, user_id="u\U0001F600"))  # ensure_ascii: "\ud83d\ude00"
    assert b"\\ud83d" in raw
    assert decode_event(raw, LIMITS, NOW_MS).user_id == "u\U0001F600"


# --- every reason, with an error that names the field -------------------------------------------------
def test_oversized_is_checked_before_parsing():
    exc = reject(b"{" * (LIMITS.max_event_bytes + 1))  # not JSON at all: size wins
    assert exc.reason == "oversized"
    assert str(LIMITS.max_event_bytes + 1) in exc.error and str(LIMITS.max_event_bytes) in exc.error


def test_exactly_max_bytes_is_not_oversized():
    raw = with_(pad="")
    raw = with_(pad="x" * (LIMITS.max_event_bytes - len(raw)))
    assert len(raw) == LIMITS.max_event_bytes
    assert decode_event(raw, LIMITS, NOW_MS).event_id == "e1"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (None, "tombstone"),
        (b"", "not valid JSON"),
        (b"   ", "not valid JSON"),
        (b'{"event_id": ', "line 1 column"),
        (b'{"a":1} x', "Extra data"),
        (b'{"price": NaN}', "NaN"),
        (b'{"price": -Infinity}', "-Infinity"),
        (b'{"user_id":"\xc3\x28"}', "UTF-8 at byte 12"),
        (b"\xef\xbb\xbf" + enc(OK), "BOM"),
        (b"[" * 5000 + b"]" * 5000, "nested 5000 levels deep, more than 64"),
        (enc(OK).decode().encode("utf-16"), "UTF-8"),
    ],
)
def test_bad_json(raw, fragment):
    exc = reject(raw)
    assert exc.reason == "bad_json"
    assert fragment in exc.error


def test_non_bytes_value_is_bad_json_not_a_crash():
    exc = reject(12345)
    assert exc.reason == "bad_json" and "int" in exc.error


@pytest.mark.parametrize("raw, kind", [(b"[]", "array"), (b'"x"', "string"), (b"1", "integer"), (b"null", "null"),
                                       (b"true", "boolean")])
def test_not_object(raw, kind):
    exc = reject(raw)
    assert exc.reason == "not_object" and kind in exc.error


@pytest.mark.parametrize("field", ["event_id", "type", "user_id", "item_id", "ts"])
@pytest.mark.parametrize("value", [..., None, ""])
def test_missing_field(field, value):
    exc = reject(with_(**{field: value}))
    assert exc.reason == "missing_field"
    assert field in exc.error


def test_missing_field_wins_over_other_problems():
    assert reject(with_(user_id=..., price=-1, type="nope")).reason == "missing_field"


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("event_id", 1, "event_id must be a string, got an integer"),
        ("user_id", 541312140, "user_id must be a string, got an integer"),
        ("item_id", ["i"], "item_id must be a string, got an array"),
        ("type", {"t": 1}, "type must be a string"),
        ("ts", True, "got boolean true"),
        ("ts", 1.5e12 + 0.5, "ts must be an RFC 3339 string or integer epoch milliseconds"),
        ("ts", {"s": 1}, "got object"),
        ("price", True, "price must be a number, got boolean true"),
        ("price", "9.99", 'price must be a number, got string "9.99"'),
        ("quantity", 1.5, "quantity must be an integer, got number 1.5"),
        ("quantity", "2", "quantity must be an integer"),
        ("quantity", False, "quantity must be an integer, got boolean false"),
        ("category", 12, "category must be a string"),
        ("session_id", 7, "session_id must be a string"),
        ("order_id", 7, "order_id must be a string"),
        ("decision_id", 7, "decision_id must be a string"),
        ("context", ["web"], "context must be an object, got array"),
        ("context", "web", "context must be an object"),
    ],
)
def test_wrong_type(field, value, fragment):
    exc = reject(with_(**{field: value}))
    assert exc.reason == "wrong_type"
    assert fragment in exc.error


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"price": -0.01}, "price must be >= 0"),
        ({"price": 1_000_000.01}, "more than the maximum"),
        ({"price": 10**400}, "more than the maximum"),
        ({"price": 1e400}, "more than the maximum"),  # parses to inf
        ({"quantity": 0}, "quantity must be between 1 and 10000, got 0"),
        ({"quantity": -3}, "got -3"),
        ({"quantity": 10_001}, "got 10001"),
        ({"event_id": "e" * 257}, "event_id is 257 characters long"),
        ({"user_id": "u" * 257}, "user_id is 257"),
        ({"item_id": "i" * 1000}, "item_id is 1000"),
        ({"category": "c" * 257}, "category is 257"),
        ({"session_id": "s" * 257}, "session_id is 257"),
        ({"order_id": "o" * 257}, "order_id is 257"),
        ({"decision_id": "d" * 257}, "decision_id is 257"),
        ({"context": {f"k{i}": 1 for i in range(33)}}, "context has 33 keys"),
        ({"context": {"geo": {"c": "Oslo"}}}, "context.geo must be a string or a number"),
        ({"context": {"tags": ["a"]}}, "context.tags must be"),
        ({"context": {"vip": True}}, "got boolean true"),
        ({"context": {"x": None}}, "got null"),
        ({"context": {"k": "v" * 257}}, "context.k is 257 characters"),
        ({"context": {"k" * 257: 1}}, "context key"),
        ({"context": {"big": 2**63}}, "64-bit"),
        ({"context": {"inf": 1e400}}, "finite"),
        ({"user_id": "u\ud800"}, "user_id contains an unpaired UTF-16 surrogate"),
        ({"context": {"k": "\udfff"}}, "context contains an unpaired"),
    ],
)
def test_bad_value(kw, fragment):
    raw = with_(**kw) if "1e400" not in fragment else None
    if kw.get("price") == 1e400 or kw.get("context") == {"inf": 1e400}:
        raw = with_(**kw).replace(b"Infinity", b"1e400")
    exc = reject(raw)
    assert exc.reason == "bad_value", exc
    assert fragment in exc.error


def test_limits_are_inclusive():
    e = decode_event(with_(price=1_000_000, quantity=10_000, user_id="u" * 256,
                           context={f"k{i}": "v" * 256 for i in range(32)}), LIMITS, NOW_MS)
    assert (e.price, e.quantity, len(e.user_id), len(e.context)) == (1e6, 10_000, 256, 32)


@pytest.mark.parametrize("etype", ["wishlist", "VIEW", " view", "purchase\n", "remove-from-cart"])
def test_unknown_type(etype):
    exc = reject(with_(type=etype))
    assert exc.reason == "unknown_type"
    assert "view, click, cart, remove_from_cart, purchase" in exc.error


@pytest.mark.parametrize(
    "ts, fragment",
    [
        ("yesterday", '"yesterday" is not an RFC 3339 date-time'),
        ("2019-10-01T00:00:00", "with offset"),
        ("2019-10-01", "with offset"),
        ("20191001T000000Z", "not an RFC 3339"),
        ("2019-10-01T00:00:00Z\n", "not an RFC 3339"),
        ("٢٠١٩-10-01T00:00:00Z", "not an RFC 3339"),  # non-ASCII digits
        ("2019-13-01T00:00:00Z", "month"),
        ("2019-02-29T00:00:00Z", "day is out of range"),
        ("2019-04-31T00:00:00Z", "day is out of range"),
        ("2019-10-01T24:00:00Z", "time of day"),
        ("2019-10-01T23:59:60Z", "leap seconds"),
        ("2019-10-01T00:00:00+25:00", "offset"),
        ("1999-12-31T23:59:59Z", "before the minimum"),
        (1_569_888_000, "looks like epoch seconds"),
        (-1, "before the minimum"),
        (NOW_MS + 300_000 + 1, "more than 300 s after now"),
        (1_569_888_000_000_000, "looks like microseconds"),
        ("2100-01-01T00:00:00Z", "after now"),
    ],
)
def test_bad_timestamp(ts, fragment):
    exc = reject(with_(ts=ts))
    assert exc.reason == "bad_timestamp"
    assert fragment in exc.error


def test_timestamp_bounds_are_inclusive():
    assert decode_event(with_(ts=LIMITS.min_ts_ms), LIMITS, NOW_MS).ts == LIMITS.min_ts_ms
    latest = NOW_MS + LIMITS.max_future_skew_s * 1000
    assert decode_event(with_(ts=latest), LIMITS, NOW_MS).ts == latest


def test_leap_day_and_offsets():
    assert parse_rfc3339_ms("2020-02-29T00:00:00Z") == 1_582_934_400_000
    assert parse_rfc3339_ms("2000-02-29t12:00:00z") == 951_825_600_000
    assert parse_rfc3339_ms("2019-09-30T19:30:00-04:30") == 1_569_888_000_000
    assert parse_rfc3339_ms("2019-10-01T00:00:00.123456789Z") == 1_569_888_000_123


def test_repeated_timestamp_strings_give_the_same_result():
    # the parse cache must not change results, including for errors (which are never cached)
    for _ in range(3):
        assert decode_event(with_(ts="2019-10-01T00:00:00Z"), LIMITS, NOW_MS).ts == 1_569_888_000_000
        assert reject(with_(ts="2019-02-30T00:00:00Z")).reason == "bad_timestamp"


def test_cached_timestamp_is_still_checked_against_now():
    raw = with_(ts="2023-11-14T22:13:20Z")
    assert decode_event(raw, LIMITS, NOW_MS).ts == NOW_MS
    assert reject(raw, now_ms=NOW_MS - 2 * 86_400_000).reason == "bad_timestamp"


def test_limits_from_settings_are_applied():
    s = Settings(_env_file=None, max_event_bytes=300, max_string_len=8, max_context_keys=1, max_price=10,
                 max_quantity=2, min_ts_ms=1_600_000_000_000, max_future_skew_s=0)
    lim = Limits.from_settings(s)
    assert lim == Limits(300, 8, 1, 10.0, 2, 1_600_000_000_000, 0)
    assert decode_event(with_(ts=NOW_MS), lim, NOW_MS).ts == NOW_MS
    assert reject(with_(ts=NOW_MS, pad="x" * 300), lim).reason == "oversized"
    assert reject(with_(ts=NOW_MS, user_id="u" * 9), lim).reason == "bad_value"
    assert reject(with_(ts=NOW_MS, context={"a": 1, "b": 2}), lim).reason == "bad_value"
    assert reject(with_(ts=NOW_MS, price=10.5), lim).reason == "bad_value"
    assert reject(with_(ts=NOW_MS, quantity=3), lim).reason == "bad_value"
    assert reject(with_(ts=NOW_MS + 1), lim).reason == "bad_timestamp"
    assert reject(with_(ts=1_599_999_999_999), lim).reason == "bad_timestamp"


@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
@pytest.mark.parametrize("char", ["\x00", "\x1f", "\n", "\t", "\x7f"])
def test_control_characters_in_ids_are_bad_value(field, char):
    raw = with_(**{field: f"a{char}b"})
    exc = reject(raw)
    assert exc.reason == "bad_value"
    assert exc.error == f"{field} contains a control character (U+0000-U+001F or U+007F); ids may not"
    assert not SCHEMA.is_valid(json.loads(raw))


def test_a_raw_del_character_in_an_id_is_bad_value_too():
    raw = b'{"event_id":"e1","type":"view","user_id":"u\x7f1","item_id":"i1","ts":1569888000000}'
    assert reject(raw).reason == "bad_value"


def test_control_characters_elsewhere_and_key_characters_in_ids_are_fine():
    e = decode_event(with_(user_id="victim}:other*{%", item_id="a:b", category="c\nd", session_id="s\t1"),
                     LIMITS, NOW_MS)
    assert (e.user_id, e.item_id, e.category) == ("victim}:other*{%", "a:b", "c\nd")


@pytest.mark.parametrize("field, value", [
    (field, value)
    for field in ("event_id", "user_id", "item_id", "session_id", "order_id", "decision_id")
    for value in (541312140, "s" * 257, 5.5, ["secret"], {"id": "secret"})
] + [(field, "secret-user-\x01") for field in ("event_id", "user_id", "item_id")])
def test_error_texts_never_repeat_an_id_value(field, value):
    """They reach logs and the DLQ record's error; with pseudonymisation on no clear user id may be there."""
    exc = reject(with_(**{field: value}))
    for shown in ("541312140", "secret", "sss", "5.5"):
        assert shown not in exc.error, exc.error


def test_invalid_event_is_an_exception_with_reason_and_error():
    exc = reject(with_(price=-1))
    assert isinstance(exc, Exception)
    assert str(exc) == f"bad_value: {exc.error}"
    assert exc.args == ("bad_value", exc.error)


# --- agreement with the JSON Schema on generated documents --------------------------------------------
_text = st.text(max_size=300)
_ids = st.one_of(st.text(min_size=1, max_size=12), st.text(max_size=300))
_numbers = st.one_of(
    st.integers(min_value=-10, max_value=2_000_000), st.floats(allow_nan=False, allow_infinity=False, width=64)
)
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
_json = st.recursive(_json_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                        st.dictionaries(st.text(max_size=5), c, max_size=3)),
                     max_leaves=6)
_rfc3339 = st.builds(
    lambda ms, sep, frac, off: _fmt_ts(ms, sep, frac, off),
    st.integers(LIMITS.min_ts_ms, NOW_MS),
    st.sampled_from(["T", "t", " "]),
    st.sampled_from(["", ".1", ".123", ".123456789"]),
    st.sampled_from(["Z", "z", "+00:00", "+05:30", "-08:00"]),
)


def _fmt_ts(ms: int, sep: str, frac: str, off: str) -> str:
    from datetime import datetime, timedelta, timezone

    sign = -1 if off.startswith("-") else 1
    minutes = 0 if off in ("Z", "z") else sign * (int(off[1:3]) * 60 + int(off[4:6]))
    local = datetime.fromtimestamp(ms // 1000, timezone.utc) + timedelta(minutes=minutes)
    return local.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + frac + off


_FIELDS = {
    "event_id": _ids,
    "user_id": _ids,
    "item_id": _ids,
    "type": st.one_of(st.sampled_from(EVENT_TYPES), st.sampled_from(["", "VIEW", "buy"])),
    "ts": st.one_of(
        _rfc3339,
        st.integers(0, NOW_MS),
        st.floats(0, float(NOW_MS)),
        st.sampled_from(["", "yesterday", "2019-10-01T00:00:00", "2019-10-01"]),
    ),
    "price": st.one_of(st.none(), _numbers, st.booleans(), st.text(max_size=3)),
    "quantity": st.one_of(st.none(), st.integers(-2, 10_010), st.floats(-2, 10_010), st.booleans(),
                          st.sampled_from(["1", [1]])),
    "category": st.one_of(st.none(), _text, st.integers(0, 9)),
    "session_id": st.one_of(st.none(), _text, st.integers(0, 9)),
    "order_id": st.one_of(st.none(), _text),
    "decision_id": st.one_of(st.none(), _text, st.booleans()),
    "context": st.one_of(
        st.none(),
        st.dictionaries(
            st.text(max_size=260),
            st.one_of(st.text(max_size=260), st.integers(-(2**63), 2**63 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
                      st.lists(st.integers(), max_size=2)),
            max_size=34,
        ),
        st.lists(st.integers(), max_size=2),
        st.text(max_size=3),
    ),
}
_VALID_FIELDS = {
    "event_id": st.text(min_size=1, max_size=256),
    "user_id": st.text(min_size=1, max_size=40),
    "item_id": st.text(min_size=1, max_size=40),
    "type": st.sampled_from(EVENT_TYPES),
    "ts": st.one_of(_rfc3339, st.integers(LIMITS.min_ts_ms, NOW_MS)),
    "price": st.one_of(st.none(), st.integers(0, 1_000_000), st.floats(0, 1e6)),
    "quantity": st.one_of(st.none(), st.integers(1, 10_000), st.integers(1, 10_000).map(float)),
    "category": st.one_of(st.none(), st.text(max_size=256)),
    "session_id": st.one_of(st.none(), st.text(max_size=40)),
    "order_id": st.one_of(st.none(), st.text(max_size=40)),
    "decision_id": st.one_of(st.none(), st.text(max_size=40)),
    "context": st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=256), st.one_of(st.text(max_size=256), st.integers(-(2**63), 2**63 - 1),
                                                         st.floats(allow_nan=False, allow_infinity=False)),
                        max_size=32),
    ),
}


_PRESENT_REQUIRED = [True] * 32 + [False]  # ~3 % of required fields left out
_PRESENT_OPTIONAL = [True, False]


@st.composite
def _documents(draw):
    """Documents near the boundary: per document a share of fields drawn from the 'wild' strategies."""
    p_wild = draw(st.sampled_from([0.0, 0.05, 0.15, 0.4]))
    doc = {}
    for name, wild in _FIELDS.items():
        required = name in ("event_id", "type", "user_id", "item_id", "ts")
        # (sampled_from, not floats(0, 1): hypothesis draws boundary floats like 0.0 far too often)
        if draw(st.sampled_from(_PRESENT_REQUIRED if required else _PRESENT_OPTIONAL)) is False:
            continue  # absent
        doc[name] = draw(wild if draw(st.sampled_from(range(100))) < p_wild * 100 else _VALID_FIELDS[name])
    for key, value in draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in _FIELDS), _json,
                                           max_size=3)).items():
        doc[key] = value
    return doc


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents())
def test_decode_event_agrees_with_json_schema(doc):
    raw = enc(doc)
    schema_ok = SCHEMA.is_valid(doc) and len(raw) <= LIMITS.max_event_bytes
    try:
        decode_event(raw, LIMITS, NOW_MS)
        decoded_ok, why = True, ""
    except InvalidEvent as exc:
        decoded_ok, why = False, str(exc)
    assert decoded_ok == schema_ok, (why, [e.message for e in SCHEMA.iter_errors(doc)][:3])


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(raw):
    try:
        decode_event(raw, LIMITS, NOW_MS)
    except InvalidEvent as exc:
        assert exc.reason in REASONS and exc.error


@hsettings(max_examples=200, deadline=None)
@given(_json)
def test_arbitrary_json_never_crashes(value):
    try:
        decode_event(enc(value), LIMITS, NOW_MS)
    except InvalidEvent as exc:
        assert exc.reason in REASONS and exc.error
