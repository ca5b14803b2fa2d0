"""How ``models/`` reports metrics without knowing where they go (Arroyo's injected metrics backend).

Models that have something to report take a :class:`MetricsSink` on construction and call it with the name of the
metric (the Prometheus name of ``stream/metrics.py``, where every metric is declared) and its labels; the worker
passes :class:`stream.metrics.PrometheusSink`, everything else (tests, offline evaluation, benchmarks) the default
:class:`NullSink`. So nothing in ``models/`` imports ``stream/``.

>>> sink = RecordingSink()
>>> sink.increment("promo_redemptions", labels={"offer_id": "c5", "group": "treatment"})
>>> sink.gauge("promo_uplift_ratio", 0.02)
>>> sink.calls
[('increment', 'promo_redemptions', 1.0, {'offer_id': 'c5', 'group': 'treatment'}), ('gauge', 'promo_uplift_ratio', 0.02, {})]
"""

from __future__ import annotations


class MetricsSink:
    """Where a model's metrics go. ``name`` is a metric declared in ``stream/metrics.py`` (counters without their
    ``_total`` suffix); ``labels`` its label values. The base class drops everything (:class:`NullSink`)."""

    enabled: bool = False
    """False when nothing is recorded: a model may skip computing what it would report."""

    def increment(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        """Add ``value`` to a counter."""

    def gauge(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        """Set a gauge."""


class NullSink(MetricsSink):
    """Records nothing (the default)."""


NULL = NullSink()


class RecordingSink(MetricsSink):
    """Keeps every call in :attr:`calls`, for tests."""

    enabled = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, dict]] = []

    def increment(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        self.calls.append(("increment", name, float(value), dict(labels or {})))

    def gauge(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.calls.append(("gauge", name, float(value), dict(labels or {})))
