"""A catalogue change at runtime, seen by two workers: ``promo catalogue apply`` on the real embedded stack.

Two ``promo worker`` processes share one consumer group. Each catalogue has a single offer, so every decision
(rules policy, no holdout, carts of 100) names the catalogue it was decided with: ``a5`` before the change,
``b7`` after it. A bad catalogue is refused by the command with ``file:line`` and exit 2 (nothing written), and one
written to Redis by hand is refused by both workers, which keep the version in use. A worker restarted after the
change starts with the applied catalogue, not its file; SIGHUP makes a worker apply its own file to every worker.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys

import pytest

from models.catalogue_swap import catalogue_version
from tests.helpers import ROOT, consume_all, event_bytes, free_port, http_get, metric, produce_raw, wait_until

pytestmark = pytest.mark.integration

OLD = "version: 1\noffers:\n  - {offer_id: a5, kind: coupon, value: 5, prior_uplift: 0.5}\n"
NEW = "version: 1\noffers:\n  - {offer_id: b7, kind: coupon, value: 7, prior_uplift: 0.5, budget: 1000}\n"
BAD = "version: 1\noffers:\n  - {offer_id: b7, kind: coupon, value: 7}\n  - {offer_id: c1, kind: coupn, value: 1}\n"
USERS = 48  # over 12 partitions: both workers' partitions get carts


def carts(tag: str) -> list[tuple[bytes, bytes]]:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out = []
    for i in range(USERS):
        user = f"{tag}-u{i}"
        out.append((user.encode(), event_bytes({"event_id": f"{tag}-e{i}", "type": "cart", "user_id": user,
                                                 "item_id": f"i{i % 7}", "ts": now, "price": 100.0})))
    return out


def readyz(w) -> dict:
    status, body = http_get(w.base_url + "/readyz")
    return json.loads(body) if status in (200, 503) else {}


def promo(settings, *args: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "stream.cli", *args], env={**os.environ, **settings.to_env()},
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def offers_by_trigger(settings, tag: str) -> dict[str, str]:
    """trigger event id -> offer id of the decisions for ``tag``'s carts (waits until every cart has one)."""
    msgs = consume_all(settings, settings.topic_decisions,
                       lambda ms: sum(1 for m in ms if json.loads(m.value)["trigger_event_id"].startswith(tag + "-"))
                       >= USERS, timeout=90)
    docs = (json.loads(m.value) for m in msgs)
    out = {d["trigger_event_id"]: d["offer"]["offer_id"] for d in docs if d["trigger_event_id"].startswith(tag + "-")}
    assert len(out) == USERS, f"{len(out)} of {USERS} decisions for {tag}"
    return out


def test_two_workers_take_up_a_catalogue_applied_at_runtime_and_refuse_a_bad_one(
        engine_settings, start_worker, redis_client, tmp_path):
    old, new, bad = tmp_path / "old.yaml", tmp_path / "new.yaml", tmp_path / "bad.yaml"
    old.write_text(OLD)
    new.write_text(NEW)
    bad.write_text(BAD)
    v_old, v_new = catalogue_version(OLD.encode()), catalogue_version(NEW.encode())
    s = engine_settings.model_copy(update={"catalogue_path": old, "policy": "rules", "holdout_pct": 0.0,
                                           "decision_cooldown_s": 0, "maintenance_interval_s": 1.0})
    w1, w2 = start_worker(s), start_worker(s.model_copy(update={"web_port": free_port()}))
    w1.wait_ready()
    w2.wait_ready()

    def assigned(w) -> set[int]:
        return set(readyz(w).get("assigned_partitions", []))

    wait_until(lambda: len(assigned(w1) | assigned(w2)) == s.partitions and assigned(w1) and assigned(w2), 90,
               "both workers to own partitions")
    assert readyz(w1)["catalogue_version"] == readyz(w2)["catalogue_version"] == v_old  # their file

    produce_raw(s, s.topic_events, carts("before"))
    assert set(offers_by_trigger(s, "before").values()) == {"a5"}

    checked = promo(s, "catalogue", "check", str(new), "--json")  # what an operator runs first
    assert checked.returncode == 0 and json.loads(checked.stdout)["version"] == v_new, checked.stderr
    checked_bad = promo(s, "catalogue", "check", str(bad))
    assert checked_bad.returncode == 2 and checked_bad.stderr.startswith(f"promo: error: {bad}:4: ")
    res = promo(s, "catalogue", "apply", str(new), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["version"] == v_new and report["previous_version"] is None
    assert report["offers"] == {"none": "none", "b7": "coupon"} and report["budgets"] == {"b7": 1000}
    wait_until(lambda: readyz(w1).get("catalogue_version") == readyz(w2).get("catalogue_version") == v_new, 60,
               "both workers to decide with the applied catalogue")
    for w in (w1, w2):
        sample = w.metrics()
        assert metric(sample, "promo_catalogue_info", version=v_new) == 1
        assert metric(sample, "promo_catalogue_info", version=v_old) == 0  # one series: the version in use
        assert metric(sample, "promo_catalogue_reloads_total", result="applied") == 1

    before = [metric(w.metrics(), "promo_offer_decisions_total", offer_id="b7") for w in (w1, w2)]
    produce_raw(s, s.topic_events, carts("after"))
    assert set(offers_by_trigger(s, "after").values()) == {"b7"}, "decisions after the change use the new catalogue"
    wait_until(lambda: all(metric(w.metrics(), "promo_offer_decisions_total", offer_id="b7") > b
                           for w, b in zip((w1, w2), before)), 30, "both workers to decide with b7")

    # a bad file: refused by the command with its file:line, nothing written, the workers keep the version
    res = promo(s, "catalogue", "apply", str(bad), "--json")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(f"promo: error: {bad}:4: offer c1: kind 'coupn' is not one of"), res.stderr
    assert redis_client.hget(f"{s.redis_prefix}:catalogue", "version").decode() == v_new

    # a bad one written to Redis by hand (not through the command): each worker refuses it once, keeps v_new
    redis_client.hset(f"{s.redis_prefix}:catalogue", mapping={"yaml": BAD, "version": "handwritten1",
                                                               "source": "by-hand.yaml"})
    wait_until(lambda: all(metric(w.metrics(), "promo_catalogue_reloads_total", result="refused") == 1
                           for w in (w1, w2)), 60, "both workers to refuse the bad catalogue")
    assert readyz(w1)["catalogue_version"] == readyz(w2)["catalogue_version"] == v_new
    assert any("by-hand.yaml:4: offer c1" in w.log_tail(200) for w in (w1, w2))

    # applied again, the good one: a worker restarted now starts with it, not with its own file
    assert promo(s, "catalogue", "apply", str(new), "--json").returncode == 0
    w2.stop()
    w3 = start_worker(s.model_copy(update={"web_port": free_port()}))
    w3.wait_ready()
    assert readyz(w3)["catalogue_version"] == v_new, "a restarted worker decides as its peers, not with its file"

    # SIGHUP: w1 re-reads its own file and applies it to Redis; every worker converges on it
    third = NEW.replace("b7", "d3")
    old.write_text(third)
    w1.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: readyz(w1).get("catalogue_version") == readyz(w3).get("catalogue_version")
               == catalogue_version(third.encode()), 60, "both workers to take up the file w1 re-read on SIGHUP")
    assert all(w.proc.poll() is None for w in (w1, w3))
