"""Grafana dashboards of the promotion engine, generated as code with grafana-foundation-sdk (pinned 0.0.21).

The JSON under ``deploy/grafana/dashboards/`` is generated from this file and committed; Grafana loads it
through ``deploy/grafana/provisioning/dashboards/promo.yml``. After changing a panel here, regenerate::

    .venv/bin/python deploy/grafana/generate.py            # writes deploy/grafana/dashboards/*.json
    .venv/bin/python deploy/grafana/generate.py --check    # exit 1 and name the stale files, write nothing

``tests/unit/test_dashboards.py`` fails when the committed JSON differs from what this file generates, and
``tests/integration/test_prometheus_live.py`` runs every panel's PromQL against a real Prometheus scraping a
real worker. Metric names are the contract of ``stream/metrics.py``. Every ``rate()`` uses
``$__rate_interval``; every panel and query refers to the provisioned datasource :data:`DATASOURCE_UID`.

Helpers for tests and tools: :func:`build_dashboards`, :func:`render`, :func:`stale_files`,
:func:`panel_queries` and :func:`substitute_variables`.

>>> sorted(build_dashboards())
['promo-business.json', 'promo-pipeline.json']
>>> substitute_variables('rate(x{instance=~"$instance"}[$__rate_interval])')
'rate(x{instance=~".+"}[15s])'
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():  # the classic dashboard model is what file provisioning loads
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.builders import gauge, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE_UID = "promo-prometheus"  # deploy/grafana/provisioning/datasources/prometheus.yml
DATASOURCE = cm.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
WORKER_JOB = "promo-worker"  # job_name in deploy/prometheus/prometheus.yml
SLO_SECONDS = 0.025  # decision latency SLO; a bucket boundary of LATENCY_BUCKETS in stream/metrics.py
TAGS = ["promo-engine"]

# Label filter of the dashboards' `instance` variable, put into every selector of an engine metric.
SEL = 'instance=~"$instance"'


def _rate(metric: str, extra: str = "") -> str:
    """``rate(metric{instance=~"$instance"[,extra]}[$__rate_interval])``."""
    labels = SEL + (f",{extra}" if extra else "")
    return f"rate({metric}{{{labels}}}[$__rate_interval])"


def _query(expr: str, legend: str = "__auto", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    if instant:
        q = q.instant().format(prometheus.PromQueryFormat.TABLE)
    else:
        q = q.range()
    return q


def _thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


_OK = _thresholds((None, "green"))


class _Layout:
    """Gives panels stable ids in the order they are added."""

    def __init__(self) -> None:
        self.next_id = 1

    def id(self) -> int:
        i, self.next_id = self.next_id, self.next_id + 1
        return i


def _timeseries(
    lay: _Layout, title: str, description: str, targets: list[prometheus.Dataquery], unit: str,
    width: int = 12, height: int = 8, slo_line: float | None = None, min_val: float | None = 0,
) -> timeseries.Panel:
    p = (
        timeseries.Panel()
        .id(lay.id())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .fill_opacity(10)
        .line_width(1)
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )
    if min_val is not None:
        p = p.min(min_val)
    if slo_line is not None:
        p = p.thresholds(_thresholds((None, "green"), (slo_line, "red"))).thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
        )
    else:
        p = p.thresholds(_OK)
    for t in targets:
        p = p.with_target(t)
    return p


def _stat(
    lay: _Layout, title: str, description: str, target: prometheus.Dataquery, unit: str,
    thresholds: db.ThresholdsConfig = _OK, width: int = 6, height: int = 4, decimals: float | None = None,
) -> stat.Panel:
    p = (
        stat.Panel()
        .id(lay.id())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .thresholds(thresholds)
        .color_mode(cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(target)
    )
    if decimals is not None:
        p = p.decimals(decimals)
    return p


def _gauge(
    lay: _Layout, title: str, description: str, target: prometheus.Dataquery, unit: str,
    min_val: float, max_val: float, thresholds: db.ThresholdsConfig, width: int = 6, height: int = 8,
) -> gauge.Panel:
    return (
        gauge.Panel()
        .id(lay.id())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(min_val)
        .max(max_val)
        .decimals(3)
        .span(width)
        .height(height)
        .thresholds(thresholds)
        .show_threshold_markers(True)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(target)
    )


def _instance_variable() -> db.QueryVariable:
    return (
        db.QueryVariable("instance")
        .label("Worker")
        .description("Engine workers (Prometheus targets of job promo-worker)")
        .datasource(DATASOURCE)
        .query(f'label_values(up{{job="{WORKER_JOB}"}}, instance)')
        .definition(f'label_values(up{{job="{WORKER_JOB}"}}, instance)')
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".+")
    )


def _base(uid: str, title: str, description: str) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .timezone("browser")
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .readonly()
        .with_variable(_instance_variable())
        .link(
            db.DashboardLink("Promo engine")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
        )
    )


def pipeline_dashboard() -> db.Dashboard:
    """Throughput, dead-letter queue, duplicates, decision latency and SLO, decisions, worker health."""
    lay = _Layout()
    d = _base(
        "promo-pipeline",
        "Promo engine: pipeline",
        "Events in, decisions out: throughput, DLQ, duplicates, decision latency against the 25 ms SLO, "
        "decisions by offer and group, and the health of every worker.",
    )

    d = d.with_row(db.Row("Throughput").id(lay.id()))
    d = d.with_panel(_timeseries(
        lay, "Events applied by type",
        "Valid events applied per second, after de-duplication (promo_events_total), by event type.",
        [_query(f"sum by (type) ({_rate('promo_events_total')})", "{{type}}")], "ops", width=12,
    ))
    d = d.with_panel(_stat(
        lay, "Events applied/s", "All valid events applied per second, all workers selected.",
        _query(f"sum({_rate('promo_events_total')})", "events/s"), "ops", width=6, height=8,
    ))
    d = d.with_panel(_stat(
        lay, "Decisions sent/s", "Decisions sent per second (promo_decisions_total), all offers and groups.",
        _query(f"sum({_rate('promo_decisions_total')})", "decisions/s"), "ops", width=6, height=8,
    ))

    d = d.with_row(db.Row("Dead-letter queue and duplicates").id(lay.id()))
    d = d.with_panel(_timeseries(
        lay, "Invalid messages to the DLQ by reason",
        "Messages that failed decoding or validation and were written to the dead-letter topic, per second.",
        [_query(f"sum by (reason) ({_rate('promo_events_invalid_total')})", "{{reason}}")], "ops", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "DLQ share of incoming messages",
        "Invalid messages over all messages (valid + invalid). The PromoDLQRateHigh alert fires above 5%.",
        [_query(
            f"sum({_rate('promo_events_invalid_total')}) / clamp_min("
            f"sum({_rate('promo_events_invalid_total')}) + sum({_rate('promo_events_total')}), 1e-9)",
            "DLQ share",
        )],
        "percentunit", width=8, slo_line=0.05,
    ))
    d = d.with_panel(_timeseries(
        lay, "Duplicates skipped, decisions re-sent, users forgotten",
        "Events skipped because their event_id was already applied (redelivery, producer retries), "
        "stored decisions re-sent because their trigger was redelivered, users deleted on request (promo forget "
        "or the forget topic; every worker exports the cluster-wide count, hence max, not sum), and users' "
        "commits whose item contributions were left out because the user's contribution record is at "
        "PROMO_CONTRIB_RECORD_MAX_FIELDS (a hot user or a bot).",
        [
            _query(f"sum({_rate('promo_events_duplicate_total')})", "duplicate events", "A"),
            _query(f"sum({_rate('promo_decisions_resent_total')})", "decisions re-sent", "B"),
            _query(f"max({_rate('promo_users_forgotten_total')})", "users forgotten", "C"),
            _query(f"sum({_rate('promo_contributions_capped_total')})", "contributions capped", "D"),
        ],
        "ops", width=8,
    ))

    d = d.with_row(db.Row("Decision latency").id(lay.id()))
    lat = "promo_decision_latency_seconds_bucket"
    d = d.with_panel(_timeseries(
        lay, "Decision latency p50 / p95 / p99",
        "Event receipt to decision sent (promo_decision_latency_seconds). Dashed line: the 25 ms SLO.",
        [
            _query(f"histogram_quantile({q}, sum by (le) ({_rate(lat)}))", f"p{round(q * 100)}", ref)
            for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
        ],
        "s", width=12, slo_line=SLO_SECONDS,
    ))
    d = d.with_panel(_stat(
        lay, "SLO: decisions under 25 ms",
        "Share of decisions sent within 25 ms of event receipt (bucket le=0.025 over all decisions).",
        _query(
            f"sum({_rate(lat, 'le=' + json.dumps(str(SLO_SECONDS)))}) / "
            f"sum({_rate('promo_decision_latency_seconds_count')})",
            "under 25 ms",
        ),
        "percentunit", thresholds=_thresholds((None, "red"), (0.95, "orange"), (0.99, "green")),
        width=4, height=8, decimals=2,
    ))
    d = d.with_panel(_timeseries(
        lay, "Batch duration p50 / p99",
        "Time to process one batch, receipt to learnt (promo_batch_duration_seconds).",
        [
            _query(
                f"histogram_quantile({q}, sum by (le) ({_rate('promo_batch_duration_seconds_bucket')}))",
                f"p{round(q * 100)}", ref,
            )
            for q, ref in ((0.5, "A"), (0.99, "B"))
        ],
        "s", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "Batch stages: mean time per batch",
        "Where a batch's time goes (promo_batch_stage_seconds): decide (log check, decode, load, plan, reserve, "
        "commit) and send are on the decisions' critical path; delivered (stale reservations released, decisions "
        "marked as sent) and learn come after the send.",
        [_query(f"sum by (stage) ({_rate('promo_batch_stage_seconds_sum')}) / "
                f"sum by (stage) ({_rate('promo_batch_stage_seconds_count')})", "{{stage}}")],
        "s", width=8,
    ))

    d = d.with_row(db.Row("Decisions").id(lay.id()))
    d = d.with_panel(_timeseries(
        lay, "Decisions by offer kind and group",
        "Decisions sent per second by offer kind (none = the policy chose no offer) and group "
        "(treatment / holdout).",
        [_query(f"sum by (offer_kind, group) ({_rate('promo_decisions_total')})", "{{offer_kind}} / {{group}}")],
        "ops", width=16,
    ))
    d = d.with_panel(_stat(
        lay, "Holdout share of decisions",
        "Decisions in the holdout group over all decisions; should match PROMO_HOLDOUT_PCT.",
        _query(
            f"(sum({_rate('promo_decisions_total', 'group=' + json.dumps('holdout'))}) or vector(0)) / "
            f"sum({_rate('promo_decisions_total')})",
            "holdout share",
        ),
        "percentunit", width=8, height=8, decimals=1,
    ))

    d = d.with_row(db.Row("Worker health").id(lay.id()))
    d = d.with_panel(_stat(
        lay, "Workers ready",
        "Workers reporting ready (promo_worker_ready = 1: Redis up, partitions assigned) out of those scraped.",
        _query(f"sum(promo_worker_ready{{{SEL}}})", "ready"), "none",
        thresholds=_thresholds((None, "red"), (1, "green")), width=4, height=8, decimals=0,
    ))
    d = d.with_panel(_timeseries(
        lay, "Ready and scraped, per worker",
        "promo_worker_ready per worker, and Prometheus' own `up` for the worker target.",
        [
            _query(f"promo_worker_ready{{{SEL}}}", "ready {{instance}}", "A"),
            _query(f'up{{job="{WORKER_JOB}",{SEL}}}', "up {{instance}}", "B"),
        ],
        "none", width=10,
    ))
    d = d.with_panel(_timeseries(
        lay, "Assigned partitions per worker",
        "Partitions of the events topic assigned to each worker; the sum is the partition count.",
        [_query(f"sum by (instance) (promo_assigned_partitions{{{SEL}}})", "{{instance}}")],
        "none", width=10,
    ))
    d = d.with_panel(_timeseries(
        lay, "Mean batch size per worker",
        "Messages per processed batch (promo_batch_size): larger batches mean better throughput per event.",
        [_query(
            f"sum by (instance) ({_rate('promo_batch_size_sum')}) / "
            f"sum by (instance) ({_rate('promo_batch_size_count')})",
            "{{instance}}",
        )],
        "none", width=6,
    ))
    d = d.with_panel(_timeseries(
        lay, "Seconds since last event applied",
        "Wall-clock time since each worker last applied an event (promo_last_event_timestamp_seconds). "
        "Grows while a worker holding partitions is stalled: see the PromoConsumerStalled alert.",
        [_query(
            f"time() - max by (instance) (promo_last_event_timestamp_seconds{{{SEL}}} > 0)", "{{instance}}"
        )],
        "s", width=6,
    ))
    d = d.with_panel(_timeseries(
        lay, "Event-time lag per worker",
        "Wall clock minus event time of the last applied event: how far behind the stream each worker is.",
        [_query(f"max by (instance) (promo_event_time_lag_seconds{{{SEL}}})", "{{instance}}")],
        "s", width=6, min_val=None,
    ))
    d = d.with_panel(_timeseries(
        lay, "Redis errors per worker",
        "Redis operations that failed and were retried, per second (promo_redis_errors_total).",
        [_query(f"sum by (instance) ({_rate('promo_redis_errors_total')})", "{{instance}}")],
        "ops", width=6,
    ))

    d = d.with_row(db.Row("Faults").id(lay.id()))
    d = d.with_panel(_timeseries(
        lay, "Dependencies up, per worker",
        "promo_dependency_up: 1 when Redis / the broker answers and no batch step is retrying against it. "
        "While it is 0 the worker holds its batch, answers 503 on /readyz and acknowledges nothing.",
        [_query(f"min by (instance, component) (promo_dependency_up{{{SEL}}})", "{{component}} {{instance}}")],
        "none", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "Transient errors retried, by component and kind",
        "Transient infrastructure errors the batch loop retried with back-off, per second "
        "(promo_transient_errors_total: oom = Redis maxmemory, busy = a long Lua script, connection, timeout, ...). "
        "None of them dead-letters an event.",
        [_query(f"sum by (component, kind) ({_rate('promo_transient_errors_total')}) > 0 or "
                f"sum({_rate('promo_transient_errors_total')})", "{{component}} {{kind}}")],
        "ops", width=8,
    ))
    d = d.with_panel(_stat(
        lay, "Logs lost by the broker",
        "Partitions whose log the broker lost (a memory-only broker restarted, an unclean leader election), "
        "consumed again from the new log's start (promo_log_resets_total). A worker whose committed offsets "
        "belong to a lost log stops instead, naming the partition.",
        _query(f"sum(promo_log_resets_total{{{SEL}}})", "partitions"), "none",
        thresholds=_thresholds((None, "green"), (1, "red")), width=8, height=8, decimals=0,
    ))
    d = d.with_panel(_timeseries(
        lay, "Age of the Redis state epoch per worker",
        "Time since the epoch of the Redis state each worker runs in began "
        "(promo_state_epoch_created_timestamp_seconds; stream/epoch.py). Workers of one engine show one line; "
        "a line that drops to zero is a state begun again after a loss.",
        [_query(f"time() - max by (instance) (promo_state_epoch_created_timestamp_seconds{{{SEL}}} > 0)",
                "{{instance}}")],
        "s", width=18,
    ))
    d = d.with_panel(_stat(
        lay, "State re-initialisations",
        "Workers that started on lost Redis state and began it again (promo_state_reinitialised_total, "
        "PROMO_ON_STATE_LOSS=reinit): budgets, caps and de-duplication started from zero. See the "
        "PromoStateReinitialised alert.",
        _query(f"sum(promo_state_reinitialised_total{{{SEL}}}) or vector(0)", "re-initialisations"), "none",
        thresholds=_thresholds((None, "green"), (1, "red")), width=6, height=8,
    ))
    return d


def business_dashboard() -> db.Dashboard:
    """Conversion and uplift against the holdout, budgets and their burn, model quality."""
    lay = _Layout()
    d = _base(
        "promo-business",
        "Promo engine: outcomes, budgets and models",
        "What the decisions earn: conversion and uplift versus the holdout group, redemptions, attributed "
        "revenue against offer cost, campaign budget burn, and the online quality of the models.",
    )

    d = d.with_row(db.Row("Conversion and uplift vs holdout").id(lay.id()))
    d = d.with_panel(_timeseries(
        lay, "Conversion by group",
        "Conversion rate of closed decisions (promo_conversion_ratio) in the treatment and holdout groups.",
        [_query(f"avg by (group) (promo_conversion_ratio{{{SEL}}})", "{{group}}")],
        "percentunit", width=9,
    ))
    d = d.with_panel(_stat(
        lay, "Uplift vs holdout",
        "Conversion in treatment minus conversion in holdout (promo_uplift_ratio): the incremental effect "
        "of the offers.",
        _query(f"avg(promo_uplift_ratio{{{SEL}}})", "uplift"), "percentunit",
        thresholds=_thresholds((None, "red"), (0, "green")), width=5, height=8, decimals=2,
    ))
    d = d.with_panel(_timeseries(
        lay, "Attribution windows closed by outcome",
        "Decisions whose attribution window closed, per second, by outcome (promo_decisions_closed_total).",
        [_query(f"sum by (outcome) ({_rate('promo_decisions_closed_total')})", "{{outcome}}")],
        "ops", width=10,
    ))
    d = d.with_panel(_timeseries(
        lay, "Redemptions by offer and group",
        "Decisions redeemed by a purchase, per second (promo_redemptions_total).",
        [_query(f"sum by (offer_id, group) ({_rate('promo_redemptions_total')})", "{{offer_id}} / {{group}}")],
        "ops", width=12,
    ))
    d = d.with_panel(_timeseries(
        lay, "Attributed revenue and offer cost",
        "Revenue attributed to decisions by group, and the cost of the redeemed offers, per hour.",
        [
            _query(f"sum by (group) ({_rate('promo_attributed_revenue_total')}) * 3600", "revenue {{group}}", "A"),
            _query(f"sum({_rate('promo_offer_cost_total')}) * 3600", "offer cost", "B"),
        ],
        "short", width=12,
    ))

    d = d.with_row(db.Row("Budgets").id(lay.id()))
    d = d.with_panel(_timeseries(
        lay, "Budget remaining by offer",
        "Campaign budget left per offer (promo_budget_remaining). PromoBudgetExhausted fires at 0.",
        [_query(f"min by (offer_id) (promo_budget_remaining{{{SEL}}})", "{{offer_id}}")],
        "short", width=8, slo_line=0,
    ))
    d = d.with_panel(_timeseries(
        lay, "Budget burn by offer (cost per hour)",
        "Cost of redeemed offers per hour, by offer (promo_offer_cost_total).",
        [_query(f"sum by (offer_id) ({_rate('promo_offer_cost_total')}) * 3600", "{{offer_id}}")],
        "short", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "Hours until budget exhausted",
        "Budget remaining divided by the current burn rate, by offer (absent while an offer burns nothing).",
        [_query(
            f"min by (offer_id) (promo_budget_remaining{{{SEL}}}) / "
            f"(sum by (offer_id) ({_rate('promo_offer_cost_total')}) * 3600 > 0)",
            "{{offer_id}}",
        )],
        "h", width=8,
    ))

    d = d.with_panel(_timeseries(
        lay, "Budget spent (reserved + committed) by offer",
        "What campaigns hold: reservations of open decisions plus committed redemption costs "
        "(promo_budget_spent); never above the budget.",
        [_query(f"max by (offer_id) (promo_budget_spent{{{SEL}}})", "{{offer_id}}")],
        "short", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "Reservations refused by offer",
        "Decisions that had to fall back because another decision took the rest of the budget "
        "(promo_budget_refused_total), per second.",
        [_query(f"sum by (offer_id) ({_rate('promo_budget_refused_total')})", "{{offer_id}}")],
        "ops", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "Pacing shadow price by offer",
        "Price per unit of cost the pacing controller subtracts from an offer's score when it spends ahead "
        "of its period (promo_pacing_shadow_price); 0 = on pace.",
        [_query(f"max by (offer_id) (promo_pacing_shadow_price{{{SEL}}})", "{{offer_id}}")],
        "short", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "Decisions by offer and group",
        "Decisions sent per second by offer id and group (promo_offer_decisions_total).",
        [_query(f"sum by (offer_id, group) ({_rate('promo_offer_decisions_total')})", "{{offer_id}} {{group}}")],
        "ops", width=24,
    ))

    d = d.with_row(db.Row("Triggers").id(lay.id()))
    d = d.with_panel(_timeseries(
        lay, "Decisions by trigger",
        "Decisions sent per second by trigger (cart, post_purchase, retention, cart_abandonment, "
        "browse_abandonment; promo_trigger_decisions_total). The timers fire from the expiry sweep, every "
        "PROMO_MAINTENANCE_INTERVAL_S.",
        [_query(f"sum by (trigger) ({_rate('promo_trigger_decisions_total')})", "{{trigger}}")],
        "ops", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "Offers by trigger and kind",
        "Share of each offer kind in the decisions of each trigger (none included): what each moment gives.",
        [_query(f"sum by (trigger, offer_kind) ({_rate('promo_trigger_decisions_total')}) / ignoring(offer_kind) "
                f"group_left sum by (trigger) ({_rate('promo_trigger_decisions_total')})",
                "{{trigger}} {{offer_kind}}")],
        "percentunit", width=8,
    ))
    d = d.with_panel(_timeseries(
        lay, "Timers that fired nothing; sweep p99",
        "Due timers dropped because the trigger is off now or no longer applied (emptied cart, the trigger's "
        "cooldown or daily cap; promo_timers_dropped_total), and the expiry sweep's p99 duration "
        "(promo_sweep_duration_seconds: windows closed, timers fired, their decisions sent).",
        [
            _query(f"sum by (trigger) ({_rate('promo_timers_dropped_total')})", "dropped {{trigger}}", "A"),
            _query(f"histogram_quantile(0.99, sum by (le) ({_rate('promo_sweep_duration_seconds_bucket')}))",
                   "sweep p99 (s)", "B"),
        ],
        "short", width=8,
    ))

    d = d.with_row(db.Row("Model quality").id(lay.id()))
    d = d.with_panel(_gauge(
        lay, "AUC by model",
        "Online (prequential) AUC of each model (promo_model_auc); 0.5 is chance.",
        _query(f"avg by (model) (promo_model_auc{{{SEL}}})", "{{model}}"), "none", 0.5, 1.0,
        _thresholds((None, "red"), (0.6, "orange"), (0.7, "green")),
    ))
    d = d.with_panel(_gauge(
        lay, "Log loss by model",
        "Online (prequential) log loss of each model (promo_model_logloss); lower is better.",
        _query(f"avg by (model) (promo_model_logloss{{{SEL}}})", "{{model}}"), "none", 0.0, 1.0,
        _thresholds((None, "green"), (0.5, "orange"), (0.69, "red")),
    ))
    d = d.with_panel(_timeseries(
        lay, "Model AUC over time",
        "Online AUC of each model per worker: each worker's models learn from its own partitions.",
        [_query(f"promo_model_auc{{{SEL}}}", "{{model}} {{instance}}")],
        "none", width=12, min_val=None,
    ))
    d = d.with_panel(_timeseries(
        lay, "Model snapshots written",
        "Model snapshots written to Redis per minute (promo_model_snapshots_total).",
        [_query(f"sum by (instance) ({_rate('promo_model_snapshots_total')}) * 60", "{{instance}}")],
        "none", width=24, height=6,
    ))

    d = d.with_row(db.Row("Offer catalogue").id(lay.id()))
    d = d.with_panel(_timeseries(
        lay, "Workers per catalogue version",
        "Workers deciding with each offer catalogue version (promo_catalogue_info; `promo catalogue apply` "
        "changes it at runtime). One line once every worker has converged; two during a change.",
        [_query(f"count by (version) (promo_catalogue_info{{{SEL}}} == 1)", "{{version}}")],
        "none", width=12,
    ))
    d = d.with_panel(_timeseries(
        lay, "Catalogue changes applied and refused",
        "Runtime catalogue changes the workers took up or refused as invalid, keeping the one in use "
        "(promo_catalogue_reloads_total; the worker's log names file:line), per minute.",
        [_query(f"sum by (result) ({_rate('promo_catalogue_reloads_total')}) * 60", "{{result}}")],
        "none", width=12,
    ))
    return d


# --- generation -------------------------------------------------------------------------------
def build_dashboards() -> dict[str, dict]:
    """Every dashboard as Grafana JSON (a dict), keyed by its file name under ``dashboards/``."""
    out = {}
    for builder in (pipeline_dashboard(), business_dashboard()):
        model = builder.build()
        out[f"{model.uid}.json"] = json.loads(json.dumps(model, cls=JSONEncoder))
    return out


def render(dashboard_json: dict) -> str:
    """The exact text committed for one dashboard (sorted keys, 2-space indent, final newline)."""
    return json.dumps(dashboard_json, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def stale_files(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """Names of dashboard files in ``directory`` that are missing, differ from the generated text, or are
    not generated by this module at all. Empty when everything is up to date."""
    expected = {name: render(d) for name, d in build_dashboards().items()}
    stale = [n for n, text in expected.items() if not (directory / n).is_file() or (directory / n).read_text() != text]
    stale += sorted(p.name for p in directory.glob("*.json") if p.name not in expected)
    return sorted(stale)


def write(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    """Write every dashboard into ``directory``; remove JSON files this module no longer generates."""
    directory.mkdir(parents=True, exist_ok=True)
    dashboards = build_dashboards()
    for p in directory.glob("*.json"):
        if p.name not in dashboards:
            p.unlink()
    paths = []
    for name, d in dashboards.items():
        path = directory / name
        path.write_text(render(d))
        paths.append(path)
    return paths


# --- reading the committed JSON back (tests, tools) ---------------------------------------------
@dataclass(frozen=True)
class PanelQuery:
    """One PromQL query of one panel of a committed dashboard."""

    dashboard: str  # dashboard uid
    panel: str  # panel title
    ref_id: str
    expr: str


def panel_queries(dashboard_json: dict) -> list[PanelQuery]:
    """Every Prometheus query of every panel (rows included, nested or not) of a dashboard JSON.

    >>> d = {"uid": "u", "panels": [{"type": "row", "title": "r", "panels": [
    ...     {"title": "p", "targets": [{"refId": "A", "expr": "up"}]}]}]}
    >>> panel_queries(d)
    [PanelQuery(dashboard='u', panel='p', ref_id='A', expr='up')]
    """
    out: list[PanelQuery] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append(PanelQuery(dashboard_json["uid"], p.get("title", ""), t.get("refId", ""), t["expr"]))
            walk(p.get("panels") or [])

    walk(dashboard_json.get("panels") or [])
    return out


def substitute_variables(expr: str, rate_interval: str = "15s", instance: str = ".+") -> str:
    """Replace Grafana's variables in a panel's PromQL so that Prometheus can run it directly.

    ``$__rate_interval``, ``$__interval`` and ``$__range`` become ``rate_interval``; ``$instance`` becomes
    ``instance`` (the dashboards' "All" value). An unknown ``$variable`` raises ``ValueError``.

    >>> substitute_variables('x[$__interval] or y[$__range]', rate_interval='1m')
    'x[1m] or y[1m]'
    >>> substitute_variables('x{a="$nope"}')
    Traceback (most recent call last):
    ...
    ValueError: unknown Grafana variable(s) ['$nope'] in: x{a="$nope"}
    """
    out = re.sub(r"\$(__rate_interval|__interval|__range)\b", rate_interval, expr)
    out = re.sub(r"\$instance\b", instance, out)
    left = re.findall(r"\$\w+", out)
    if left:
        raise ValueError(f"unknown Grafana variable(s) {left} in: {expr}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR, help="directory of the dashboard JSON")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        if stale:
            print(
                f"generate.py: stale dashboard JSON in {args.out}: {', '.join(stale)}; "
                "run `python deploy/grafana/generate.py` and commit the result",
                file=sys.stderr,
            )
            return 1
        print(f"generate.py: {args.out} is up to date", file=sys.stderr)
        return 0
    for path in write(args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
