"""DLQ records (text/base64/tombstone/truncation) and the exception -> reason mapping."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from stream.dlq import (
    DLQ_REASONS,
    INTERNAL_ERROR,
    MAX_RAW_BYTES,
    classify,
    dlq_record,
    raw_from_record,
    register,
    unregister,
)
from stream.validation import REASONS, InvalidEvent, Limits, decode_event

KEYS = ["reason", "error", "raw", "raw_encoding", "topic", "partition", "offset"]


def rec(raw, **kw) -> dict:
    args = dict(reason="bad_json", error="oops", topic="promo.events", partition=2, offset=99)
    args.update(kw)
    out = dlq_record(raw, args["reason"], args["error"], args["topic"], args["partition"], args["offset"])
    assert isinstance(out, bytes)
    return json.loads(out)


def test_text_record_has_exactly_the_contract_keys():
    r = rec(b'{"type":"view"}', reason="missing_field", error="required field event_id is missing or null")
    assert list(r) == KEYS
    assert r == {"reason": "missing_field", "error": "required field event_id is missing or null",
                 "raw": '{"type":"view"}', "raw_encoding": "text", "topic": "promo.events", "partition": 2,
                 "offset": 99}


def test_non_ascii_text_stays_text():
    r = rec("{\"city\":\"Zürich 東京\"}".encode())
    assert (r["raw"], r["raw_encoding"]) == ("{\"city\":\"Zürich 東京\"}", "text")


def test_invalid_utf8_is_base64():
    raw = b'{"u":"\xff\xfe"}'
    r = rec(raw)
    assert r["raw_encoding"] == "base64"
    assert base64.b64decode(r["raw"]) == raw


def test_tombstone_is_null_raw():
    r = rec(None)
    assert (r["raw"], r["raw_encoding"]) == (None, "text")
    assert raw_from_record(r) is None


def test_huge_value_is_truncated_and_says_so():
    raw = b"a" * (MAX_RAW_BYTES + 10)
    r = rec(raw)
    assert r["raw"] == "a" * MAX_RAW_BYTES
    assert (r["raw_truncated"], r["raw_size"]) == (True, MAX_RAW_BYTES + 10)


def test_cut_inside_a_multibyte_character_stays_text():
    raw = "é".encode() * 3  # 6 bytes
    r = json.loads(dlq_record(raw, "oversized", "e", "t", 0, 0, max_raw_bytes=5))
    assert (r["raw"], r["raw_encoding"], r["raw_size"]) == ("éé", "text", 6)


def test_lone_surrogate_in_error_does_not_crash():
    r = json.loads(dlq_record(b"x", "bad_value", "context key \udc80 bad", "t", 0, 0))
    assert r["error"] == "context key \udc80 bad"


def test_long_error_is_capped():
    assert len(rec(b"x", error="e" * 5000)["error"]) == 1000


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_raw_round_trips(raw):
    assert raw_from_record(rec(raw)) == raw


def test_every_validation_reason_round_trips_through_a_record():
    for reason in REASONS:
        assert rec(b"x", reason=reason)["reason"] == reason
    assert DLQ_REASONS == REASONS + (INTERNAL_ERROR,)
    assert INTERNAL_ERROR not in REASONS


def test_classify_invalid_event_keeps_reason_and_error():
    with pytest.raises(InvalidEvent) as info:
        decode_event(b'{"event_id":"e"}', Limits(), 0)
    assert classify(info.value) == ("missing_field", "required field type is missing or null")


@pytest.mark.parametrize(
    "exc, error",
    [
        (KeyError("price"), "KeyError: 'price'"),
        (ValueError("bad\n  thing"), "ValueError: bad thing"),
        (RuntimeError(), "RuntimeError"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_classify_unexpected_is_internal_error(exc, error):
    assert classify(exc) == (INTERNAL_ERROR, error)


def test_register_a_custom_mapping_and_bad_handler_reason():
    class Boom(Exception):
        pass

    register(Boom, lambda e: ("no_such_reason", str(e)))
    try:
        reason, error = classify(Boom("x"))
        assert reason == INTERNAL_ERROR and "no_such_reason" in error
    finally:
        unregister(Boom)
    assert classify(Boom("x")) == (INTERNAL_ERROR, "Boom: x")
    # built-in mappings survive unregister
    assert classify(InvalidEvent("bad_value", "v"))[0] == "bad_value"


def test_infrastructure_errors_are_transient_never_dead_letter_reasons():
    import aiokafka.errors as kex
    import redis.exceptions as rex

    from stream.faults import transient

    for exc in (rex.ConnectionError("down"), rex.TimeoutError(), ConnectionResetError(), asyncio.TimeoutError(),
                kex.KafkaConnectionError(), kex.KafkaTimeoutError(), rex.ResponseError("BUSY Redis is busy"),
                rex.OutOfMemoryError("command not allowed"), rex.BusyLoadingError("loading"),
                rex.ReadOnlyError("You can't write against a read only replica.")):
        assert transient(exc), exc
    for exc in (InvalidEvent("bad_json", "x"), KeyError("k"), rex.ResponseError("WRONGTYPE"), ValueError(),
                rex.AuthenticationError("invalid password")):
        assert not transient(exc), exc
