"""``promo tail decisions|dlq|events`` through the real CLI, against a live worker's topics on the embedded stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jsonschema
import pytest

from stream.sources import read_events
from tests.helpers import ROOT, event_bytes, http_get, metric, produce_raw, wait_until

pytestmark = pytest.mark.integration

SAMPLE = ROOT / "stream" / "data" / "rees46_sample.csv"
DECISION_SCHEMA = json.loads((ROOT / "stream" / "schemas" / "decision.v1.json").read_text())


def promo(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], env={**os.environ, **settings.to_env()},
                          cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def lines(res: subprocess.CompletedProcess) -> list[dict]:
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_tail_shows_what_the_worker_decided_and_dead_lettered(engine_settings, start_worker):
    s = engine_settings
    events = list(read_events(SAMPLE, "rees46"))[:800]
    bad = [(b"u-bad", b"{oops"), (b"u-bad", b'{"type": "view"}')]
    w = start_worker(s)
    w.wait_ready()
    produce_raw(s, s.topic_events, [(e["user_id"].encode(), event_bytes(e)) for e in events] + bad)
    wait_until(lambda: metric(w.metrics(), "promo_events_total") == len(events)
               and metric(w.metrics(), "promo_events_invalid_total") == len(bad), 120, "every event handled")
    n_decisions = metric(w.metrics(), "promo_decisions_total")
    assert n_decisions > 0, "the sample must make decisions"
    assert http_get(w.base_url + "/users/" + events[0]["user_id"])[0] == 404  # HTTP views: off without a token

    r0 = promo(s, "tail", "decisions", "--json")
    decisions = lines(r0)
    assert len(decisions) == n_decisions, r0.stderr
    for d in decisions:
        jsonschema.validate(d["value"], DECISION_SCHEMA)
        assert d["key"] == d["value"]["user_id"] and d["topic"] == s.topic_decisions
    assert [d["timestamp_ms"] for d in decisions] == sorted(d["timestamp_ms"] for d in decisions)

    user = decisions[-1]["key"]
    mine = lines(promo(s, "tail", "decisions", "--user", user, "--json"))
    assert mine and mine == [d for d in decisions if d["key"] == user]

    dlq = lines(promo(s, "tail", "dlq", "--json"))
    assert [(d["key"], d["value"]["reason"]) for d in dlq] == [("u-bad", "bad_json"), ("u-bad", "missing_field")]
    readable = promo(s, "tail", "dlq")
    assert readable.returncode == 0 and len(readable.stdout.splitlines()) == 2
    assert "user u-bad: bad_json: " in readable.stdout and "| raw {oops" in readable.stdout

    latest = lines(promo(s, "tail", "events", "--limit", "5", "--json"))
    every = lines(promo(s, "tail", "events", "--json"))
    assert len(every) == len(events) + len(bad) and latest == every[-5:]
    assert lines(promo(s, "tail", "events", "--since", "2099-01-01T00:00:00Z", "--json")) == []
    assert len(lines(promo(s, "tail", "events", "--since", "1h", "--json"))) == len(every)

    bad_since = promo(s, "tail", "events", "--since", "last tuesday")
    assert bad_since.returncode != 0 and bad_since.stdout == ""
    assert bad_since.stderr.strip().count("\n") == 0 and "--since 'last tuesday'" in bad_since.stderr


def test_tail_follow_prints_new_records_until_ctrl_c(engine_settings):
    s = engine_settings
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "tail", "events", "--follow", "--json", "--user",
                             "u-new"], env={**os.environ, **s.to_env()}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            # SIGINT as a terminal's foreground job has it (a runner started in the background
                            # has it ignored, and children inherit that)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        new = [{"event_id": f"n{i}", "type": "view", "user_id": "u-new", "item_id": f"i{i}", "ts": 1_700_000_000_000}
               for i in range(3)]
        produce_raw(s, s.topic_events, [(b"u-other", b"{}")] + [(b"u-new", event_bytes(e)) for e in new])
        got: list[dict] = []

        def three() -> bool:
            line = proc.stdout.readline()
            assert line, f"tail --follow ended: {proc.stderr.read()}"
            got.append(json.loads(line))
            return len(got) == 3

        wait_until(three, 60, "three followed records", interval=0)
        assert [d["value"]["event_id"] for d in got] == ["n0", "n1", "n2"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
