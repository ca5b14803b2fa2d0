"""What the checks feed and ask: a small deterministic event stream (:func:`events`), the decision contexts at its
carts and after its purchases (:func:`decision_contexts`), and the probes an object's fingerprint is read from
(profiles, decision contexts, items, all at :data:`NOW`, after the stream ends)."""

from __future__ import annotations

import math
import random
from typing import Any, Iterator

from models.events import Event
from models.policy.base import DecisionContext
from models.profile import Profile

T0 = 1_700_000_000_000
"""When the default stream starts (ms)."""

NOW = T0 + 300 * 90_000
"""When the probes ask (ms): no earlier than the last of the default 300 events (at most 90 s apart)."""

PROBE_ITEMS = ["i0", "i1", "i3", "i7", "never-seen-item"]

_EVENT_TYPES = ("view", "view", "view", "click", "cart", "purchase", "remove_from_cart")


def events(n: int = 300, seed: int = 7, n_users: int = 12, n_items: int = 25, t0: int = T0) -> list[Event]:
    """A small deterministic event stream (users browse a few items, some cart and buy), in time order.

    >>> len(events(50)), events(50) == events(50)
    (50, True)
    """
    rng = random.Random(seed)
    out = []
    ts = t0
    for i in range(n):
        ts += rng.randint(1, 90) * 1000
        user = f"u{rng.randrange(n_users)}"
        item = f"i{min(rng.randrange(n_items), rng.randrange(n_items))}"  # skewed popularity
        event_type = rng.choice(_EVENT_TYPES)
        out.append(Event(f"e{i}", event_type, user, item, ts, price=float(5 + int(item[1:]) * 3), quantity=1,
                         category=f"c{int(item[1:]) % 4}", session_id=f"s{user}-{ts // 1_800_000}"))
    return out


def batches(evs: list[Event], size: int = 40) -> Iterator[list[Event]]:
    """``evs`` in consecutive batches of ``size``, as the engine learns them."""
    for start in range(0, len(evs), size):
        yield evs[start : start + size]


def profiles_after(evs: list[Event], profiles: dict[str, Profile]) -> dict[str, Profile]:
    """Apply ``evs`` to the users' ``profiles`` (created as needed); the profiles of the users they touched."""
    touched = {}
    for event in evs:
        profile = profiles.setdefault(event.user_id, Profile())
        profile.apply(event)
        touched[event.user_id] = profile
    return touched


def feature_stream(evs: list[Event]) -> Iterator[tuple[dict[str, float], bool]]:
    """(features, label) pairs: a user's features at each event, label = a purchase later in the stream."""
    profiles: dict[str, Profile] = {}
    buyers = {e.user_id for e in evs if e.type == "purchase"}
    for event in evs:
        profile = profiles.setdefault(event.user_id, Profile())
        profile.apply(event)
        yield profile.features(event.ts), event.user_id in buyers


def decision_contexts(evs: list[Event]) -> list[tuple[DecisionContext, float]]:
    """A decision context at every cart of ``evs`` and after every purchase (trigger ``post_purchase``: policies
    that tell triggers apart learn both), the user's profile then, with a reward: what the policy would have earned
    (a purchase by the user later in the stream)."""
    profiles: dict[str, Profile] = {}
    last_purchase: dict[str, int] = {}
    for event in evs:
        if event.type == "purchase":
            last_purchase[event.user_id] = event.ts
    out = []
    for event in evs:
        prof = profiles.setdefault(event.user_id, Profile())
        prof.apply(event)
        if event.type not in ("cart", "purchase"):
            continue
        ctx = DecisionContext(event.user_id, event.ts, prof.cart_value, list(prof.cart), prof.cart_categories,
                              prof.is_new, prof.n_orders, int(event.item_id[1:]) % 3, prof.churn_risk,
                              (prof.counts.get("purchase", 0) + 1) / (prof.n_events + 10),
                              trigger="cart" if event.type == "cart" else "post_purchase")
        out.append((ctx, 4.0 if last_purchase.get(event.user_id, 0) > event.ts else 0.0))
    return out


def probe_profiles() -> list[Profile]:
    """Profiles to ask learning models about: new, one view, a cart, and a view of a never-seen item."""
    new = Profile()
    one_view = Profile()
    one_view.apply(Event("x1", "view", "probe", "i1", NOW - 1000, price=8.0, category="c1"))
    with_cart = Profile()
    for k, event_type in enumerate(("view", "cart", "view")):
        with_cart.apply(Event(f"x{k}", event_type, "probe2", f"i{k}", NOW - 5000 + k, price=11.0, category="c0"))
    unseen = Profile()
    unseen.apply(Event("x9", "view", "probe3", "never-seen-item", NOW - 10, category="never-seen-cat"))
    return [new, one_view, with_cart, unseen]


def probe_contexts() -> list[DecisionContext]:
    """Decision contexts to ask policies about: carts of growing value, new and returning users, then the moment
    after a purchase (an empty cart)."""
    carts = [DecisionContext(f"probe{i}", NOW, 30.0 + 25 * i, ["i1"], ["c1"], i % 2 == 0, i % 3, i % 3, 0.1 * i,
                             0.05 + 0.04 * i) for i in range(6)]
    return carts + [DecisionContext("probe6", NOW, 0.0, [], [], False, 2, 1, 0.3, 0.1, trigger="post_purchase")]


def rounded(x: Any) -> Any:
    """Fingerprints compare floats to 9 significant digits (Redis stores 17, Lua computes in doubles).

    >>> rounded({"p": [0.1 + 0.2, float("inf")], "n": 3})
    {'p': [0.3, 'inf'], 'n': 3}
    """
    if isinstance(x, float):
        return float(f"{x:.9g}") if math.isfinite(x) else repr(x)
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return x
