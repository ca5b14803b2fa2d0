"""File sources: every mapping, line-numbered errors, deterministic ids, limits, headers, the bundled sample."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from stream.sources import SourceError, event_id_for, read_events
from stream.validation import Limits, decode_event

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "stream" / "data" / "rees46_sample.csv"
SCHEMA = Draft202012Validator(json.loads((ROOT / "stream/schemas/event.v1.json").read_text()))
NOW_MS = 1_700_000_000_000

REES46_HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def is_valid_event(doc: dict) -> bool:
    decode_event(json.dumps(doc).encode(), Limits(), NOW_MS)  # raises if not
    return SCHEMA.is_valid(doc)


# --- REES46 -------------------------------------------------------------------------------------------
REES46 = "\n".join([
    REES46_HEADER,
    "2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde",
    "2019-10-01 00:00:05 UTC,cart,3900821,2053013552326770905,appliances.environment.water_heater,aqua,33.20,"
    "554748717,9333dfbd",
    "2019-10-01 00:01:00 UTC,purchase,3900821,2053013552326770905,appliances.environment.water_heater,,33.20,"
    "554748717,",
    "2019-10-01 00:02:00 UTC,remove_from_cart,1,2,,,0,7,s",
]) + "\n"


def test_rees46_mapping(tmp_path):
    errors: list = []
    events = list(read_events(write(tmp_path, "r.csv", REES46), "rees46", errors=errors))
    assert errors == []
    view, cart, purchase, removed = events
    assert view == {
        "event_id": event_id_for("rees46", 2, REES46.splitlines()[1].encode()),
        "type": "view", "user_id": "541312140", "item_id": "44600062", "ts": "2019-10-01T00:00:00Z",
        "price": 35.79, "category": "2103807459595387724", "session_id": "72d76fde",
        "context": {"brand": "shiseido"},
    }
    assert (cart["type"], cart["category"], cart["price"], cart["context"]) == (
        "cart", "appliances.environment.water_heater", 33.2, {"brand": "aqua"})
    assert purchase["type"] == "purchase"
    assert "session_id" not in purchase and "context" not in purchase  # empty session and brand: absent
    assert (removed["type"], removed["price"]) == ("remove_from_cart", 0.0)
    assert all(is_valid_event(e) for e in events)


def test_rees46_columns_found_by_header_name(tmp_path):
    cols = REES46_HEADER.split(",")
    order = list(reversed(range(len(cols))))
    lines = [",".join(cols[i] for i in order)]
    for line in REES46.splitlines()[1:]:
        f = line.split(",")
        lines.append(",".join(f[i] for i in order))
    reordered = list(read_events(write(tmp_path, "r.csv", "\n".join(lines)), "rees46"))
    original = list(read_events(write(tmp_path, "o.csv", REES46), "rees46"))
    # same events; the ids differ because they hash the raw line
    assert [dict(e, event_id=None) for e in reordered] == [dict(e, event_id=None) for e in original]
    assert len(reordered) == 4


def test_rees46_without_header_uses_the_standard_order(tmp_path):
    body = "\n".join(REES46.splitlines()[1:])
    events = list(read_events(write(tmp_path, "r.csv", body), "rees46"))
    assert [e["type"] for e in events] == ["view", "cart", "purchase", "remove_from_cart"]
    assert events[0]["event_id"] == event_id_for("rees46", 1, REES46.splitlines()[1].encode())


def test_rees46_quoted_fields(tmp_path):
    line = '2019-10-01 00:00:00 UTC,view,1,2,"a.b",\"acme, inc\",1.50,7,s'
    (e,) = read_events(write(tmp_path, "r.csv", REES46_HEADER + "\n" + line + "\n"), "rees46")
    assert (e["category"], e["context"], e["price"]) == ("a.b", {"brand": "acme, inc"}, 1.5)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("2019-10-01 00:00:00 UTC,view,1,2,,,1.0,7", "expected 9 columns, got 8"),
        ("2019-10-01 00:00:00 UTC,wishlist,1,2,,,1.0,7,s", 'unknown event_type "wishlist"'),
        ("2019-10-01T00:00:00Z,view,1,2,,,1.0,7,s", "is not 'YYYY-MM-DD HH:MM:SS UTC'"),
        ("2019-10-01 00:00:00 UTC,view,1,2,,,abc,7,s", 'price "abc" is not a number'),
        ("2019-10-01 00:00:00 UTC,view,1,2,,,nan,7,s", "not a finite number"),
        ("2019-10-01 00:00:00 UTC,view,1,2,,,1.0,,s", "empty user_id"),
        ("2019-10-01 00:00:00 UTC,view,,2,,,1.0,7,s", "empty product_id"),
    ],
)
def test_rees46_unmappable_rows_are_reported_with_line_numbers(tmp_path, line, fragment):
    good = "2019-10-01 00:00:00 UTC,view,1,2,,,1.0,7,s"
    text = "\n".join([REES46_HEADER, good, line, good]) + "\n"
    errors: list = []
    events = list(read_events(write(tmp_path, "r.csv", text), "rees46", errors=errors))
    assert len(events) == 2
    assert len(errors) == 1 and errors[0]["line"] == 3
    assert fragment in errors[0]["error"]


# --- Taobao -------------------------------------------------------------------------------------------
TAOBAO = "543462,1715,1464116,pv,1511658000\n1,2,3,cart,1511658001\n1,2,3,buy,1511658002\n1,2,3,fav,1511658003\n"


def test_taobao_mapping_of_every_behavior(tmp_path):
    events = list(read_events(write(tmp_path, "t.csv", TAOBAO), "taobao"))
    assert events[0] == {
        "event_id": event_id_for("taobao", 1, b"543462,1715,1464116,pv,1511658000"),
        "type": "view", "user_id": "543462", "item_id": "1715", "ts": 1_511_658_000_000, "category": "1464116",
    }
    assert [(e["type"], e.get("context")) for e in events] == [
        ("view", None), ("cart", None), ("purchase", None), ("view", {"behavior": "fav"})]
    assert all("price" not in e for e in events)
    assert all(is_valid_event(e) for e in events)


def test_taobao_header_is_recognised_and_is_line_1(tmp_path):
    text = "user_id,item_id,category_id,behavior_type,timestamp\n" + TAOBAO + "1,2,3,pv,soon\n"
    errors: list = []
    events = list(read_events(write(tmp_path, "t.csv", text), "taobao", errors=errors))
    assert len(events) == 4
    assert events[0]["event_id"] == event_id_for("taobao", 2, b"543462,1715,1464116,pv,1511658000")
    assert errors == [{"line": 6, "error": 'timestamp "soon" is not an integer (unix seconds)'}]


@pytest.mark.parametrize(
    "line, fragment",
    [("1,2,3,pv", "expected 5 columns, got 4"), ("1,2,3,like,1511658000", 'unknown behavior_type "like"'),
     (",2,3,pv,1511658000", "empty user_id"), ("1,,3,pv,1511658000", "empty item_id"),
     ("1,2,3,pv,1.5e9", "not an integer")],
)
def test_taobao_unmappable_rows(tmp_path, line, fragment):
    errors: list = []
    assert list(read_events(write(tmp_path, "t.csv", line + "\n"), "taobao", errors=errors)) == []
    assert errors[0]["line"] == 1 and fragment in errors[0]["error"]


# --- JSONL --------------------------------------------------------------------------------------------
def test_jsonl_passes_objects_through_unchanged_even_invalid_events(tmp_path):
    docs = [
        {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1", "ts": 1, "x": [1, {"y": None}]},
        {"user_id": "u2", "type": "teleport", "price": "abc"},  # invalid event v1, but has a key: replayed
    ]
    path = write(tmp_path, "e.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    assert list(read_events(path, "jsonl")) == docs


def test_jsonl_unmappable_lines_and_blank_lines(tmp_path):
    lines = [
        '{"user_id":"u1","event_id":"a"}',  # 1 ok
        "",  # 2 blank: not a row
        "not json",  # 3
        '["user_id"]',  # 4
        '{"event_id":"b"}',  # 5 no user_id
        '{"user_id":42}',  # 6 numeric user_id
        '{"user_id":""}',  # 7 empty
        "   ",  # 8 blank
        '{"user_id":"u9"}',  # 9 ok
    ]
    errors: list = []
    events = list(read_events(write(tmp_path, "e.jsonl", "\n".join(lines) + "\n"), "jsonl", errors=errors))
    assert [e["user_id"] for e in events] == ["u1", "u9"]
    assert [e["line"] for e in errors] == [3, 4, 5, 6, 7]
    assert "not a JSON object" in errors[0]["error"]
    assert "got list" in errors[1]["error"]
    assert all("user_id" in e["error"] for e in errors[2:])


def test_invalid_utf8_line_is_an_error_not_a_crash(tmp_path):
    path = write(tmp_path, "e.jsonl", b'{"user_id":"u1"}\n{"user_id":"\xff"}\n{"user_id":"u3"}\n')
    errors: list = []
    assert [e["user_id"] for e in read_events(path, "jsonl", errors=errors)] == ["u1", "u3"]
    assert errors == [{"line": 2, "error": "not valid UTF-8 at byte 12"}]


def test_crlf_line_endings(tmp_path):
    path = write(tmp_path, "t.csv", TAOBAO.replace("\n", "\r\n"))
    events = list(read_events(path, "taobao"))
    assert events == list(read_events(write(tmp_path, "u.csv", TAOBAO), "taobao"))


# --- ids, limits, errors, files -----------------------------------------------------------------------
def test_event_ids_are_deterministic_and_distinguish_identical_rows(tmp_path):
    path = write(tmp_path, "t.csv", "1,2,3,pv,1511658000\n1,2,3,pv,1511658000\n")
    first = [e["event_id"] for e in read_events(path, "taobao")]
    again = [e["event_id"] for e in read_events(path, "taobao")]
    assert first == again
    assert first[0] != first[1]
    assert all(i.startswith("taobao-") for i in first)


def test_sample_ids_are_unique_and_stable():
    ids = [e["event_id"] for e in read_events(SAMPLE, "rees46")]
    assert len(ids) == len(set(ids)) == 2000
    assert ids == [e["event_id"] for e in read_events(SAMPLE, "rees46")]


def test_limit_counts_source_rows_including_unmappable_ones(tmp_path):
    text = "1,2,3,pv,1511658000\n1,2,3,bad,1\n\n1,2,3,pv,1511658001\n1,2,3,pv,1511658002\n"
    path = write(tmp_path, "t.csv", text)
    errors: list = []
    events = list(read_events(path, "taobao", limit=3, errors=errors))
    assert [e["ts"] for e in events] == [1_511_658_000_000, 1_511_658_001_000]
    assert len(errors) == 1
    assert list(read_events(path, "taobao", limit=0)) == []


def test_without_an_errors_list_the_first_unmappable_row_raises(tmp_path):
    path = write(tmp_path, "t.csv", "1,2,3,pv,1511658000\n1,2,3,bad,1\n")
    it = read_events(path, "taobao")
    assert next(it)["user_id"] == "1"
    with pytest.raises(SourceError, match=r"t\.csv:2: unknown behavior_type"):
        next(it)


def test_missing_file_fails_at_call_time(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / "nope.csv", "rees46")


def test_unknown_format_and_negative_limit(tmp_path):
    path = write(tmp_path, "t.csv", TAOBAO)
    with pytest.raises(SourceError, match="unknown format 'parquet'"):
        read_events(path, "parquet")
    with pytest.raises(SourceError, match="limit must be >= 0"):
        read_events(path, "taobao", limit=-1)


def test_gzip_files_are_read_transparently(tmp_path):
    p = tmp_path / "t.csv.gz"
    with gzip.open(p, "wb") as f:
        f.write(TAOBAO.encode())
    assert list(read_events(p, "taobao")) == list(read_events(write(tmp_path, "t.csv", TAOBAO), "taobao"))


def test_reading_is_lazy(tmp_path):
    # a big file: taking the first event must not read it all (the generator is driven row by row)
    path = write(tmp_path, "big.csv", TAOBAO * 50_000)
    it = read_events(path, "taobao")
    assert next(it)["user_id"] == "543462"
    it.close()


# --- the bundled sample -------------------------------------------------------------------------------
def test_bundled_sample_maps_cleanly_to_valid_events():
    errors: list = []
    events = list(read_events(SAMPLE, "rees46", errors=errors))
    assert errors == [] and len(events) == 2000
    types = {t: sum(e["type"] == t for e in events) for t in ("view", "cart", "purchase")}
    assert types == {"view": 1621, "cart": 165, "purchase": 214}
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)  # time order kept
    for e in events:
        assert is_valid_event(e), e
    # lively: every user with a purchase or cart in the sample has all its rows (history intact)
    buyers = {e["user_id"] for e in events if e["type"] != "view"}
    assert len(buyers) == 242
