"""The JSON Schemas are valid draft 2020-12, every example validates, and the code agrees with them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from models.decision import Decision, Offer, decision_id_for
from models.events import EVENT_TYPES
from stream.dlq import DLQ_REASONS, dlq_record
from stream.validation import REASONS, InvalidEvent, Limits, decode_event

SCHEMAS = Path(__file__).resolve().parents[2] / "stream" / "schemas"
EXAMPLES = SCHEMAS / "examples"
NOW_MS = 1_700_000_000_000


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


EVENT = _validator("event.v1.json")
DECISION = _validator("decision.v1.json")
DLQ = _validator("dlq.v1.json")


def _invalid_examples() -> list[dict]:
    return json.loads((EXAMPLES / "invalid_events.json").read_text())


def _raw(case: dict) -> bytes:
    return base64.b64decode(case["raw_base64"]) if "raw_base64" in case else case["raw"].encode("utf-8")


@pytest.mark.parametrize("etype", EVENT_TYPES)
def test_one_valid_example_per_event_type(etype):
    raw = (EXAMPLES / f"event_{etype}.json").read_bytes()
    doc = json.loads(raw)
    assert doc["type"] == etype
    EVENT.validate(doc)
    event = decode_event(raw, Limits(), NOW_MS)
    assert (event.type, event.event_id, event.user_id) == (etype, doc["event_id"], doc["user_id"])


@pytest.mark.parametrize("name", ["decision.json", "decision_timer.json"])
def test_decision_example_validates_and_round_trips(name):
    doc = json.loads((EXAMPLES / name).read_text())
    DECISION.validate(doc)
    assert Decision.from_dict(doc).to_dict() == doc


def test_decision_to_dict_validates_against_schema():
    d = Decision(
        decision_id=decision_id_for("e1"), user_id="u1", ts=NOW_MS, trigger_event_id="e1",
        offer=Offer(offer_id="none", kind="none"), items=["i1"], propensity=0.5, scores={"none": 0.0},
    )
    DECISION.validate(json.loads(d.to_json()))
    # every field of Decision is in the schema, so a field added in code fails here until documented; fields added
    # within v1 are optional there (a decision written by an earlier version still validates)
    optional = {"trigger"}
    assert set(DECISION.schema["required"]) | optional == set(d.to_dict())
    assert optional <= set(DECISION.schema["properties"]) and not optional & set(DECISION.schema["required"])
    doc = json.loads(d.to_json())
    del doc["trigger"]
    DECISION.validate(doc)
    assert Decision.from_dict(doc).trigger == "cart"  # stored before triggers other than the cart existed
    assert set(DECISION.schema["properties"]["offer"]["required"]) == set(d.to_dict()["offer"])


def test_decision_schema_rejects_unknown_offer_kind_and_group():
    doc = json.loads((EXAMPLES / "decision.json").read_text())
    assert not EVENT.is_valid(doc)
    bad = json.loads(json.dumps(doc))
    bad["offer"]["kind"] = "free_money"
    assert not DECISION.is_valid(bad)
    bad = dict(doc, group="control")
    assert not DECISION.is_valid(bad)


def test_dlq_example_validates_and_records_from_code_validate():
    DLQ.validate(json.loads((EXAMPLES / "dlq.json").read_text()))
    for raw in (b'{"a":1}', b"\xff\x00", None, b"x" * 70_000):
        DLQ.validate(json.loads(dlq_record(raw, "bad_json", "e", "promo.events", 0, 1)))


def test_dlq_schema_reason_enum_matches_code():
    assert tuple(DLQ.schema["properties"]["reason"]["enum"]) == DLQ_REASONS


def test_decision_schema_offer_kinds_are_the_registered_kinds():
    """A kind added in models/policy/offers/ must be in the decision schema a shop validates against."""
    from models.policy.offers import KINDS

    kind = DECISION.schema["properties"]["offer"]["properties"]["kind"]["enum"]
    assert sorted(kind) == sorted(KINDS)


def test_event_schema_type_enum_matches_code():
    assert tuple(EVENT.schema["properties"]["type"]["enum"]) == EVENT_TYPES


def test_event_schema_limits_match_settings_defaults():
    p = EVENT.schema["properties"]
    lim = Limits()
    assert p["user_id"]["maxLength"] == lim.max_string_len
    assert p["price"]["maximum"] == lim.max_price
    assert p["quantity"]["maximum"] == lim.max_quantity
    assert p["context"]["maxProperties"] == lim.max_context_keys
    assert p["ts"]["anyOf"][1]["minimum"] == lim.min_ts_ms


def test_invalid_examples_cover_every_reason():
    assert {case["reason"] for case in _invalid_examples()} == set(REASONS)


@pytest.mark.parametrize("case", _invalid_examples(), ids=lambda c: c["note"])
def test_invalid_example_is_rejected_with_its_reason(case):
    with pytest.raises(InvalidEvent) as info:
        decode_event(_raw(case), Limits(), NOW_MS)
    assert info.value.reason == case["reason"]
    assert info.value.error


@pytest.mark.parametrize(
    "case",
    [c for c in _invalid_examples() if c["reason"] not in ("bad_json", "oversized") and c.get("schema_rejects", True)],
    ids=lambda c: c["note"],
)
def test_invalid_example_is_rejected_by_schema_too(case):
    assert not EVENT.is_valid(json.loads(_raw(case)))


def test_the_limits_the_event_schema_states_in_words_are_the_settings_defaults():
    """The event schema names limits JSON Schema cannot express, with their values: they are the defaults of
    ``stream.settings.Settings`` (the skew said 86,400 s while the setting was 300 s)."""
    import re

    from stream.settings import Settings

    text = json.loads((SCHEMAS / "event.v1.json").read_text())["description"]
    stated = {name: int(value) for name, value in re.findall(r"(max_\w+) \((\d+)(?: s| bytes)?\)", text)}
    assert {"max_event_bytes", "max_future_skew_s"} <= set(stated)
    defaults = Settings(_env_file=None)
    assert stated == {name: getattr(defaults, name) for name in stated}
