"""Grafana dashboards as code: the committed JSON is exactly what deploy/grafana/generate.py produces, every
query uses only metrics of stream/metrics.py and the provisioned datasource, and the provisioning files agree.

Regenerate after changing the generator: ``.venv/bin/python deploy/grafana/generate.py``.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "deploy" / "grafana" / "generate.py"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


def _load_generator():
    spec = importlib.util.spec_from_file_location("promo_grafana_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _committed() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def test_committed_json_is_what_the_generator_produces():
    stale = gen.stale_files(DASHBOARDS)
    assert not stale, f"stale dashboard JSON {stale}: run `.venv/bin/python deploy/grafana/generate.py` and commit"


def test_check_mode_detects_a_hand_edit(tmp_path):
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    victim = tmp_path / "promo-pipeline.json"
    victim.write_text(victim.read_text().replace("Events applied by type", "Events by type (edited)"))
    assert gen.stale_files(tmp_path) == ["promo-pipeline.json"]
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1
    (tmp_path / "extra.json").write_text("{}")
    assert "extra.json" in gen.stale_files(tmp_path)


def test_generator_runs_as_a_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # progress on stderr only
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(_committed())


def test_generator_doctests():
    result = doctest.testmod(gen, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_committed_json_decodes_with_the_sdk():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from grafana_foundation_sdk.models.dashboard import Dashboard

    for name, data in _committed().items():
        model = Dashboard.from_json(data)
        assert model.uid == name.removesuffix(".json")
        assert model.title and model.panels


def _exported_names() -> set[str]:
    from stream import metrics

    names = set()
    for collector in list(metrics.REGISTRY._collector_to_names):  # noqa: SLF001 - read-only walk
        for family in collector.describe():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_count", "_sum")}
            else:
                names.add(family.name)
    return names


def _all_queries():
    return [q for d in _committed().values() for q in gen.panel_queries(d)]


def test_every_query_uses_only_exported_metrics():
    exported = _exported_names()
    queries = _all_queries()
    assert len(queries) >= 30
    for q in queries:
        unknown = set(re.findall(r"\bpromo_[a-z0-9_]+", q.expr)) - exported
        assert not unknown, f"{q.dashboard} / {q.panel}: unknown metric(s) {sorted(unknown)}"


def test_every_exported_metric_is_on_a_dashboard():
    used = {m for q in _all_queries() for m in re.findall(r"\bpromo_[a-z0-9_]+", q.expr)}
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    from stream import metrics

    missing = {
        f.name
        for c in list(metrics.REGISTRY._collector_to_names)  # noqa: SLF001
        for f in c.describe()
        if f.name not in families and f.name != "promo_build_info"
    }
    assert not missing, (
        f"metrics of stream/metrics.py on no dashboard: {sorted(missing)}; add a panel in "
        "deploy/grafana/generate.py and run `.venv/bin/python deploy/grafana/generate.py`"
    )


def test_rate_queries_use_rate_interval():
    for q in _all_queries():
        for window in re.findall(r"\b(?:rate|irate|increase)\([^\[]*\[([^\]]+)\]", q.expr):
            assert window == "$__rate_interval", f"{q.dashboard} / {q.panel}: rate window {window}"


def test_every_query_substitutes_to_plain_promql():
    for q in _all_queries():
        assert "$" not in gen.substitute_variables(q.expr)


def test_required_panels_exist():
    titles = {q.panel for q in _all_queries()}
    for needed in (
        "Events applied by type", "Invalid messages to the DLQ by reason", "Duplicates skipped, decisions re-sent, users forgotten",
        "Decision latency p50 / p95 / p99", "SLO: decisions under 25 ms", "Decisions by offer kind and group",
        "Conversion by group", "Uplift vs holdout", "Budget burn by offer (cost per hour)", "AUC by model",
        "Log loss by model", "Ready and scraped, per worker", "Assigned partitions per worker",
        "Mean batch size per worker",
    ):
        assert needed in titles
    latency = [q.expr for q in _all_queries() if q.panel == "Decision latency p50 / p95 / p99"]
    assert [re.match(r"histogram_quantile\(([\d.]+)", e).group(1) for e in latency] == ["0.5", "0.95", "0.99"]
    slo = next(q.expr for q in _all_queries() if q.panel == "SLO: decisions under 25 ms")
    assert 'le="0.025"' in slo


def test_panels_use_the_provisioned_datasource_and_fit_the_grid():
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    uid = next(d["uid"] for d in ds if d["type"] == "prometheus")
    assert uid == gen.DATASOURCE_UID
    for name, d in _committed().items():
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in d["panels"]:
            pos = p["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name} / {p['title']} overflows the grid"
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == uid
            assert all(t["datasource"]["uid"] == uid for t in p["targets"])


def test_dashboard_provider_points_at_the_mounted_directory():
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "promo.yml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.rsplit(":", 2)[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).name in _committed()


@pytest.mark.parametrize("name", ["promo-pipeline.json", "promo-business.json"])
def test_instance_variable_selects_all_workers(name):
    var = next(v for v in _committed()[name]["templating"]["list"] if v["name"] == "instance")
    assert var["includeAll"] and var["allValue"] == ".+"
    assert var["datasource"]["uid"] == gen.DATASOURCE_UID
