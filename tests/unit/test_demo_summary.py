"""The demo's live summary line reads the worker's own exposition (stream.metrics.parse_exposition)."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from stream.demo import summary
from stream.metrics import LATENCY_BUCKETS, parse_exposition


def test_summary_counts_decisions_by_kind_and_reads_latency_quantiles():
    reg = CollectorRegistry()
    events = Counter("promo_events", "", ["type"], registry=reg)
    decisions = Counter("promo_decisions", "", ["offer_kind", "group"], registry=reg)
    invalid = Counter("promo_events_invalid", "", ["reason"], registry=reg)
    by_trigger = Counter("promo_trigger_decisions", "", ["trigger", "offer_kind"], registry=reg)
    latency = Histogram("promo_decision_latency_seconds", "", buckets=LATENCY_BUCKETS, registry=reg)
    events.labels("view").inc(7)
    events.labels("cart").inc(3)
    invalid.labels("bad_json").inc(2)
    decisions.labels("coupon", "treatment").inc(2)
    decisions.labels("none", "treatment").inc(1)
    decisions.labels("none", "holdout").inc(1)
    by_trigger.labels("cart", "coupon").inc(3)
    by_trigger.labels("cart_abandonment", "none").inc(1)
    for seconds in (0.002, 0.002, 0.002, 0.3):
        latency.observe(seconds)

    s = summary(parse_exposition(generate_latest(reg).decode()))

    assert (s["events"], s["dlq"], s["duplicates"], s["decisions"], s["holdout"]) == (10, 2, 0, 4, 1)
    assert s["decisions_by_kind"] == {"coupon": 2, "none": 2}
    assert s["decisions_by_trigger"] == {"cart": 3, "cart_abandonment": 1}
    assert 1.0 <= s["latency_p50_ms"] <= 2.5  # inside the (1 ms, 2.5 ms] bucket
    assert 250.0 <= s["latency_p99_ms"] <= 500.0  # the one slow decision
