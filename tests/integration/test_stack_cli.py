"""``promo stack up|down|status`` through the real CLI, on its own ports and state dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from stream.stack import port_open
from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.integration


def promo(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args], env={**os.environ, **env}, cwd=ROOT,
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def port_of(url: str) -> int:
    """The port of ``127.0.0.1:<port>`` or ``redis://127.0.0.1:<port>/0``."""
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture
def stack_env(tmp_path):
    env = {
        "PROMO_STATE_DIR": str(tmp_path / "state"),
        "PROMO_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "PROMO_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "PROMO_PARTITIONS": "6",
    }
    yield env
    promo(env, "stack", "down")


def test_up_twice_status_down(stack_env):
    first = promo(stack_env, "stack", "up", "--json")
    assert first.returncode == 0, first.stderr
    rep = json.loads(first.stdout)
    assert rep["ok"] and rep["kafka"]["state"] == "started" and rep["redis"]["state"] == "started"
    assert rep["topics"] == {"promo.events": 6, "promo.decisions": 6, "promo.events.dlq": 6, "promo.forget": 6}
    # durable by default: the append-only file, fsynced before every reply
    assert rep["redis"]["durable"] is True and rep["redis"]["appendfsync"] == "always"

    second = promo(stack_env, "stack", "up", "--json")
    assert second.returncode == 0, second.stderr
    rep2 = json.loads(second.stdout)
    assert rep2["kafka"]["state"] == rep2["redis"]["state"] == "already running"
    assert rep2["kafka"]["pid"] == rep["kafka"]["pid"] and rep2["redis"]["pid"] == rep["redis"]["pid"]
    assert rep2["redis"]["durable"] is True and "warning" not in rep2["redis"] and not second.stderr.strip()

    st = promo(stack_env, "stack", "status", "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["ok"]
    assert json.loads(st.stdout)["redis"]["durable"] is True

    down = promo(stack_env, "stack", "down", "--json")
    assert down.returncode == 0
    assert json.loads(down.stdout) == {"ok": True, "kafka": "stopped", "redis": "stopped", "attached_clients": 0}
    assert not down.stderr.strip(), down.stderr  # nothing attached: no warning
    st = promo(stack_env, "stack", "status", "--json")
    assert st.returncode == 1
    rep = json.loads(st.stdout)
    assert not rep["ok"] and not rep["kafka"]["answers"] and not rep["redis"]["answers"]
    again = promo(stack_env, "stack", "down", "--json")
    assert json.loads(again.stdout) == {"ok": True, "kafka": "not running", "redis": "not running",
                                        "attached_clients": 0}


def test_no_durable_runs_redis_in_memory_and_a_durable_up_says_so(stack_env):
    first = promo(stack_env, "stack", "up", "--no-durable", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["redis"]["durable"] is False
    st = promo(stack_env, "stack", "status", "--json")
    assert json.loads(st.stdout)["redis"]["durable"] is False
    # PROMO_DURABLE=false is the same setting
    assert json.loads(promo({**stack_env, "PROMO_DURABLE": "false"}, "stack", "up", "--json").stdout)["redis"] \
        .get("warning") is None

    again = promo(stack_env, "stack", "up", "--json")  # durable asked, an in-memory Redis found running
    assert again.returncode == 0, again.stderr
    redis_rep = json.loads(again.stdout)["redis"]
    assert redis_rep["state"] == "already running" and redis_rep["durable"] is False
    assert "without its append-only file" in redis_rep["warning"]
    warn = again.stderr.strip().splitlines()
    assert len(warn) == 1 and warn[0].startswith("promo: warning: Redis on port ")


def test_down_stops_only_what_up_started(stack_env, tmp_path):
    """A Redis someone else runs on the configured port is neither stopped nor reported as ours."""
    from stream.stack import redis_binary

    port = stack_env["PROMO_REDIS_URL"].rsplit(":", 1)[1].split("/")[0]
    other = subprocess.Popen([str(redis_binary()), "--port", port, "--bind", "127.0.0.1", "--save", ""],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        down = promo(stack_env, "stack", "down", "--json")
        assert json.loads(down.stdout)["redis"] == "not running"
        assert other.poll() is None
    finally:
        other.terminate()
        other.wait(10)


@pytest.mark.parametrize("which", ["kafka", "redis"])
def test_taken_port_is_a_one_line_error_naming_port_and_variable(stack_env, which):
    var = "PROMO_KAFKA_BOOTSTRAP" if which == "kafka" else "PROMO_REDIS_URL"
    port = port_of(stack_env[var])
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        res = promo(stack_env, "stack", "up")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("promo: error:") and str(port) in lines[0] and var in lines[0]
    # both ports are checked before anything starts: a taken broker port leaves no Redis running
    other = "PROMO_REDIS_URL" if which == "kafka" else "PROMO_KAFKA_BOOTSTRAP"
    assert not port_open("127.0.0.1", port_of(stack_env[other]))


def test_one_port_for_both_is_a_one_line_error_and_starts_nothing(stack_env):
    port = port_of(stack_env["PROMO_REDIS_URL"])
    env = {**stack_env, "PROMO_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}
    res = promo(env, "stack", "up")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("promo: error:"), res.stderr
    assert "PROMO_KAFKA_BOOTSTRAP" in lines[0] and "PROMO_REDIS_URL" in lines[0] and str(port) in lines[0]
    assert not port_open("127.0.0.1", port)


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_demo_says_when_the_replay_is_done_and_ctrl_c_stops_everything(stack_env, stop):
    """The README's first command, as a user runs it: the embedded stack, a worker, the bundled sample replayed;
    the demo says when every event was processed, and Ctrl-C (the whole terminal session interrupted) or a
    SIGTERM to the demo stops the worker and the stack it started."""
    import signal
    import time

    from stream.stack import port_open
    from tests.helpers import wait_until

    env = {**os.environ, **stack_env, "PROMO_WEB_PORT": str(free_port())}
    # its own session, with SIGINT's default action, as a foreground job in a terminal (a test runner started in
    # the background, as CI may be, has SIGINT ignored, and children inherit that)
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "demo", "--rate", "2000"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []

    def read_until_done() -> bool:
        line = proc.stderr.readline()  # the demo writes a line a second at least (non-terminal: one per refresh)
        lines.append(line)
        assert line or proc.poll() is None, "".join(lines[-20:])
        return line.startswith("[demo] replay done")

    try:
        wait_until(read_until_done, 240, "the demo to say the replay is done", interval=0)
        done = lines[-1]
        assert "2000 events sent, every one processed" in done, done
        summary = lines[-2]  # the live summary line before it counts them all
        assert summary.startswith("events ") and "decisions 0 " not in summary, summary
        if stop == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        t_int = time.monotonic()
        # the worker's shutdown is bounded (30 s, then SIGKILL), then the stack's; generous on a loaded machine
        out, err = proc.communicate(timeout=180)
        print(f"the demo stopped {time.monotonic() - t_int:.1f} s after {stop}", file=sys.stderr)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, err
    assert out == ""  # nothing on stdout without --once
    assert "[demo] stopped the worker and the embedded stack" in err, err
    for url in (stack_env["PROMO_KAFKA_BOOTSTRAP"], stack_env["PROMO_REDIS_URL"].split("//")[1].split("/")[0]):
        host, port = url.rsplit(":", 1)
        assert not port_open(host, int(port)), f"{url} still answers after the demo stopped"


def test_a_second_worker_on_a_taken_web_port_is_one_line_naming_the_variable(stack_env):
    """Before it connects to anything: the port is checked first (no broker or Redis needed for this)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = promo({**stack_env, "PROMO_WEB_PORT": str(port), "PROMO_WEB_HOST": "127.0.0.1"}, "worker")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [f"promo: error: web port {port} on 127.0.0.1 is taken (another worker on this host?); give each "
                     "worker its own PROMO_WEB_PORT"], res.stderr


def test_stack_down_with_a_worker_attached_warns_and_the_worker_stops_quickly(stack_env, tmp_path):
    """`promo stack down` while a worker is attached says so on one line (the JSON report counts the connections);
    the worker retries meanwhile with a bounded log (the Kafka client's retry loops logged each try: 826 ERROR
    lines seen), and on SIGTERM exits without waiting for the broker (it took 62 s: Faust waited a minute for the
    consumer's group coordinator)."""
    import signal
    import time

    from stream.settings import Settings
    from tests.helpers import WorkerProcess, metric, wait_until

    up = promo(stack_env, "stack", "up", "--json")
    assert up.returncode == 0, up.stderr
    s = Settings(_env_file=None, state_dir=stack_env["PROMO_STATE_DIR"], partitions=6, web_port=free_port(),
                 kafka_bootstrap=stack_env["PROMO_KAFKA_BOOTSTRAP"], redis_url=stack_env["PROMO_REDIS_URL"])
    worker = WorkerProcess(s, tmp_path / "worker.log")
    try:
        worker.wait_ready(120)
        sent = promo(stack_env, "produce", str(ROOT / "stream" / "data" / "rees46_sample.csv"), "--format", "rees46",
                     "--limit", "50", "--json")
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: metric(worker.metrics(), "promo_events_total") > 0, 120, "the worker applying events")

        down = promo(stack_env, "stack", "down", "--json")
        assert down.returncode == 0, down.stderr
        rep = json.loads(down.stdout)
        assert rep["kafka"] == rep["redis"] == "stopped" and rep["attached_clients"] > 0, rep
        warn = down.stderr.strip().splitlines()
        assert len(warn) == 1 and warn[0].startswith("promo: warning:"), down.stderr
        assert "stop the workers first (Ctrl-C / SIGTERM)" in warn[0], warn[0]

        # the worker is still there, retrying: not ready, and it has logged the broker's loss
        wait_until(lambda: worker.ready_status() == 503, 60, "/readyz answering 503 with the stack down")
        wait_until(lambda: "[ERROR]" in worker.log_path.read_text(errors="replace"), 60, "the worker noticing")
        assert worker.proc.poll() is None, worker.log_tail()

        worker.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        wait_until(lambda: worker.proc.poll() is not None, 30, "the worker to exit after SIGTERM", interval=0.1)
        print(f"the worker exited {time.monotonic() - t_term:.1f} s after SIGTERM with the stack down",
              file=sys.stderr)
        assert worker.proc.returncode == 0, worker.log_tail()
        log = worker.log_path.read_text(errors="replace").splitlines()
        errors = [line for line in log if "[ERROR]" in line]
        print(f"worker log: {len(log)} lines, {len(errors)} ERROR", file=sys.stderr)
        assert len(errors) <= 40, "\n".join(errors[-40:])
        assert "refuses connections, so nothing more can be committed" in worker.log_tail(5), worker.log_tail()
    finally:
        worker.stop()


def test_up_that_fails_after_starting_redis_stops_it_again(stack_env, monkeypatch):
    """The broker's port taken after the check (another process won the race): the broker never answers, and
    ``stack up`` stops the Redis it had started instead of leaving it running."""
    from stream import stack
    from stream.settings import Settings

    monkeypatch.setattr(stack, "_port_free", lambda host, port: True)  # the race: the check saw the port free
    for var, value in stack_env.items():
        monkeypatch.setenv(var, value)
    settings = Settings()
    with socket.socket() as squatter:  # accepts connections, never speaks Kafka
        squatter.bind(("127.0.0.1", settings.kafka_port))
        squatter.listen()
        with pytest.raises(stack.StackError) as err:
            stack.up(settings, timeout_s=3.0)
    assert f"broker on port {settings.kafka_port} did not answer" in str(err.value)
    assert str(err.value).endswith("stopped the Redis and broker this command had started")
    assert not port_open("127.0.0.1", settings.redis_port)
    paths = stack._paths(settings)
    assert not paths["redis_pid"].exists() and not paths["kafka_pid"].exists()
