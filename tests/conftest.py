"""Shared fixtures: the real embedded stack (Tansu + redis-server) on free ports, workers as subprocesses.

Nothing here is faked: if the broker or Redis cannot start, every integration test errors loudly.

* ``stack`` (session): the embedded stack, started once -> :class:`stream.settings.Settings`.
* ``redis_url`` (session): that stack's Redis URL. ``redis_client`` (function): a sync client on it.
* ``engine_settings`` (function): stack settings with a unique topic prefix, Redis key prefix, consumer group
  and web port, topics created - so tests never see each other's data.
* ``start_worker(settings)``: a ``promo worker`` subprocess (:class:`tests.helpers.WorkerProcess`), stopped at
  teardown.

Helpers (``wait_until``, ``produce_raw``, ``consume_all``, ``parse_metrics``, ...) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import uuid

import pytest

from stream.settings import Settings
from tests.helpers import WorkerProcess, free_port


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    from stream import stack as st

    settings = Settings(
        _env_file=None,
        state_dir=tmp_path_factory.mktemp("stack"),
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        partitions=12,
        durable=False,  # never restarted: an append-only file would only add an fsync to every round trip
    )
    st.up(settings)
    yield settings
    st.down(settings)


@pytest.fixture(scope="session")
def redis_url(stack) -> str:
    return stack.redis_url


@pytest.fixture
def redis_client(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def engine_settings(stack) -> Settings:
    from stream.topics import ensure_topics

    tag = "t" + uuid.uuid4().hex[:10]
    s = stack.model_copy(
        update={"topic_prefix": tag, "redis_prefix": tag, "app_id": f"promo-{tag}", "web_port": free_port()}
    )
    ensure_topics(s)
    return s


@pytest.fixture
def start_worker(tmp_path, request):
    started: list[WorkerProcess] = []
    request.node.promo_workers = started  # read by pytest_runtest_makereport when the test fails

    def start(settings: Settings, extra_env: dict | None = None) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker{len(started)}.log", extra_env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()




@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that started workers shows each worker's last log lines in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for i, w in enumerate(getattr(item, "promo_workers", [])):
            code = w.proc.poll()
            report.sections.append((f"worker{i} log (exit {code}), last 60 lines of {w.log_path}", w.log_tail(60)))
