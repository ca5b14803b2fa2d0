"""Next-item baselines for the prequential evaluation (``promo evaluate stream``, ``baselines.<name>``).

Each baseline learns online from the event stream, one event at a time (:meth:`NextItemBaseline.learn_one`),
and proposes the next items of a user (:meth:`NextItemBaseline.recommend`). The evaluator
(:mod:`models.evaluation.prequential`) asks all of them, the engine and the popularity baseline at the same
points, before the event is learnt (predict-then-learn, no look-ahead), with the same exclusion: the item the
user is looking at now (the user's previous item) is never proposed — the protocol never asks for it (a repeat
of the current item is not a prediction task), so excluding it only frees one slot, for every method alike.

Baselines (after session-rec, Ludewig et al., "Empirical analysis of session-based recommendation algorithms",
UMUAI 2021, ``rn5l/session-rec``):

* :class:`RecentItems` (``recent``): the user's most recent distinct items, most recent first (people come back
  to items they viewed). Across sessions.
* :class:`ItemKNN` (``item_knn``): items that co-occur in sessions with the last item of the user's current
  session, by cosine of the binary session-item vectors, regularised as session-rec's ``ItemKNN``:
  ``c_ij / ((n_i + lmbd) ** alpha * (n_j + lmbd) ** (1 - alpha))`` (``n`` = sessions with the item). Learnt
  online, the counts include the user's ongoing session (as the engine's item statistics include the user's own
  window), so the session's earlier items rank among the neighbours of the last one: on the REES46 slice about
  half of its hits are such returns to an item of the session (a session-rec model, trained on other sessions,
  has no such reminder).
* :class:`VSKNN` (``vsknn``): session-rec's V-SKNN (``knn/vsknn.py``): the ``sample_size`` most recent past
  sessions sharing an item with the current session, the ``k`` most similar of them (dot product of the current
  session's linearly position-weighted items with the neighbour's item set), each voting for its items with
  ``similarity / step`` (``step``: 1-based position from the end of the most recent current item it shares).
* :class:`SequentialRules` (``sr``): session-rec's ``SR``: within a session, item ``a`` followed by ``b`` at
  distance ``d <= steps`` adds ``1 / d`` to the rule ``a -> b``; recommendations are the rules of the last item.

The item-based baselines propose nothing from what they have not seen (no popularity fill, as in session-rec),
so they measure the method alone; their lists can be shorter than ``k``.

Sessions (:class:`Sessions`) follow :class:`models.profile.Profile`: a new session on a new ``session_id`` or after
:attr:`Profile.SESSION_GAP_MS` (30 minutes) of inactivity. A session is a sequence of items with consecutive
repeats collapsed (reloading the item being looked at adds nothing), like the profile's recent items; every
event type counts. The "current session" when recommending is the session of the user's latest event.

Bounds (memory and time stay flat on long logs): a session keeps its last ``max_session_len`` (50) items;
``recent`` keeps 50 items per user; ``item_knn`` keeps at most ``max_neighbours`` (200) co-occurring items per
item and ``sr`` at most ``max_rules`` (100) rules per item (the weakest are pruned when twice that is reached);
``vsknn`` keeps the ``max_sessions`` (100,000) most recently started sessions and, per item, the
``sample_size + 1`` most recent sessions holding it (enough for the most-recent sample, besides the asking
session itself). Users hold one session each, as the evaluator holds one profile each.

Departures from session-rec, all small: sessions are built online and include the ongoing sessions of other
users; V-SKNN's linear weights are ``max(0, 1 - 0.1 p)`` for the item ``p`` places before the last (session-rec
gives those weights for sessions of up to 10 items, and 0 to positions past 10), and a revisited item takes the
position of its latest visit; the ``vec`` similarity is not divided by the session length (a constant per
query, it does not change the ranking); item-kNN counts sessions, not events, for the item supports.

Examples
--------
>>> from models.events import Event
>>> evs = [Event(f"e{i}", "view", u, it, 60_000 * i) for i, (u, it) in enumerate(
...     [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b")])]
>>> models = make_baselines()
>>> for e in evs:
...     for m in models.values():
...         m.learn_one(e)
>>> {name: m.recommend("u2", 3, exclude={"b"}) for name, m in models.items()}
{'recent': ['a'], 'item_knn': ['a', 'c'], 'vsknn': ['a', 'c'], 'sr': ['c']}
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable

from models.events import Event
from models.profile import Profile

__all__ = ["NextItemBaseline", "RecentItems", "ItemKNN", "VSKNN", "SequentialRules", "Sessions", "make_baselines"]

NEW, REVISIT, REPEAT = "new", "revisit", "repeat"


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _keep_largest(scores: dict, n: int) -> None:
    """Keep the ``n`` largest values of ``scores`` in place (a bounded neighbour or rule map)."""
    keep = heapq.nlargest(n, scores.items(), key=lambda kv: kv[1])
    scores.clear()
    scores.update(keep)


def _top(scores: dict[str, float], k: int, exclude: Collection[str]) -> list[str]:
    """The ``k`` best-scored items not in ``exclude``, best first; ties by item id (deterministic)."""
    if k <= 0 or not scores:
        return []
    best = heapq.nsmallest(k + len(exclude), scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [item for item, _ in best if item not in exclude][:k]


class _Session:
    """One session: an id (a counter), the source ``session_id`` (``""`` when absent), the last event time and the
    items, most recent last, consecutive repeats collapsed."""

    __slots__ = ("sid", "key", "last_ts", "items")

    def __init__(self, sid: int, key: str, ts: int):
        self.sid, self.key, self.last_ts, self.items = sid, key, ts, []


class Sessions:
    """Each user's current session, decided as :class:`models.profile.Profile` decides it.

    Parameters
    ----------
    gap_ms
        Inactivity that starts a new session (events without ``session_id``, or with the same one).
    max_session_len
        Items kept per session (the oldest go first).

    Examples
    --------
    >>> s = Sessions(gap_ms=1_000)
    >>> [s.observe(Event(str(i), "view", "u", it, ts))[1] for i, (it, ts) in enumerate(
    ...     [("a", 0), ("a", 10), ("b", 20), ("a", 30), ("a", 5_000)])]
    ['new', 'repeat', 'new', 'revisit', 'new']
    >>> s.current("u").sid, s.current("u").items
    (1, ['a'])
    """

    def __init__(self, gap_ms: int = Profile.SESSION_GAP_MS, max_session_len: int = 50):
        self.gap_ms = _check_int("gap_ms", gap_ms, 0)
        self.max_session_len = _check_int("max_session_len", max_session_len, 2)
        self._by_user: dict[str, _Session] = {}
        self._next_sid = 0

    def current(self, user: str) -> _Session | None:
        """The session of the user's latest event (``None`` before the first)."""
        return self._by_user.get(user)

    def observe(self, e: Event) -> tuple[_Session, str]:
        """Add ``e`` to its user's session (a new one if due). Returns the session and whether the item is
        ``"new"`` to it, a ``"revisit"`` of an earlier item, or a ``"repeat"`` of the latest item (not added)."""
        s = self._by_user.get(e.user_id)
        key = e.session_id or ""
        if s is None or e.ts - s.last_ts > self.gap_ms or (key and key != s.key):
            s = self._by_user[e.user_id] = _Session(self._next_sid, key, e.ts)
            self._next_sid += 1
        s.last_ts = max(s.last_ts, e.ts)
        items = s.items
        if items and items[-1] == e.item_id:
            return s, REPEAT
        status = REVISIT if e.item_id in items else NEW
        items.append(e.item_id)
        if len(items) > self.max_session_len:
            del items[0]
        return s, status


class NextItemBaseline:
    """Base class: an online next-item recommender, learning from one event at a time.

    Subclasses set :attr:`name` and implement :meth:`learn_one` and :meth:`recommend`.
    """

    name: str = ""

    def learn_one(self, event: Event) -> None:
        """Learn from one event (after it was predicted)."""
        raise NotImplementedError

    def recommend(self, user: str, k: int, exclude: Collection[str] = ()) -> list[str]:
        """Up to ``k`` item ids for ``user``'s next event, best first, none in ``exclude``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class RecentItems(NextItemBaseline):
    """The user's most recent distinct items, most recent first.

    Parameters
    ----------
    size
        Distinct items kept per user.

    Examples
    --------
    >>> m = RecentItems()
    >>> for i, it in enumerate("abcb"):
    ...     m.learn_one(Event(str(i), "view", "u", it, i))
    >>> m.recommend("u", 5), m.recommend("u", 5, exclude={"b"}), m.recommend("nobody", 5)
    (['b', 'c', 'a'], ['c', 'a'], [])
    """

    name = "recent"

    def __init__(self, size: int = 50):
        self.size = _check_int("size", size, 1)
        self._items: dict[str, list[str]] = {}  # user -> distinct items, most recent last

    def learn_one(self, event: Event) -> None:
        items = self._items.setdefault(event.user_id, [])
        if items and items[-1] == event.item_id:
            return
        if event.item_id in items:
            items.remove(event.item_id)
        items.append(event.item_id)
        if len(items) > self.size:
            del items[0]

    def recommend(self, user: str, k: int, exclude: Collection[str] = ()) -> list[str]:
        out: list[str] = []
        for item in reversed(self._items.get(user, ())):
            if len(out) >= k:
                break
            if item not in exclude:
                out.append(item)
        return out


class ItemKNN(NextItemBaseline):
    """Items that co-occur in sessions with the last item of the user's current session (session-rec ItemKNN).

    Parameters
    ----------
    lmbd
        Support regularisation (discounts incidental co-occurrences of rare items).
    alpha
        0.5: cosine; 1.0: confidence of the rule ``last -> j``.
    max_neighbours
        Co-occurring items kept per item (the least frequent are pruned when twice this is reached).
    sessions
        Session tracking (default: :class:`Sessions`).

    Examples
    --------
    >>> m = ItemKNN(lmbd=0.0)
    >>> for i, (u, it) in enumerate([("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a"),
    ...                              ("u3", "c"), ("u4", "a")]):
    ...     m.learn_one(Event(str(i), "view", u, it, i))
    >>> m.recommend("u4", 5)
    ['b', 'c']
    """

    name = "item_knn"

    def __init__(self, lmbd: float = 20.0, alpha: float = 0.5, max_neighbours: int = 200,
                 sessions: Sessions | None = None):
        if not lmbd >= 0:
            raise ValueError(f"lmbd must be >= 0, got {lmbd!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.lmbd = float(lmbd)
        self.alpha = float(alpha)
        self.max_neighbours = _check_int("max_neighbours", max_neighbours, 1)
        self._sessions = sessions or Sessions()
        self._support: dict[str, int] = {}  # item -> sessions holding it
        self._co: dict[str, dict[str, int]] = {}  # item -> item -> sessions holding both

    def learn_one(self, event: Event) -> None:
        s, status = self._sessions.observe(event)
        if status != NEW:
            return
        b = event.item_id
        self._support[b] = self._support.get(b, 0) + 1
        co_b = self._co.setdefault(b, {})
        for a in set(s.items[:-1]):
            co_a = self._co.setdefault(a, {})
            co_a[b] = co_a.get(b, 0) + 1
            co_b[a] = co_b.get(a, 0) + 1
            if len(co_a) >= 2 * self.max_neighbours:
                self._prune(co_a)
        if len(co_b) >= 2 * self.max_neighbours:
            self._prune(co_b)

    def _prune(self, nbrs: dict[str, int]) -> None:
        _keep_largest(nbrs, self.max_neighbours)

    def recommend(self, user: str, k: int, exclude: Collection[str] = ()) -> list[str]:
        s = self._sessions.current(user)
        if s is None or not s.items:
            return []
        last = s.items[-1]
        nbrs = self._co.get(last)
        if not nbrs:
            return []
        support, lmbd, alpha = self._support, self.lmbd, self.alpha
        norm_a = (support[last] + lmbd) ** alpha
        scores = {j: c / (norm_a * (support[j] + lmbd) ** (1.0 - alpha) or 1.0) for j, c in nbrs.items()}
        return _top(scores, k, exclude)


class VSKNN(NextItemBaseline):
    """V-SKNN: vector multiplication session kNN (session-rec ``knn/vsknn.py``, linear position weights).

    Parameters
    ----------
    k
        Neighbour sessions that vote.
    sample_size
        Most recent past sessions, among those sharing an item with the current session, searched for neighbours.
    max_sessions
        Sessions kept (the earliest started go first).
    sessions
        Session tracking (default: :class:`Sessions`).

    Examples
    --------
    >>> m = VSKNN()
    >>> for i, (u, it) in enumerate([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "x"), ("u2", "b"),
    ...                              ("u2", "y"), ("u3", "a"), ("u3", "b")]):
    ...     m.learn_one(Event(str(i), "view", u, it, i))
    >>> m.recommend("u3", 3, exclude={"a", "b"})  # u1 shares a and b with u3, u2 only b
    ['c', 'x', 'y']
    """

    name = "vsknn"

    def __init__(self, k: int = 100, sample_size: int = 500, max_sessions: int = 100_000,
                 sessions: Sessions | None = None):
        self.k = _check_int("k", k, 1)
        self.sample_size = _check_int("sample_size", sample_size, 1)
        self.max_sessions = _check_int("max_sessions", max_sessions, 1)
        self._sessions = sessions or Sessions()
        self._items: dict[int, set[str]] = {}  # session -> its items, in the order sessions started
        self._time: dict[int, int] = {}  # session -> last event time
        self._by_item: dict[str, dict[int, None]] = {}  # item -> sessions holding it (ordered set)

    def learn_one(self, event: Event) -> None:
        s, status = self._sessions.observe(event)
        sid = s.sid
        items = self._items.get(sid)
        if items is None:
            items = self._items[sid] = set()
            if len(self._items) > self.max_sessions:
                self._forget(next(iter(self._items)))
        self._time[sid] = s.last_ts
        if status != NEW or event.item_id in items:
            return
        items.add(event.item_id)
        holders = self._by_item.setdefault(event.item_id, {})
        holders[sid] = None
        if len(holders) > 2 * self.sample_size + 1:  # keep one more than the sample: the asking session's own
            recent = heapq.nlargest(self.sample_size + 1, holders, key=self._time.__getitem__)
            holders.clear()
            holders.update(dict.fromkeys(sorted(recent, key=self._time.__getitem__)))

    def _forget(self, sid: int) -> None:
        for item in self._items.pop(sid):
            holders = self._by_item.get(item)
            if holders is not None:
                holders.pop(sid, None)
                if not holders:
                    del self._by_item[item]
        self._time.pop(sid, None)

    def recommend(self, user: str, k: int, exclude: Collection[str] = ()) -> list[str]:
        s = self._sessions.current(user)
        if s is None or not s.items:
            return []
        # distinct items, most recent first (a revisited item at its latest position), linear weights
        current = list(dict.fromkeys(reversed(s.items)))
        weight = {item: max(0.0, 1.0 - 0.1 * p) for p, item in enumerate(current)}
        candidates: set[int] = set()
        for item in current:
            candidates.update(self._by_item.get(item, ()))
        candidates.discard(s.sid)
        if len(candidates) > self.sample_size:
            candidates = heapq.nlargest(self.sample_size, candidates, key=self._time.__getitem__)
        sims = []
        for sid in candidates:
            n_items = self._items[sid]
            sim = sum(w for item, w in weight.items() if w > 0.0 and item in n_items)
            if sim > 0.0:
                sims.append((sim, sid))
        scores: dict[str, float] = {}
        for sim, sid in heapq.nlargest(self.k, sims, key=lambda t: (t[0], -t[1])):
            n_items = self._items[sid]
            step = next(p for p, item in enumerate(current, 1) if item in n_items)
            vote = sim / step
            for item in n_items:
                scores[item] = scores.get(item, 0.0) + vote
        return _top(scores, k, exclude)


class SequentialRules(NextItemBaseline):
    """Sequential rules (session-rec ``SR``): ``a -> b`` when ``b`` follows ``a`` in a session, weight ``1 / d``.

    Parameters
    ----------
    steps
        Largest distance ``d`` between ``a`` and ``b`` that makes a rule.
    max_rules
        Rules kept per item (the weakest are pruned when twice this is reached).
    sessions
        Session tracking (default: :class:`Sessions`).

    Examples
    --------
    >>> m = SequentialRules()
    >>> for i, (u, it) in enumerate([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"),
    ...                              ("u3", "a")]):
    ...     m.learn_one(Event(str(i), "view", u, it, i))
    >>> m.recommend("u3", 5)  # b follows a twice at distance 1, c once at distance 2
    ['b', 'c']
    """

    name = "sr"

    def __init__(self, steps: int = 10, max_rules: int = 100, sessions: Sessions | None = None):
        self.steps = _check_int("steps", steps, 1)
        self.max_rules = _check_int("max_rules", max_rules, 1)
        self._sessions = sessions or Sessions()
        self._rules: dict[str, dict[str, float]] = {}

    def learn_one(self, event: Event) -> None:
        s, status = self._sessions.observe(event)
        if status == REPEAT:
            return
        b = event.item_id
        items = s.items
        for d in range(1, min(self.steps, len(items) - 1) + 1):
            rules = self._rules.setdefault(items[-1 - d], {})
            rules[b] = rules.get(b, 0.0) + 1.0 / d
            if len(rules) >= 2 * self.max_rules:
                _keep_largest(rules, self.max_rules)

    def recommend(self, user: str, k: int, exclude: Collection[str] = ()) -> list[str]:
        s = self._sessions.current(user)
        if s is None or not s.items:
            return []
        return _top(self._rules.get(s.items[-1], {}), k, exclude)


def make_baselines(names: Iterable[str] | None = None) -> dict[str, NextItemBaseline]:
    """The evaluator's baselines with their default parameters, by name (``recent``, ``item_knn``, ``vsknn``,
    ``sr``); ``names`` picks some of them.

    >>> list(make_baselines())
    ['recent', 'item_knn', 'vsknn', 'sr']
    >>> make_baselines(["sr"])
    {'sr': SequentialRules(steps=10, max_rules=100)}
    """
    classes = {c.name: c for c in (RecentItems, ItemKNN, VSKNN, SequentialRules)}
    names = list(classes) if names is None else list(names)
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {sorted(classes)}")
    return {n: classes[n]() for n in names}
