"""The learning core: what the engine calls once per batch, and asks at decision time.

Design
------
:class:`LearningCore` owns everything that learns from the event stream, except the profiles (the engine folds
events into :class:`models.profile.Profile` and writes them to Redis atomically per user):

* **item similarity**: per-user recent windows (:class:`models.learning.similarity.UserWindows`, in worker memory, a
  user always maps to one partition hence one worker) and the numba kernel turn a batch into aggregated pair
  and item increments, applied to the :class:`models.state.item_store.ItemStore` in ONE call (one Redis pipeline).
  In the live worker the engine sets ``items_via_commit``: each user's commit writes that user's increments
  (:mod:`models.learning.contrib`, exact across crashes and removable by ``promo forget``) and this step is skipped;
* **category price reference** (:class:`models.profile_features.CategoryStats`) for the profiles' price level;
* **purchase propensity** with delayed labels (:attr:`LearningCore.purchase_model`, a
  :class:`models.learning.delayed_labels.DelayedLabelLearner`) and a frequency baseline, scored prequentially
  (River ``ROCAUC`` / ``LogLoss``: :meth:`LearningCore.quality`);
* **segments** (:class:`models.learning.segments.ProfileSegments`): fixed lifecycle rules on the profile's features,
  the same on every worker (nothing is learnt; kept here for the interface).

Per batch (:meth:`LearningCore.learn_batch`): events are de-duplicated and in partition order; ``profiles``
are the users' profiles AFTER the batch. River is not called per event: a user has at most one **decision
point** per batch, at most one per ``sample_gap_ms`` of event time, with ``decision_points="milestones"``
(default) only at a cart or at the 2nd, 4th, 8th, ... event of a session, with ``"batch"`` at every batch of the
user (:mod:`models.learning.decision_points`). A decision point's features are :mod:`models.learning.features`.
A batch's points are observed first, with the features and predictions the engine served at them (counts and model
before the batch); then its purchases label the users' pending points, and the watermark (the engine's event-time
clock; offline, the largest event time seen) expires points older than the horizon as negatives. Segments count
every ``segment_every``-th point (they learn nothing: their rules are fixed).

Decision time: :meth:`recommend` (from :meth:`prefetch_items`' reads), :meth:`propensity` and :meth:`segment` read
only (no learning).

Snapshots: :meth:`snapshot` pickles the models, windows, pending points and category stats with the Kafka
offsets they cover (``{(topic, partition): next offset}`` or any picklable dict); :meth:`restore` puts them
back and returns the offsets to resume from. The item store is included only when it lives in memory (Redis
holds its own). :mod:`models.learning.snapshot` keeps the bytes under ONE Redis key and reads snapshots written
before the package layout changed.

Forgetting users: :meth:`held_users` lists every user id the in-memory state holds (windows, decision points
with their features, last decision-point times; nothing else holds ids), :meth:`forget_users` drops them, and
:func:`models.learning.snapshot.scrub_snapshot` does the same to the snapshot stored in Redis (``promo forget``).

Examples
--------
>>> from models.events import Event
>>> from models.profile import Profile
>>> core = LearningCore(horizon_h=1.0)
>>> events = [Event("e1", "view", "u1", "a", 1_000), Event("e2", "view", "u1", "b", 2_000),
...           Event("e3", "view", "u2", "a", 3_000), Event("e4", "cart", "u2", "b", 4_000)]
>>> profiles = {}
>>> for e in events:
...     profiles.setdefault(e.user_id, Profile()).apply(e)
>>> core.learn_batch(events, profiles)
>>> core.recommend(Profile(recent_items=["a"]), 2)
['b']
>>> 0.0 < core.propensity(profiles["u1"], 4_000) < 1.0, core.segment(profiles["u1"]) in range(6)
(True, True)
>>> offsets = core.restore(core.snapshot({("promo.events", 0): 4}))
>>> offsets
{('promo.events', 0): 4}
"""

from __future__ import annotations

import gc
import time

import numpy as np

from models.events import Event
from models.state.item_memory import MemoryItemStore
from models.state.item_store import ItemBatch, ItemReads, ItemStore
from models.profile import EVENT_WEIGHTS, Profile
from models.profile_features import CategoryStats
from models.learning.conversion import ConversionRates
from models.learning.decision_points import batch_decision_points
from models.learning.delayed_labels import DelayedLabelLearner
from models.learning.features import DEFAULT_CONTEXT_KEYS, MODEL_FEATURE_NAMES, context_features, model_values
from models.learning.propensity import FrequencyPropensity, PurchasePropensity
from models.learning.recommend import reads_needed, recommend as _recommend
from models.learning.segments import ProfileSegments
from models.learning.similarity import ItemVocab, UserWindows, aggregate_items, count_pairs
from models.learning.snapshot import core_snapshot, forget_users_in, restore_core

__all__ = ["LearningCore", "WORKER_LABELS_PER_BATCH", "tune_gc"]

WORKER_LABELS_PER_BATCH = 1000
"""The worker's :attr:`LearningCore.labels_per_batch`: about 17 ms of learning at most per batch (labels cost about
17 us each), and a backlog of 26k closes within 26 batches."""

HOUR_MS = 3_600_000


def _batch_users(events: list[Event]) -> tuple[dict[str, Event], dict[str, int], set[str]]:
    """Each user's last event of the batch but removals, events per user, and the users with a cart: what the
    batch's decision points are chosen by (:func:`models.learning.decision_points.batch_decision_points`)."""
    last: dict[str, Event] = {}
    seen: dict[str, int] = {}
    carts: set[str] = set()
    for e in events:
        u = e.user_id
        seen[u] = seen.get(u, 0) + 1
        if e.type == "remove_from_cart":
            continue
        if e.type == "cart":
            carts.add(u)
        last[u] = e
    return last, seen, carts


class LearningCore:
    """Facade over similarity, propensity and segments (see the module docstring).

    Parameters
    ----------
    store
        Item similarity store (default: a new :class:`MemoryItemStore`).
    horizon_h
        H of "purchase within H hours".
    window_width, window_ms
        Items in a user's recent window, and the largest time between two co-occurring events.
    max_users
        Users whose windows are kept (least recently used evicted beyond).
    sample_gap_ms
        Minimum event time between two decision points of one user. ``None`` (default): one sixth of the
        horizon, at most a minute, so a short horizon still sees the moments just before a purchase (with
        a 3-minute horizon a one-minute gap skips a third of them).
    decision_points
        ``milestones`` (carts and the 2nd, 4th, 8th, ... event of a session) or ``batch`` (every batch).
    n_segments, segment_every
        Segments (at most 6, :mod:`models.learning.segments`), and pass every n-th decision point to the
        segments' ``learn_one`` (which only counts it).
    max_pending
        Decision points waiting for a label.
    keep_predictions
        Keep every scored ``(label, engine p, baseline p)`` (offline evaluation).
    recommend_options
        Keyword arguments of :func:`models.learning.recommend.recommend`.
    propensity_options
        Keyword arguments of :class:`models.learning.propensity.PurchasePropensity`.
    context_keys
        Event ``context`` keys whose string values become one-hot features (low-cardinality ones: channel,
        device, ...); numeric context values are always features.
    seed
        Kept for compatibility (the segments, which it seeded, are deterministic rules now).
    labels_per_batch
        Decision points whose horizon closes that one batch learns at most (None: all). When the event-time
        clock jumps, tens of thousands may close at once: 26k took 0.45 s in one batch. The worker caps them
        (:data:`WORKER_LABELS_PER_BATCH`) so that no batch's learning holds its event loop that long; the rest
        close in the next batches, with the same labels.
    """

    labels_per_batch: int | None = None  # a core unpickled from before the parameter existed: no cap

    def __init__(
        self,
        store: ItemStore | None = None,
        *,
        horizon_h: float = 1.0,
        window_width: int = 8,
        window_ms: int = HOUR_MS,
        max_users: int = 200_000,
        sample_gap_ms: int | None = None,
        decision_points: str = "milestones",
        n_segments: int = 6,
        segment_every: int = 16,
        max_pending: int = 200_000,
        keep_predictions: bool = False,
        recommend_options: dict | None = None,
        propensity_options: dict | None = None,
        context_keys: frozenset[str] | set[str] = DEFAULT_CONTEXT_KEYS,
        seed: int = 0,
        labels_per_batch: int | None = None,
    ) -> None:
        if horizon_h <= 0:
            raise ValueError(f"horizon_h must be > 0 hours, got {horizon_h}")
        if labels_per_batch is not None and labels_per_batch < 1:
            raise ValueError(f"labels_per_batch must be at least 1 (or None: no cap), got {labels_per_batch}")
        self.labels_per_batch = labels_per_batch
        self.store = store if store is not None else MemoryItemStore()
        self.horizon_h = float(horizon_h)
        self.window_width = window_width
        self.window_ms = int(window_ms)
        self.max_users = max_users
        if sample_gap_ms is None:
            sample_gap_ms = min(60_000, int(self.horizon_h * HOUR_MS) // 6)
        self.sample_gap_ms = int(sample_gap_ms)
        if decision_points not in ("milestones", "batch"):
            raise ValueError(f"decision_points must be 'milestones' or 'batch', got {decision_points!r}")
        self.decision_points = decision_points
        self.n_segments = n_segments
        self.segment_every = max(1, segment_every)
        self.max_pending = max_pending
        self.keep_predictions = keep_predictions
        self.recommend_options = dict(recommend_options or {})
        self.propensity_options = dict(propensity_options or {})
        self.context_keys = frozenset(context_keys)
        self.seed = seed
        self.items_via_commit = False  # set by the engine when users' commits carry their item contributions
        self._reset_local()

    def reset(self) -> None:
        """Forget everything learnt, the item store included (shared by every worker when it is Redis)."""
        self.store.clear()
        self._reset_local()

    def _reset_local(self) -> None:
        """Fresh in-memory models; the item store is left as it is (a worker joining must not wipe it)."""
        self.vocab = ItemVocab()
        self.windows = UserWindows(self.max_users, self.window_width)
        self.stats = CategoryStats()
        self.item_conv = ConversionRates(max_keys=self.max_users)
        self.cat_conv = ConversionRates(max_keys=self.max_users)
        self.purchase_model = DelayedLabelLearner(
            horizon_ms=int(self.horizon_h * HOUR_MS),
            model=PurchasePropensity(feature_names=MODEL_FEATURE_NAMES, **self.propensity_options),
            baseline=FrequencyPropensity(), max_pending=self.max_pending,
            keep_predictions=self.keep_predictions,
        )
        self.segments = ProfileSegments(self.n_segments, seed=self.seed)
        self.last_sample: dict[str, int] = {}
        self._last_sample_purge = 0
        self.watermark = 0
        self.n_events = 0
        self.n_batches = 0
        self.timings = {"similarity_s": 0.0, "store_s": 0.0, "models_s": 0.0}

    def clone(self) -> "LearningCore":
        """A fresh core with the same parameters and an empty in-memory store of the same configuration."""
        return LearningCore(
            MemoryItemStore(self.store.config), horizon_h=self.horizon_h, window_width=self.window_width,
            window_ms=self.window_ms, max_users=self.max_users, sample_gap_ms=self.sample_gap_ms,
            decision_points=self.decision_points, n_segments=self.n_segments, segment_every=self.segment_every,
            max_pending=self.max_pending,
            keep_predictions=self.keep_predictions, recommend_options=self.recommend_options,
            propensity_options=self.propensity_options, context_keys=self.context_keys, seed=self.seed,
            labels_per_batch=self.labels_per_batch,
        )

    # --- learning ---------------------------------------------------------------------------------
    def learn_batch(self, events: list[Event], profiles: dict[str, Profile], watermark: int | None = None) -> None:
        """Learn from one batch (de-duplicated, partition order); ``profiles``: the users' profiles AFTER it.

        ``watermark``: the event time the purchase labels close by, the engine's clock (robust to an event far
        ahead, held back by a lagging partition: :mod:`models.clock`); None, the latest event time seen, which
        only a replay in time order can use (one event stamped years ahead would close every later point as a
        negative the moment it is made)."""
        if not events:
            return
        t0 = time.perf_counter()
        n = len(events)
        if self.items_via_commit:  # the engine wrote the item statistics in the users' commits
            batch_ts = max(e.ts for e in events)
            t1 = t2 = time.perf_counter()
        else:
            batch = self.item_batch(events)
            batch_ts = batch.ts
            t1 = time.perf_counter()
            self.store.apply(batch)
            t2 = time.perf_counter()
        # --- decision points, then category price reference, conversion counts and purchase labels ---------
        # the points first: their features and predictions are those the engine served at them, made before this
        # batch's events were counted and its labels learnt (a point is a user's last event of the batch, so no
        # purchase of this batch can label it)
        self._observe_decision_points(*_batch_users(events), profiles)
        self._learn_events(events)
        mark = batch_ts if watermark is None else watermark
        if mark > self.watermark:
            self.watermark = mark
        self.purchase_model.advance(self.watermark, self.labels_per_batch)
        self.n_events += n
        self.n_batches += 1
        t3 = time.perf_counter()
        tm = self.timings
        tm["similarity_s"] += t1 - t0
        tm["store_s"] += t2 - t1
        tm["models_s"] += t3 - t2

    def _observe_decision_points(self, last: dict[str, Event], seen: dict[str, int], carts: set[str],
                                 profiles: dict[str, Profile]) -> None:
        """Record the batch's decision points (:func:`models.learning.decision_points.batch_decision_points`)
        with the features and predictions of now; the segments count every ``segment_every``-th one."""
        model = self.purchase_model
        last_sample = self.last_sample
        points = batch_decision_points(last, seen, carts, profiles, last_sample, self.sample_gap_ms,
                                       self.decision_points == "milestones")
        for u, e, prof in points:
            values = self._served_values(prof, e.ts)
            model.observe_values(u, e.ts, values, context_features(e.context, self.context_keys),
                                 model.baseline.predict_profile(prof))
            last_sample[u] = e.ts
            if model.n_observed % self.segment_every == 0:
                self.segments.learn_one(dict(zip(MODEL_FEATURE_NAMES, values)))
        if len(last_sample) > 2 * self._last_sample_purge + 10_000:  # drop times too old to hold a point back
            limit = self.watermark - self.sample_gap_ms
            self.last_sample = {u: t for u, t in last_sample.items() if t >= limit}
            self._last_sample_purge = len(self.last_sample)

    def _served_values(self, prof: Profile, ts: int) -> list[float]:
        """The dense features the engine served a decision at ``ts`` with: a decision made at that event was
        recorded in the profile (``n_decisions``) after its features were computed."""
        if prof.n_decisions and prof.last_decision_ts == ts:
            prof.n_decisions -= 1
            try:
                return model_values(prof, ts, self.stats, self.item_conv, self.cat_conv)
            finally:
                prof.n_decisions += 1
        return model_values(prof, ts, self.stats, self.item_conv, self.cat_conv)

    def _learn_events(self, events: list[Event]) -> None:
        """What depends on the events alone: category prices, conversion counts, purchase labels."""
        stats_update = self.stats.update
        model = self.purchase_model
        iev, ipur = self.item_conv.events, self.item_conv.purchases
        cev, cpur, ccart = self.cat_conv.events, self.cat_conv.purchases, self.cat_conv.carts
        n_conv = n_pur = n_cat = n_cat_pur = n_cat_cart = 0
        for e in events:
            etype = e.type
            if etype == "remove_from_cart":
                continue
            item, cat = e.item_id, e.category
            if e.price and cat:
                stats_update(cat, e.price)
            iev[item] = iev.get(item, 0) + 1
            n_conv += 1
            if cat:
                cev[cat] = cev.get(cat, 0) + 1
                n_cat += 1
            if etype == "purchase":
                ipur[item] = ipur.get(item, 0) + 1
                if cat:
                    cpur[cat] = cpur.get(cat, 0) + 1
                    n_cat_pur += 1
                n_pur += 1
                model.purchase(e.user_id, e.ts)
            elif etype == "cart" and cat:
                ccart[cat] = ccart.get(cat, 0) + 1
                n_cat_cart += 1
        self.item_conv.add_totals(n_conv, n_pur)
        self.cat_conv.add_totals(n_cat, n_cat_pur, n_cat_cart)

    def relearn(self, events: list[Event], watermark: int | None = None) -> None:
        """Learn again from events a previous worker applied after the snapshot these models were restored from
        (they come back only as duplicates): category prices, conversion counts and the purchase labels of
        pending decision points (without them those points would expire as negatives). No new decision points
        (they need each profile as it was then) and no item statistics (the users' commits hold them).
        ``watermark`` as :meth:`learn_batch`'s."""
        if not events:
            return
        self._learn_events(events)
        mark = max(e.ts for e in events) if watermark is None else watermark
        if mark > self.watermark:
            self.watermark = mark
        # capped as in learn_batch: a restart after a long pause closes many labels at once, and this runs in the
        # worker's event loop before the partition's first batch; what is left closes in the next batches
        self.purchase_model.advance(self.watermark, self.labels_per_batch)
        self.n_events += len(events)

    def item_batch(self, events: list[Event]) -> ItemBatch:
        """The batch's aggregated item and pair increments (advances the users' windows; no store write)."""
        n = len(events)
        weights = np.fromiter((EVENT_WEIGHTS.get(e.type, 0.0) for e in events), np.float64, n)
        ts = np.fromiter((e.ts for e in events), np.int64, n)
        items = self.vocab.index([e.item_id for e in events])
        slots = self.windows.slots_for([e.user_id for e in events])
        a, b, inc = count_pairs(slots, items, ts, weights, self.windows, self.window_ms)
        ui, uw = aggregate_items(items, weights)
        ids = self.vocab.ids
        return ItemBatch(
            ts=int(ts.max()), items=[ids[i] for i in ui.tolist()], item_inc=uw.tolist(),
            pair_a=[ids[i] for i in a.tolist()], pair_b=[ids[i] for i in b.tolist()], pair_inc=inc.tolist(),
        )

    # --- decision time --------------------------------------------------------------------------------
    def features(self, profile: Profile, now_ms: int, context: dict | None = None) -> dict[str, float]:
        """Model features (:mod:`models.learning.features`): the profile's, the log-odds of purchase of the current
        item and category (learnt from past events), and ``context`` (numbers as ``ctx_<key>``, strings of
        :attr:`context_keys` one-hot as ``ctx_<key>=<value>``)."""
        x = dict(zip(MODEL_FEATURE_NAMES, model_values(profile, now_ms, self.stats, self.item_conv, self.cat_conv)))
        ctx = context_features(context, self.context_keys)
        if ctx:
            x.update(ctx)
        return x

    def recommend(self, profile: Profile, k: int, now_ms: int | None = None,
                  reads: ItemReads | None = None) -> list[str]:
        """Up to ``k`` items for the user, best first (:func:`models.learning.recommend.recommend`), read from
        ``reads`` (:meth:`prefetch_items`) or else from the item store."""
        now = now_ms if now_ms is not None else (profile.last_ts or self.watermark)
        return _recommend(profile.recent_items, k, reads if reads is not None else self.store, now,
                          **self.recommend_options)

    async def prefetch_items(self, seeds: list[str], k: int) -> ItemReads:
        """What recommendations of ``k`` items from ``seeds`` read, fetched now; pass it to :meth:`recommend`."""
        n_candidates, popular_k = reads_needed(k, **self.recommend_options)
        return await self.store.prefetch(seeds, n_candidates, popular_k)

    def propensity(self, profile: Profile, now_ms: int, context: dict | None = None) -> float:
        """P(the user buys within H hours of ``now_ms``)."""
        return self.purchase_model.predict_proba(self.features(profile, now_ms, context))

    def segment(self, profile: Profile, now_ms: int | None = None) -> int:
        """The user's segment, ``0 .. n_segments - 1`` (:mod:`models.learning.segments`: fixed rules on the
        profile's own features, nothing a worker learnt). Taken at ``now_ms``, by default at the profile's last
        event, so every worker gives a profile the same segment (the policy's shared cells are keyed by it)."""
        now = now_ms if now_ms is not None else (profile.last_ts or self.watermark)
        return self.segments.predict_one(profile.features(now))

    def quality(self) -> dict[str, float]:
        """Online (prequential) quality of the propensity model and its baseline, and label counts.

        Keys: ``auc``, ``logloss`` (engine), ``base_auc``, ``base_logloss`` (frequency baseline),
        ``labels``, ``positives``, ``pending``, ``dropped``. AUC and log loss are NaN before the first label.
        """
        model = self.purchase_model
        q = model.quality()
        q.update(labels=model.n_labels, positives=model.n_positive, pending=len(model), dropped=model.n_dropped)
        return q

    # --- forgetting users -------------------------------------------------------------------------------
    def held_users(self) -> set[str]:
        """Every user id the in-memory state holds (what a snapshot would carry): recent windows, decision
        points (open, or labelled and waiting for their horizon, with their features) and the time of the last
        decision point. Segments, conversion counts, category prices and the models hold no user id.

        >>> from models.events import Event
        >>> from models.profile import Profile
        >>> core = LearningCore(horizon_h=1.0, decision_points="batch")
        >>> evs = [Event("e1", "view", "u1", "a", 1_000), Event("e2", "view", "u2", "b", 2_000)]
        >>> core.learn_batch(evs, {e.user_id: Profile() for e in evs})
        >>> sorted(core.held_users())
        ['u1', 'u2']
        >>> core.forget_users(["u1"]), sorted(core.held_users()), len(core.purchase_model)
        (1, ['u2'], 1)
        """
        return set(self.windows.slot) | self.purchase_model.users() | set(self.last_sample)

    def forget_users(self, users) -> int:
        """Drop ``users`` from every in-memory per-user structure (see :meth:`held_users`); their decision
        points are dropped unlearnt. Returns how many of them were held."""
        return forget_users_in(self.windows, self.purchase_model, self.last_sample, users)

    # --- snapshots ----------------------------------------------------------------------------------------
    def snapshot(self, offsets: dict) -> bytes:
        """The learnt state and the offsets it covers, as bytes (:func:`models.learning.snapshot.core_snapshot`)."""
        return core_snapshot(self, offsets)

    def restore(self, data: bytes) -> dict:
        """Load a :meth:`snapshot`; returns the offsets it covers. Raises ``ValueError`` on a bad snapshot."""
        return restore_core(self, data)


def tune_gc(gen0_threshold: int = 50_000) -> tuple[int, int, int]:
    """Garbage-collector settings for a long-running worker with a large heap (call once, after start-up).

    Collects and freezes what exists (imports, restored models: never scanned again) and runs the young
    collection every ``gen0_threshold`` allocations instead of 700, so full collections over hundreds of
    thousands of long-lived objects (pending decision points, windows, vocabularies) stop dominating the
    per-event cost. Returns the new thresholds.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, 20, 100)
    return gc.get_threshold()
