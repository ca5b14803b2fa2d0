"""Bad input at the live worker (issue 6, acceptance 3): never a crash, never a silent drop.

:data:`N_BAD` hypothesis-generated bad messages (arbitrary bytes, invalid UTF-8, tombstones, wrong JSON types,
huge strings, oversized messages, deep nesting, NaN/Infinity and 1e999, negative or absurd prices and
quantities, ancient and future timestamps, unknown types, missing fields, lone surrogates, non-objects) are
generated up front (``derandomize=True``: the same stream every run) and each is checked to be rejected by
:func:`stream.validation.decode_event` (with ``now`` one hour ahead, so a "future" timestamp stays in the
future for the whole run), so the expected count is exact. They are interleaved at random (seeded) with
:data:`N_VALID` real REES46 events, produced as one stream to a live worker, and:

* exactly :data:`N_BAD` DLQ records arrive, each with a reason from the fixed set and a non-empty error; the
  records' original bytes and reasons are exactly those generated (as multisets);
* the valid events are each counted once (profile counts in Redis, one marker each, ``promo_events_total``);
* ``/readyz`` (polled every 50 ms in a background thread) never answers anything but 200 after the worker was
  first ready, and the worker process never exits.
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings as hsettings, strategies as st

from models.events import EVENT_TYPES
from stream.dlq import DLQ_REASONS, raw_from_record
from stream.sources import read_events
from stream.validation import REASONS, InvalidEvent, Limits, decode_event
from tests.helpers import DATA, consume_all, event_bytes, metric, produce_raw, wait_until
from tests.redis_state import dump_state, profile_counts

pytestmark = pytest.mark.integration

REES46 = DATA / "rees46_multicategory" / "2019-Oct_first17k.csv"
N_BAD = 5_000
N_VALID = 5_000
SEED = 3
HOUR_MS = 3_600_000

TEMPLATE = {
    "event_id": "fuzz-template", "type": "cart", "user_id": "512475445", "item_id": "1004856",
    "ts": "2019-10-01T00:00:05Z", "price": 130.76, "quantity": 1, "category": "electronics.smartphone",
    "session_id": "aa3a5bd4-1f42-4c1d-8a94-7d3c7e2c1a0b", "context": {"brand": "samsung"},
}
REQUIRED = ("event_id", "type", "user_id", "item_id", "ts")
STRING_FIELDS = ("event_id", "user_id", "item_id", "category", "session_id", "order_id", "decision_id")
MIN_TS = Limits().min_ts_ms


# --- strategies: each draws (kafka key, message value) ------------------------------------------------------
def _dumps(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode("utf-8", "surrogatepass")


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=8,
)
keys = st.one_of(st.none(), st.just(TEMPLATE["user_id"].encode()), st.binary(min_size=1, max_size=16))


@st.composite
def wrong_type(draw):
    """One field of a valid event replaced by a value of the wrong JSON type (or null for a required one)."""
    doc = dict(TEMPLATE, event_id=f"wt-{draw(st.integers(0, 10**9))}")
    name = draw(st.sampled_from(REQUIRED + ("price", "quantity", "context") + STRING_FIELDS[3:]))
    if name in ("price", "quantity"):
        value = draw(json_values.filter(lambda v: not isinstance(v, (int, float)) or isinstance(v, bool)))
    elif name == "context":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict) and v is not None)
                     | st.dictionaries(st.text(max_size=8), st.lists(json_scalars, max_size=2) | st.booleans()
                                       | st.none(), min_size=1, max_size=3))
    elif name == "ts":
        value = draw(json_values.filter(lambda v: not isinstance(v, (int, str)) or isinstance(v, bool)))
    else:
        value = draw(json_values.filter(lambda v: not isinstance(v, str)))
    doc[name] = value
    return _dumps(doc)


@st.composite
def huge_string(draw):
    """A string field (or a context value / key) longer than max_string_len, or a whole oversized message."""
    doc = dict(TEMPLATE, event_id=f"hs-{draw(st.integers(0, 10**9))}")
    where = draw(st.sampled_from(STRING_FIELDS + ("type", "context value", "context key", "oversized")))
    ch = draw(st.sampled_from("xé€𝄞"))
    width = len(_dumps(ch)) - 2  # bytes per character once JSON-escaped (ensure_ascii)
    if where == "oversized":  # the whole message over max_event_bytes (16 KiB), up to 40 KB
        doc["pad"] = ch * (draw(st.integers(16_400, 40_000)) // width)
    else:  # over max_string_len (256 characters), the message under 16 KiB or not
        s = ch * draw(st.integers(257, 3000))
        if where == "context value":
            doc["context"] = {"brand": s}
        elif where == "context key":
            doc["context"] = {s: 1}
        elif where == "type":
            doc["type"] = s  # an unknown type, however long
        else:
            doc[where] = s
    return _dumps(doc)


@st.composite
def deep_nesting(draw):
    """Arrays/objects nested a few to thousands deep, at the top level or as a field value (depths around
    Python's recursion limit included: the validator's explicit nesting limit makes the reason independent of
    the caller's stack)."""
    depth = draw(st.integers(2, 7000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = opener * depth + draw(st.sampled_from(["1", "null", '"x"', "[]", "{}"])) + closer * depth
    if draw(st.booleans()):
        return inner.encode()
    field = draw(st.sampled_from(["context", "price", "ts", "user_id", "quantity", "extra_context"]))
    if field == "extra_context":
        return _dumps(dict(TEMPLATE, event_id="dn", context={"k": 0}))[:-2] + b',"n":' + inner.encode() + b"}}"
    body = _dumps({k: v for k, v in TEMPLATE.items() if k != field} | {"event_id": f"dn-{depth}"})
    return body[:-1] + f',"{field}":'.encode() + inner.encode() + b"}"


@st.composite
def non_finite(draw):
    """NaN / Infinity literals and overflowing numbers (1e999 parses to inf) in numeric fields."""
    field = draw(st.sampled_from(["price", "quantity", "ts", "context"]))
    lit = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]))
    eid = f"nf-{draw(st.integers(0, 10**9))}"
    body = _dumps({k: v for k, v in TEMPLATE.items() if k != field} | {"event_id": eid})[:-1]
    if field == "context":
        return body + b',"context":{"score":' + lit.encode() + b"}}"
    return body + f',"{field}":{lit}}}'.encode()


@st.composite
def absurd_amount(draw):
    """Negative or absurd price, quantity out of 1..max or not integral."""
    doc = dict(TEMPLATE, event_id=f"aa-{draw(st.integers(0, 10**9))}")
    if draw(st.booleans()):
        doc["price"] = draw(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)
                            | st.floats(min_value=1_000_000.5, allow_nan=False, allow_infinity=False)
                            | st.integers(max_value=-1) | st.integers(min_value=1_000_001))
    else:
        doc["quantity"] = draw(st.integers(max_value=0) | st.integers(min_value=10_001)
                               | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()))
    return _dumps(doc)


@st.composite
def bad_timestamp(draw, now_ms: int):
    """Ancient (before 2000), future (more than a day and an hour ahead), or unparsable timestamps."""
    doc = dict(TEMPLATE, event_id=f"ts-{draw(st.integers(0, 10**9))}")
    kind = draw(st.sampled_from(["ancient", "future", "string", "garbage"]))
    if kind == "ancient":
        doc["ts"] = draw(st.integers(max_value=MIN_TS - 1))
    elif kind == "future":
        doc["ts"] = draw(st.integers(min_value=now_ms + 86_400_000 + 2 * HOUR_MS, max_value=2**70))
    elif kind == "string":
        y = draw(st.integers(1, 1999) | st.integers(2200, 9999))
        doc["ts"] = f"{y:04d}-{draw(st.integers(1, 12)):02d}-{draw(st.integers(1, 28)):02d}T00:00:00Z"
    else:
        doc["ts"] = draw(st.sampled_from(["2019-13-01T00:00:00Z", "2019-02-30T00:00:00Z", "yesterday",
                                          "2019-10-01 25:00:00", "1569888000", "2019-10-01T00:00:00+25:00"])
                         | st.text(min_size=1, max_size=30))
    return _dumps(doc)


@st.composite
def unknown_type(draw):
    t = draw(st.text(min_size=1, max_size=40).filter(lambda s: s not in EVENT_TYPES)
             | st.sampled_from(["View", "CART", "buy", "pv", "fav", "view ", " purchase"]))
    return _dumps(dict(TEMPLATE, event_id=f"ut-{draw(st.integers(0, 10**9))}", type=t))


@st.composite
def missing_field(draw):
    name = draw(st.sampled_from(REQUIRED))
    doc = dict(TEMPLATE, event_id=f"mf-{draw(st.integers(0, 10**9))}")
    del doc[name]
    if draw(st.booleans()):
        doc[name] = draw(st.sampled_from([None, ""]))
    return _dumps(doc)


@st.composite
def broken_bytes(draw):
    """Invalid UTF-8 inside valid-looking JSON, a BOM, truncated JSON, lone surrogates, non-objects."""
    body = _dumps(dict(TEMPLATE, event_id=f"bb-{draw(st.integers(0, 10**9))}"))
    kind = draw(st.sampled_from(["utf8", "bom", "truncate", "surrogate", "not_object", "tombstone"]))
    if kind == "utf8":
        i = draw(st.integers(0, len(body)))
        return body[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])) + body[i:]
    if kind == "bom":
        return b"\xef\xbb\xbf" + body
    if kind == "truncate":
        return body[: draw(st.integers(0, len(body) - 1))]
    if kind == "surrogate":
        field = draw(st.sampled_from(["user_id", "item_id", "event_id", "category"]))
        return body.replace(f'"{field}":"'.encode(), f'"{field}":"\\ud800'.encode(), 1)
    if kind == "not_object":
        return _dumps(draw(st.lists(json_values, max_size=3) | json_scalars.filter(lambda v: not (
            isinstance(v, float) and not math.isfinite(v)))))
    return None


def bad_messages(now_ms: int):
    return st.tuples(keys, st.one_of(
        st.binary(max_size=300), wrong_type(), huge_string(), deep_nesting(), non_finite(), absurd_amount(),
        bad_timestamp(now_ms), unknown_type(), missing_field(), broken_bytes(),
    )).map(lambda kv: (kv[0] or b"tombstone", None) if kv[1] is None else kv)  # Kafka needs a key or a value


def generate_bad(n: int, limits: Limits) -> list[tuple[bytes | None, bytes | None, str]]:
    """``n`` distinct generated (key, value, expected reason); only values ``decode_event`` rejects are kept.

    The check runs after generation, outside hypothesis: hypothesis raises the recursion limit while it runs a
    test function, which would let deeply nested JSON parse here that the worker cannot parse."""
    check_now = time.time_ns() // 1_000_000 + HOUR_MS  # rejected an hour from now => rejected during the run
    drawn: dict = {}  # value -> key, distinct values in generation order

    @hsettings(max_examples=int(n * 1.6), derandomize=True, database=None, phases=[Phase.generate],
               deadline=None, suppress_health_check=list(HealthCheck))
    @given(bad_messages(check_now))
    def collect(msg):
        key, value = msg
        if len(drawn) < int(n * 1.2):
            drawn.setdefault(value, key)

    collect()
    out, accepted = [], 0
    for value, key in drawn.items():
        try:
            decode_event(value, limits, check_now)
        except InvalidEvent as exc:
            out.append((key, value, exc.reason))
        else:
            accepted += 1
    assert len(out) >= n, f"only {len(out)} distinct rejected messages generated ({accepted} were valid)"
    return out[:n]


def _brief(c: Counter, n: int = 3) -> str:
    return "; ".join(f"{reason} <- {raw[:80]!r}{'...' if raw and len(raw) > 80 else ''} ({len(raw or b'')} bytes)"
                     for raw, reason in list(c)[:n])


def wait_count(count, n: int, timeout: float, what: str, worker) -> None:
    """Wait until ``count() >= n``; on timeout say how far it got and show the worker's log."""
    last: list = [None]

    def reached():
        assert worker.proc.poll() is None, f"the worker exited:\n{worker.log_tail()}"
        last[0] = count()
        return last[0] >= n

    try:
        wait_until(reached, timeout, what, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; got {last[0]} of {n}\n--- worker log ---\n{worker.log_tail(15)}") from None


def test_thousands_of_bad_events_go_to_the_dlq_and_the_valid_ones_count_once(engine_settings, start_worker,
                                                                             redis_client):
    s = engine_settings
    t0 = time.monotonic()
    bad = generate_bad(N_BAD, Limits.from_settings(s))
    t_gen = time.monotonic() - t0
    reasons = Counter(reason for _, _, reason in bad)
    print(f"[fuzz] generated {len(bad)} bad messages in {t_gen:.1f}s: {dict(reasons)}", file=sys.stderr)
    assert set(reasons) <= set(REASONS)
    assert len(reasons) == len(REASONS), f"every rejection reason must be exercised, got {dict(reasons)}"

    valid = list(read_events(REES46, "rees46", limit=N_VALID))
    assert len(valid) == N_VALID and len({e["event_id"] for e in valid}) == N_VALID
    rng = random.Random(SEED)
    slots = sorted(rng.sample(range(N_BAD + N_VALID), N_BAD))  # positions of the bad messages in the stream
    stream: list[tuple[bytes | None, bytes | None]] = []
    vi = bi = 0
    bad_at = set(slots)
    for pos in range(N_BAD + N_VALID):
        if pos in bad_at:
            stream.append(bad[bi][:2])
            bi += 1
        else:
            e = valid[vi]
            stream.append((e["user_id"].encode(), event_bytes(e)))
            vi += 1

    worker = start_worker(s)
    worker.wait_ready()
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll_readyz():
        while not stop.is_set():
            statuses.append((time.monotonic(), worker.ready_status()))
            stop.wait(0.05)  # polling period of the probe, not synchronisation

    poller = threading.Thread(target=poll_readyz, daemon=True)
    poller.start()
    try:
        t1 = time.monotonic()
        for i in range(0, len(stream), 2000):
            produce_raw(s, s.topic_events, stream[i : i + 2000])
        r = redis_client
        wait_count(lambda: sum(1 for _ in r.scan_iter(match=f"{s.redis_prefix}:{{u:*}}:e:*", count=5000)),
                   N_VALID, 180, "every valid event to be applied (markers in Redis)", worker)
        wait_count(lambda: metric(worker.metrics(), "promo_events_invalid_total"), N_BAD, 120,
                   "promo_events_invalid_total", worker)
        samples = worker.metrics()
        dlq = consume_all(s, s.topic_dlq, lambda ms: len(ms) >= N_BAD, timeout=120)
        t_run = time.monotonic() - t1
    finally:
        stop.set()
        poller.join(5)
    assert worker.proc.poll() is None, f"the worker exited:\n{worker.log_tail()}"

    # /readyz was 200 at every poll --------------------------------------------------------------------------
    bad_polls = [(round(t - t1, 2), st_) for t, st_ in statuses if st_ != 200]
    assert len(statuses) > 20, "the readiness poller did not run"
    assert not bad_polls, f"/readyz was not 200 during the run (s since start, status): {bad_polls[:10]}"

    # exactly N_BAD DLQ records, each the generated bytes with the expected reason ------------------------------
    late = consume_all(s, s.topic_dlq, lambda ms: len(ms) > N_BAD, timeout=3)  # nothing beyond N_BAD arrives
    assert len(dlq) == N_BAD and len(late) == N_BAD, (len(dlq), len(late))
    docs = [json.loads(m.value) for m in dlq]
    for d in docs:
        assert d["reason"] in DLQ_REASONS and d["error"], d
        assert d["topic"] == s.topic_events and d["offset"] >= 0 and not d.get("raw_truncated"), d
    got = Counter((raw_from_record(d), d["reason"]) for d in docs)
    want = Counter((value, reason) for _, value, reason in bad)
    missing, unexpected = want - got, got - want
    assert not missing and not unexpected, (
        f"DLQ records differ from the generated bad messages: {sum(missing.values())} missing, "
        f"{sum(unexpected.values())} unexpected; e.g. missing {_brief(missing)}, unexpected {_brief(unexpected)}"
    )
    assert metric(samples, "promo_events_invalid_total") == N_BAD
    for reason, n in reasons.items():
        assert metric(samples, "promo_events_invalid_total", reason=reason) == n, reason

    # the valid events counted once ----------------------------------------------------------------------------
    want_counts: dict[str, Counter] = {}
    for e in valid:
        want_counts.setdefault(e["user_id"], Counter())[e["type"]] += 1
    state = dump_state(redis_client, s.redis_prefix)
    assert profile_counts(state) == want_counts
    assert sum(1 for k in state if ":e:" in k) == N_VALID
    assert metric(samples, "promo_events_total") == N_VALID
    assert metric(samples, "promo_events_duplicate_total") == 0
    print(f"[fuzz] {N_BAD} bad + {N_VALID} valid processed in {t_run:.1f}s; {len(statuses)} /readyz polls all 200",
          file=sys.stderr)
