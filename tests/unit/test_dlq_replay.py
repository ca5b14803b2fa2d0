"""``promo dlq replay``'s pure logic: --reason parsing, DLQ record parsing, selection and skip counts."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

from stream.cli import cli
from stream.dlq import DLQ_REASONS, dlq_record
from stream.dlq_replay import (
    DUPLICATE,
    NOT_A_DLQ_RECORD,
    SKIP_REASONS,
    TOMBSTONE,
    TRUNCATED,
    Selector,
    _Sender,
    identity,
    parse_reasons,
    parse_record,
)
from stream.errors import PromoError


def event(eid: str = "e1", user: str = "u1", **kw) -> bytes:
    return json.dumps({"event_id": eid, "type": "cart", "user_id": user, "item_id": "i1", "ts": 1, **kw}).encode()


def rec(raw: bytes | None, reason: str = "bad_value", **kw) -> bytes:
    return dlq_record(raw, reason, "price 2e6 is more than the maximum 1e6", "promo.events", 0, 7, **kw)


# --- --reason ------------------------------------------------------------------------------------
def test_reasons_repeatable_and_comma_lists():
    assert parse_reasons(["bad_value", "wrong_type,bad_timestamp", " internal_error , "]) == {
        "bad_value", "wrong_type", "bad_timestamp", "internal_error"}


@pytest.mark.parametrize("values", [None, (), [""], [" , "]])
def test_no_reason_means_every_reason(values):
    assert parse_reasons(values) is None


@pytest.mark.parametrize("bad", ["bad_price", "BAD_VALUE", "bad_value,nope"])
def test_unknown_reason_is_one_line_naming_the_choices(bad):
    with pytest.raises(PromoError) as exc:
        parse_reasons([bad])
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("--reason ") and all(r in msg for r in DLQ_REASONS)


# --- record parsing ------------------------------------------------------------------------------
@given(st.binary(max_size=300))
def test_any_original_bytes_come_back_exactly(raw):
    assert parse_record(rec(raw))["raw_bytes"] == raw


def test_tombstone_parses_with_no_bytes():
    r = parse_record(rec(None))
    assert r["reason"] == "bad_value" and r["raw_bytes"] is None


@pytest.mark.parametrize("value", [
    None, b"", b"{oops", b"\xff\xfe", b"[1]", b'"text"', b"{}",
    json.dumps({"reason": "bad_json", "raw": "x", "raw_encoding": "text"}).encode(),  # no error/topic/...
])
def test_values_that_are_not_dlq_records(value):
    assert parse_record(value) is None


@pytest.mark.parametrize("change", [
    {"reason": 3}, {"raw": 12}, {"raw": ["x"]}, {"raw_encoding": "hex"},
    {"raw": "not base64!", "raw_encoding": "base64"}, {"raw": "abc", "raw_encoding": "base64"},
])
def test_records_with_bad_fields_are_not_dlq_records(change):
    doc = {**json.loads(rec(b"x")), **change}
    assert parse_record(json.dumps(doc).encode()) is None


# --- identity ------------------------------------------------------------------------------------
def test_identity_is_user_and_event_id_whatever_else_differs():
    assert identity(event(price=2e6)) == identity(event(price=5.0)) == ("event", "u1", "e1")
    assert identity(event(user="u2")) != identity(event())  # the engine's markers are per user


@pytest.mark.parametrize("raw", [b"{oops", b"\xff", b"[1]", b'{"event_id": 7}', b"[" * 100_000])
def test_identity_of_what_is_not_an_event_is_its_bytes(raw):
    assert identity(raw) == identity(bytes(raw)) and identity(raw)[0] == "raw"
    assert identity(raw) != identity(raw + b" ")


# --- selection -----------------------------------------------------------------------------------
def offer_all(sel: Selector, values: list) -> list:
    return [sel.offer(v) for v in values]


def test_selection_filters_by_reason_and_counts_every_skip():
    values = [
        rec(event("e1"), "bad_value"),
        rec(event("e2"), "bad_timestamp"),              # other reason: unmatched
        rec(event("e1"), "bad_value"),                  # dead-lettered again by an earlier replay
        rec(None, "bad_value"),                         # tombstone
        rec(event("e3", note="x" * 50), "bad_value", max_raw_bytes=20),  # cut: the original is lost
        b"{not a dlq record",
        rec(b"{oops", "bad_value"),                     # not an event: sent once, will dead-letter again
        rec(b"{oops", "bad_value"),
        rec(event("e1", user="u2"), "bad_value"),       # another user's e1: another event
    ]
    sel = Selector(parse_reasons(["bad_value"]))
    out = offer_all(sel, values)
    assert out == [event("e1"), None, None, None, None, None, b"{oops", None, event("e1", user="u2")]
    assert sel.counts() == {
        "read": 9, "matched": 7, "unmatched": 1, "selected": 3,
        "skipped": {NOT_A_DLQ_RECORD: 1, TOMBSTONE: 1, TRUNCATED: 1, DUPLICATE: 2},
        "by_reason": {"bad_value": 7},
    }


def test_every_reason_without_filter_and_by_reason_has_each():
    sel = Selector(None)
    offer_all(sel, [rec(event(f"e{r}"), r) for r in DLQ_REASONS] + [rec(event("x"), "internal_error")])
    c = sel.counts()
    assert c["matched"] == c["selected"] == len(DLQ_REASONS) + 1 and c["unmatched"] == 0
    assert c["by_reason"] == {r: (2 if r == "internal_error" else 1) for r in sorted(DLQ_REASONS)}


@given(st.lists(st.tuples(st.sampled_from(["bad_value", "bad_json", "wrong_type"]),
                          st.sampled_from(["e1", "e2", "e3"]), st.sampled_from(["rec", "tomb", "cut", "junk"])),
                max_size=40))
def test_counts_always_add_up(rows):
    values = []
    for reason, eid, kind in rows:
        if kind == "junk":
            values.append(b"junk")
        else:
            values.append(rec(None if kind == "tomb" else event(eid), reason,
                              **({"max_raw_bytes": 5} if kind == "cut" else {})))
    sel = Selector(parse_reasons(["bad_value", "bad_json"]))
    sent = [v for v in offer_all(sel, values) if v is not None]
    c = sel.counts()
    assert set(c["skipped"]) == set(SKIP_REASONS)
    assert c["read"] == len(values) == c["matched"] + c["unmatched"] + c["skipped"][NOT_A_DLQ_RECORD]
    assert c["matched"] == c["selected"] + sum(c["skipped"][w] for w in (TOMBSTONE, TRUNCATED, DUPLICATE))
    assert c["selected"] == len(sent) == len({identity(v) for v in sent})
    assert sum(c["by_reason"].values()) == c["matched"]


# --- sending and the exit status -----------------------------------------------------------------
class FakeProducer:
    """``send`` -> a future: acknowledged, refused by the broker later, or refused at once (too large)."""

    def __init__(self, outcomes: list[str]) -> None:
        self.outcomes, self.sent = list(outcomes), []

    async def send(self, topic, value, key=None, headers=None):
        from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

        outcome = self.outcomes.pop(0)
        if outcome == "too_large":
            raise MessageSizeTooLargeError("too large")
        self.sent.append((topic, key, value, dict(headers)))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None) if outcome == "ok" else fut.set_exception(KafkaTimeoutError("no ack"))
        return fut


def test_sender_waits_for_every_ack_and_counts_failures(monkeypatch):
    monkeypatch.setattr("stream.dlq_replay.MAX_IN_FLIGHT", 2)  # settles on the way, not only at the end
    producer = FakeProducer(["ok", "lost", "too_large", "ok", "ok"])

    async def go() -> _Sender:
        sender = _Sender(producer, "promo.events")
        for i in range(5):
            await sender.send(b"u1", b"v%d" % i)
        await sender.settle(0)
        return sender

    sender = asyncio.run(go())
    assert (sender.sent, sender.failed) == (3, 2)
    assert sorted(e.split(":")[0] for e in sender.errors) == ["KafkaTimeoutError", "MessageSizeTooLargeError"]
    assert [(t, k, v) for t, k, v, _h in producer.sent] == [("promo.events", b"u1", b"v%d" % i) for i in (0, 1, 3, 4)]
    assert all(int(h["sent_at_ns"]) > 0 for *_, h in producer.sent)


@pytest.mark.parametrize("failed, code", [(0, 0), (2, 1)])
def test_the_exit_status_says_whether_every_send_was_acknowledged(monkeypatch, failed, code):
    report = {"selected": 5, "sent": 5 - failed, "failed": failed, "send_errors": ["KafkaTimeoutError: no ack"]}
    monkeypatch.setattr("stream.dlq_replay.run_replay", lambda *a, **k: report)
    result = CliRunner().invoke(cli, ["dlq", "replay", "--json"], env={})
    assert result.exit_code == code and json.loads(result.stdout) == report
    assert result.stderr.count("\n") == code
    if failed:
        assert result.stderr.startswith("promo: error: 2 of 5 records were not acknowledged")


def test_bad_reason_fails_before_connecting():
    result = CliRunner().invoke(cli, ["dlq", "replay", "--reason", "bad_value,nope"],
                                env={"PROMO_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"promo: error: --reason 'nope': expected one of {', '.join(DLQ_REASONS)}\n"
