"""The user profile: RFM, decayed affinities, price level, sessions, loyalty, churn risk; exact Redis round trip."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.events import EVENT_TYPES, Event
from models.profile import DAY_MS, Profile
from models.profile_features import FEATURE_NAMES, CategoryStats

MIN = 60_000


def ev(i, t, item="i1", ts=0, **kw):
    return Event(f"e{i}", t, "u1", item, ts, **kw)


def fold(events) -> Profile:
    p = Profile()
    for e in events:
        p.apply(e)
    return p


def test_sessions_split_on_idle_gap_and_new_session_id():
    p = fold([ev(1, "view", ts=0), ev(2, "cart", ts=5 * MIN, price=10.0, quantity=2), ev(3, "view", ts=20 * MIN)])
    assert (p.n_sessions, p.session_events, p.session_carts, p.session_cart_value) == (1, 3, 1, 20.0)
    assert p.session_ms == 20 * MIN
    p.apply(ev(4, "view", ts=20 * MIN + Profile.SESSION_GAP_MS + 1))  # idle > 30 min: new session
    assert (p.n_sessions, p.session_events, p.session_carts) == (2, 1, 0)
    p.apply(ev(5, "view", ts=60 * MIN, session_id="s2"))  # a new session id: new session
    p.apply(ev(6, "view", ts=61 * MIN, session_id="s2"))
    assert (p.n_sessions, p.session_events, p.session_id) == (3, 2, "s2")


def test_affinities_decay_and_stay_bounded():
    p = Profile()
    for k in range(Profile.TOP_ITEMS + 15):
        p.apply(ev(k, "view", item=f"i{k}", ts=k * 1000, category=f"c{k}"))
    assert len(p.item_aff) == Profile.TOP_ITEMS and len(p.cat_aff) == Profile.TOP_CATEGORIES
    assert "i0" not in p.item_aff and f"i{Profile.TOP_ITEMS + 14}" in p.item_aff  # the oldest went first
    q = fold([ev(1, "view", item="a", ts=0, category="x"),
              ev(2, "view", item="a", ts=Profile.AFFINITY_HALF_LIFE_MS, category="x")])
    assert q.item_aff["a"][0] == pytest.approx(1.5)  # 1 decayed by one half-life + 1
    # a purchase weighs more than views: it becomes the top category
    q.apply(ev(3, "purchase", item="b", ts=Profile.AFFINITY_HALF_LIFE_MS, category="y", price=5.0))
    assert q.top_categories(1) == ["y"]


def test_price_level_against_category_reference():
    stats = CategoryStats()
    for price in (100.0, 100.0):
        stats.update("tv", price)
    rich = fold([ev(1, "view", ts=0, price=400.0, category="tv")])
    cheap = fold([ev(1, "view", ts=0, price=25.0, category="tv")])
    assert math.exp(rich.price_level(stats)) == pytest.approx(4.0)
    assert math.exp(cheap.price_level(stats)) == pytest.approx(0.25)
    assert rich.price_level(None) == 0.0
    assert fold([ev(1, "view", ts=0, category="tv")]).price_level(stats) == 0.0  # no price: unknown


def test_churn_risk_follows_the_users_own_rhythm():
    regular = fold([ev(k, "purchase", ts=k * DAY_MS, price=1.0) for k in range(4)])  # buys daily
    assert regular.purchase_gap_ms == pytest.approx(DAY_MS)
    now = 3 * DAY_MS
    assert regular.churn_risk_at(now) == 0.0
    assert regular.churn_risk_at(now + 3 * DAY_MS) > 0.9  # 3 rhythms without a purchase
    monthly = fold([ev(k, "purchase", ts=k * 30 * DAY_MS, price=1.0) for k in range(2)])
    assert monthly.churn_risk_at(30 * DAY_MS + 3 * DAY_MS) < 0.2  # 3 days is nothing for a monthly buyer
    assert Profile().churn_risk == 0.0


def test_loyalty_grows_with_orders_and_tenure():
    new = fold([ev(1, "view", ts=0)])
    one = fold([ev(1, "view", ts=0), ev(2, "purchase", ts=1, price=1.0)])
    many = fold([ev(k, "purchase", ts=k * 10 * DAY_MS, price=1.0) for k in range(6)])
    assert 0.0 == new.loyalty < one.loyalty < many.loyalty < 1.0


def test_order_lines_count_once_and_rfm():
    p = fold([ev(1, "purchase", item="a", ts=1000, price=10.0), ev(2, "purchase", item="b", ts=1000, price=5.0)])
    assert (p.n_orders, p.spend, p.counts["purchase"]) == (1, 15.0, 2)
    f = p.features(1000 + 3_600_000)
    assert f["recency_h"] == pytest.approx(math.log1p(1.0)) and f["n_orders"] == 1.0


def test_features_are_finite_and_complete():
    p = fold([ev(1, "view", ts=0, price=3.0, category="c"), ev(2, "cart", ts=MIN, price=3.0, category="c"),
              ev(3, "remove_from_cart", ts=2 * MIN)])
    f = p.features(3 * MIN, CategoryStats())
    assert list(f) == list(FEATURE_NAMES) and len(p.feature_values(0)) == len(FEATURE_NAMES)
    assert all(isinstance(v, float) and math.isfinite(v) for v in f.values())
    assert f["cart_items"] == 0.0 and f["last_is_cart"] == 0.0
    late = p.features(3 * MIN + 2 * Profile.SESSION_GAP_MS)  # the session is over: session features are 0
    assert late["session_events"] == 0.0 and late["since_last_event_min"] > f["since_last_event_min"]


events_st = st.lists(
    st.builds(
        lambda i, t, item, dt, price, q, cat, sid: (t, f"i{item}", dt, price, q, cat, sid),
        st.integers(), st.sampled_from(EVENT_TYPES), st.integers(0, 5), st.integers(0, 4 * 3_600_000),
        st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False)), st.integers(1, 5),
        st.one_of(st.none(), st.sampled_from(["a", "b", "c"])), st.one_of(st.none(), st.sampled_from(["s1", "s2"])),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(events_st)
def test_apply_is_deterministic_and_round_trips_exactly(rows):
    events = []
    ts = 1_700_000_000_000
    for k, (t, item, dt, price, q, cat, sid) in enumerate(rows):
        ts += dt
        events.append(Event(f"e{k}", t, "u", item, ts, price=price, quantity=q, category=cat, session_id=sid))
    a, b = fold(events), fold(events)
    assert a.to_redis() == b.to_redis()
    again = Profile.from_redis({k.encode(): v.encode() for k, v in a.to_redis().items()})
    assert again == a and again.to_redis() == a.to_redis()
    assert len(a.item_aff) <= Profile.TOP_ITEMS and len(a.cat_aff) <= Profile.TOP_CATEGORIES
    assert all(math.isfinite(v) for v in a.features(ts + 1).values())


def test_unknown_redis_fields_are_ignored():
    p = Profile.from_redis({b"from_the_future": b"1", b"n_orders": b"2"})
    assert p.n_orders == 2 and p.counts["view"] == 0


def test_from_dict_reads_both_the_plain_and_the_earlier_text_encoding():
    import json

    from models.events import Event

    p = Profile()
    for i, t in enumerate(["view", "cart", "purchase", "view"]):
        p.apply(Event(f"e{i}", t, "u", f"i{i % 2}", 1_700_000_000_000 + i * 60_000, price=12.5, category="c"))
    plain = json.loads(json.dumps(p.to_dict()))  # what RedisStore keeps: one JSON document
    assert Profile.from_dict(plain) == p
    assert Profile.from_dict(p.to_redis()) == p  # profiles written by earlier versions (values as text)
    assert Profile.from_dict({}) == Profile()


def test_a_profile_stored_with_the_earlier_window_field_name_keeps_its_window():
    """Profiles in Redis written before the field was renamed (``win``) keep the user's co-occurrence window."""
    window = [["i2", 2_000, 1.0], ["i1", 1_000, 1.0]]
    for stored in ({"n_orders": 2, "win": window}, {"n_orders": "2", "win": '[["i2",2000,1.0],["i1",1000,1.0]]'}):
        p = Profile.from_dict(stored)
        assert p.item_window == window and p.n_orders == 2
        assert "win" not in p.to_dict() and p.to_dict()["item_window"] == window
