"""Every Prometheus metric the engine exports, in one place.

Names: ``promo_`` prefix, base units, ``_total`` for counters, no user or item ids in labels.
Each worker process has one :data:`REGISTRY`; ``/metrics`` serves it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

from models.metrics import MetricsSink

disable_created_metrics()  # no *_created series: they double the exposition and nothing reads them

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# --- ingestion (contract names) ---------------------------------------------------------------
EVENTS = Counter("promo_events", "Valid events applied, after de-duplication", ["type"], registry=REGISTRY)
EVENTS_INVALID = Counter(
    "promo_events_invalid", "Invalid messages sent to the dead-letter topic", ["reason"], registry=REGISTRY
)
EVENTS_DUPLICATE = Counter(
    "promo_events_duplicate", "Events skipped because their event_id was already applied", registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "promo_batch_size",
    "Messages per processed batch",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "promo_batch_duration_seconds",
    "Time to process one batch until it may be acknowledged (receipt to delivered; learning runs behind it, "
    "see promo_batch_stage_seconds{stage=\"learn\"})",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
BATCH_STAGE_SECONDS = Histogram(
    "promo_batch_stage_seconds",
    "Time of one stage of a batch: decide (log check, decode, load, plan, reserve, commit), send (decisions "
    "acknowledged by the broker), delivered (stale reservations released, decisions marked as sent), learn "
    "(contributions applied, models taught; behind the next batch's decisions with PROMO_LEARN_BEHIND)",
    ["stage"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
EVENT_LAG = Gauge(
    "promo_event_time_lag_seconds", "Wall clock minus event time of the last applied event", registry=REGISTRY
)
LAST_EVENT = Gauge(
    "promo_last_event_timestamp_seconds", "Wall-clock time the worker last applied an event", registry=REGISTRY
)

# --- decisions (contract names) ---------------------------------------------------------------
DECISIONS = Counter(
    "promo_decisions", "Decisions sent", ["offer_kind", "group"], registry=REGISTRY
)
DECISION_LATENCY = Histogram(
    "promo_decision_latency_seconds",
    "Event receipt to decision sent",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
DECISIONS_RESENT = Counter(
    "promo_decisions_resent", "Stored decisions re-sent because their trigger was redelivered, or a crash left a "
    "timer-fired one unsent", registry=REGISTRY
)
TRIGGER_DECISIONS = Counter(
    "promo_trigger_decisions", "Decisions sent per trigger (models.triggers: cart, post_purchase, retention, "
    "cart_abandonment, browse_abandonment) and offer kind", ["trigger", "offer_kind"], registry=REGISTRY
)
TIMERS_DROPPED = Counter(
    "promo_timers_dropped", "Due timers that fired no decision: the trigger is off now, or no longer applied "
    "(the cart was emptied, the trigger's cooldown or daily cap)", ["trigger"], registry=REGISTRY
)
SWEEP_SECONDS = Histogram(
    "promo_sweep_duration_seconds", "One expiry sweep: windows closed, timers fired, their decisions sent",
    registry=REGISTRY,
)

# --- worker health ----------------------------------------------------------------------------
READY = Gauge("promo_worker_ready", "1 when the worker is ready (Redis up, partitions assigned)", registry=REGISTRY)
ASSIGNED_PARTITIONS = Gauge("promo_assigned_partitions", "Partitions of the events topic assigned", registry=REGISTRY)
REDIS_ERRORS = Counter("promo_redis_errors", "Redis operations that failed and were retried", registry=REGISTRY)
TRANSIENT_ERRORS = Counter(
    "promo_transient_errors",
    "Transient infrastructure errors the batch loop retried, by component (redis, kafka) and kind "
    "(stream.faults.KINDS: connection, timeout, oom, busy, loading, readonly, ...)",
    ["component", "kind"], registry=REGISTRY,
)
LOG_RESETS = Counter(
    "promo_log_resets",
    "Partitions whose log the broker lost and that were consumed again from the new log's start "
    "(stream.logguard)", registry=REGISTRY,
)
COMPONENT_UP = Gauge(
    "promo_dependency_up", "1 when the dependency answers and no batch step is retrying against it",
    ["component"], registry=REGISTRY,
)


def _init_fault_series() -> None:
    """Export every (component, kind) of the transient-error counter from the start, at 0, so that rates and
    dashboards work before the first fault (label values are fixed: stream.faults.COMPONENTS and KINDS)."""
    from stream.faults import COMPONENTS, KINDS

    for comp in COMPONENTS:
        COMPONENT_UP.labels(component=comp)
        for kind in KINDS:
            TRANSIENT_ERRORS.labels(component=comp, kind=kind)


_init_fault_series()
FORGOTTEN = Counter(
    "promo_users_forgotten", "Users whose data was deleted on request, cluster-wide (every forget path adds to one "
    "count in Redis; each worker exports it: aggregate with max across workers, not sum)", registry=REGISTRY,
)
STATE_REINITIALISED = Counter(
    "promo_state_reinitialised", "Starts on lost Redis state that wrote a new epoch (PROMO_ON_STATE_LOSS=reinit)",
    registry=REGISTRY,
)
STATE_EPOCH_CREATED = Gauge(
    "promo_state_epoch_created_timestamp_seconds", "When the epoch of the Redis state this worker runs in began "
    "(a change means the state was re-initialised)", registry=REGISTRY,
)
BUILD_INFO = Gauge("promo_build_info", "Engine version", ["version", "model_version"], registry=REGISTRY)
CATALOGUE_INFO = Gauge(
    "promo_catalogue_info", "1 for the offer catalogue version this worker decides with (sha256[:12] of its YAML, "
    "as `promo catalogue check` prints; stream/catalogue.py)", ["version"], registry=REGISTRY,
)
CATALOGUE_RELOADS = Counter(
    "promo_catalogue_reloads", "Runtime offer catalogue changes this worker took up (applied) or refused as "
    "invalid, keeping the one in use (refused; the log names file:line)", ["result"], registry=REGISTRY,
)
for _result in ("applied", "refused"):  # both series from the start, at 0: rates and alerts work before a change
    CATALOGUE_RELOADS.labels(result=_result)

# --- learning (issue: online learning core) --------------------------------------------------
MODEL_AUC = Gauge("promo_model_auc", "Online (prequential) AUC of a model", ["model"], registry=REGISTRY)
MODEL_LOGLOSS = Gauge("promo_model_logloss", "Online (prequential) log loss of a model", ["model"], registry=REGISTRY)
MODEL_SNAPSHOTS = Counter("promo_model_snapshots", "Model snapshots written to Redis", registry=REGISTRY)
CONTRIBUTIONS_CAPPED = Counter(
    "promo_contributions_capped", "Users' commits whose item contributions were not applied because the user's "
    "contribution record is at PROMO_CONTRIB_RECORD_MAX_FIELDS", registry=REGISTRY,
)

# --- policy, budgets, attribution (issue: offer policy) --------------------------------------
REDEMPTIONS = Counter("promo_redemptions", "Decisions redeemed by a purchase", ["offer_id", "group"], registry=REGISTRY)
ATTRIBUTED_REVENUE = Counter(
    "promo_attributed_revenue", "Revenue attributed to decisions", ["offer_id", "group"], registry=REGISTRY
)
OFFER_COST = Counter("promo_offer_cost", "Cost of redeemed offers", ["offer_id"], registry=REGISTRY)
CONVERSION = Gauge("promo_conversion_ratio", "Conversion rate of closed decisions", ["group"], registry=REGISTRY)
UPLIFT = Gauge("promo_uplift_ratio", "Conversion in treatment minus conversion in holdout", registry=REGISTRY)
BUDGET_REMAINING = Gauge("promo_budget_remaining", "Campaign budget left", ["offer_id"], registry=REGISTRY)
DECISIONS_CLOSED = Counter(
    "promo_decisions_closed", "Decisions whose attribution window closed", ["outcome"], registry=REGISTRY
)
OFFER_DECISIONS = Counter(
    "promo_offer_decisions", "Decisions per offer and group (offer_id none included)", ["offer_id", "group"],
    registry=REGISTRY,
)
BUDGET_SPENT = Gauge(
    "promo_budget_spent", "Campaign spend: committed redemption costs plus open reservations", ["offer_id"],
    registry=REGISTRY,
)
BUDGET_REFUSED = Counter(
    "promo_budget_refused", "Reservations refused because the campaign budget could not cover them", ["offer_id"],
    registry=REGISTRY,
)
PACING_PRICE = Gauge(
    "promo_pacing_shadow_price", "Pacing shadow price added per unit of offer cost", ["offer_id"], registry=REGISTRY
)


# --- counts kept elsewhere ---------------------------------------------------------------------
_EXPORTED: dict[int, float] = {}


def raise_to(counter: Counter, total: float) -> None:
    """Raise ``counter`` (no labels) to ``total``, a count kept elsewhere (shared in Redis, or by a store
    object); it never goes down, so it stays a counter when the source is reset.

    >>> c = Counter("promo_doctest_things", "doc", registry=CollectorRegistry())
    >>> raise_to(c, 3); raise_to(c, 2); raise_to(c, 5)
    >>> c._value.get()
    5.0
    """
    done = _EXPORTED.get(id(counter), 0.0)
    if total > done:
        counter.inc(total - done)
        _EXPORTED[id(counter)] = float(total)


# --- the sink models/ report through ----------------------------------------------------------
class PrometheusSink(MetricsSink):
    """:class:`models.metrics.MetricsSink` into this registry: a name is the metric's Prometheus name (counters
    without ``_total``); a name not declared here is a programming error, raised at once.

    >>> PrometheusSink().gauge("promo_uplift_ratio", 0.01)
    >>> PrometheusSink().increment("promo_no_such_metric")
    Traceback (most recent call last):
    ...
    KeyError: "models reported 'promo_no_such_metric', which stream/metrics.py does not declare"
    """

    enabled = True

    def __init__(self) -> None:
        # every metric this module declares, by its name (prometheus_client keeps it as ``_name``)
        self._by_name = {obj._name: obj for obj in globals().values() if isinstance(obj, MetricWrapperBase)}

    def _metric(self, name: str, labels: dict[str, str] | None):
        try:
            metric = self._by_name[name]
        except KeyError:
            raise KeyError(f"models reported {name!r}, which stream/metrics.py does not declare") from None
        return metric.labels(**labels) if labels else metric

    def increment(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        self._metric(name, labels).inc(value)

    def gauge(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self._metric(name, labels).set(value)


# --- reading an exposition back (demo summary, benchmarks, tests) ------------------------------
def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> ``{(sample name, frozenset(labels.items())): value}``.

    >>> s = parse_exposition('promo_events_total{type="cart"} 3.0\\npromo_events_total{type="view"} 4.0\\n')
    >>> s[("promo_events_total", frozenset({("type", "cart")}))]
    3.0
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample_sum(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``, in a :func:`parse_exposition` answer.

    >>> s = parse_exposition('promo_events_total{type="cart"} 3.0\\npromo_events_total{type="view"} 4.0\\n')
    >>> sample_sum(s, "promo_events_total"), sample_sum(s, "promo_events_total", type="view")
    (7.0, 4.0)
    """
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
