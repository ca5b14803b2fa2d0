"""``promo user show``, ``promo explain`` and ``promo ledger export`` through the real CLI, against a live worker's
state on the embedded stack: what an operator asks in the first hour ("why did user U get offer O?")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from models.policy.catalogue import load_catalogue
from tests.helpers import ROOT, event_bytes, metric, produce_raw, wait_until

TOKEN = "t0ken-for-views"

pytestmark = pytest.mark.integration


def promo(settings, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args],
                          env={**os.environ, **settings.to_env(), **(env or {})}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    """The same command run in this process (click's runner): the CLI's own code, without the 4 s of imports a new
    process pays; the calls that matter most run as a user runs them, in their own process (:func:`promo`)."""
    from click.testing import CliRunner

    from stream.cli import cli as promo_cli

    res = CliRunner().invoke(promo_cli, list(args), env=settings.to_env(), prog_name="promo")
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def ok_json(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def one_line_error(res: subprocess.CompletedProcess, code: int) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("promo: error: ")]
    assert res.stdout == "" and len(errors) == 1 and res.stderr.endswith(errors[0] + "\n"), res.stderr
    return errors[0]


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def shop_events(t0: int) -> list[dict]:
    """Two users who view and cart (a decision each); the first then buys, which closes their decision."""
    out = []
    for n, user in enumerate(("op-buyer", "op-browser")):
        ts = t0 + n * 1000
        out += [
            {"event_id": f"{user}-v1", "type": "view", "user_id": user, "item_id": "i-1", "ts": ts,
             "price": 120.0, "category": "shoes"},
            {"event_id": f"{user}-v2", "type": "view", "user_id": user, "item_id": "i-2", "ts": ts + 10,
             "price": 80.0, "category": "shoes"},
            {"event_id": f"{user}-c1", "type": "cart", "user_id": user, "item_id": "i-1", "ts": ts + 20,
             "price": 120.0, "category": "shoes", "context": {"channel": "web"}},
        ]
    out.append({"event_id": "op-buyer-p1", "type": "purchase", "user_id": "op-buyer", "item_id": "i-1",
                "ts": t0 + 5000, "price": 120.0, "category": "shoes", "order_id": "o-1"})
    return out


def test_user_show_explain_and_ledger_export_answer_from_the_live_state(engine_settings, start_worker, tmp_path):
    s = engine_settings.model_copy(update={"http_views_token": TOKEN})
    w = start_worker(s)
    w.wait_ready()
    events = shop_events(int(time.time() * 1000) - 60_000)
    produce_raw(s, s.topic_events, [(e["user_id"].encode(), event_bytes(e)) for e in events])
    wait_until(lambda: metric(w.metrics(), "promo_events_total") == len(events), 120, "every event applied")
    assert metric(w.metrics(), "promo_decisions_total") == 2

    # user show: the browser's decision is open and sent, the buyer's closed
    browser = wait_until(lambda: (v := ok_json(cli(s, "user", "show", "op-browser", "--json")))["decisions"]
                         and v["decisions"][0]["sent"] and v, 60, "the browser's decision marked sent")
    assert browser["found"] and browser["profile"]["events"]["cart"] == 1
    assert [c["item_id"] for c in browser["profile"]["cart"]] == ["i-1"]
    assert len(browser["open_decisions"]) == 1 and browser["closed"] == []
    (decision,) = browser["decisions"]
    assert decision["items"] and "i-1" not in decision["items"]  # a fresh stack: items, none from the cart
    assert browser["open_decisions"][0]["decision_id"] == decision["decision_id"]
    assert 0.0 < browser["p_buy"] < 1.0 and isinstance(browser["segment"], int)
    assert isinstance(browser["recommended_items"], list)
    assert browser["caps"]["offers_today"] == (decision["offer"]["kind"] != "none")
    buyer = ok_json(promo(s, "user", "show", "op-buyer", "--json"))
    assert buyer["open_decisions"] == [] and buyer["profile"]["orders"] == 1
    assert [c["outcome"] for c in buyer["closed"]] == ["converted"]
    missing = cli(s, "user", "show", "nobody-here", "--json")
    assert missing.returncode == 1 and json.loads(missing.stdout)["found"] is False and "no profile" in missing.stderr

    # explain, finding the user through the decisions topic: every catalogue offer judged in the stored context
    why = ok_json(promo(s, "explain", decision["decision_id"], "--json"))
    catalogue = load_catalogue(s.catalogue_path)
    assert [o["offer_id"] for o in why["offers"]] == list(catalogue.offers)
    assert all(o["verdict"] for o in why["offers"])
    (chosen,) = [o for o in why["offers"] if o["chosen"]]
    assert chosen["offer_id"] == decision["offer"]["offer_id"] == why["chosen"]
    assert chosen["verdict"] == "eligible" and chosen["probability"] == decision["propensity"]
    assert why["context"]["cart_value"] == 120.0 and why["context"]["p_buy"] > 0
    assert why["p_buy_contributions"][-1]["feature"] == "(intercept)"
    assert why["outcome"] is None and why["sent"] is True
    readable = promo(s, "explain", decision["decision_id"], "--user", "op-browser")
    assert readable.returncode == 0 and readable.stdout.startswith(f"decision {decision['decision_id']} ")
    assert f"* {chosen['offer_id']}" in readable.stdout
    closed_why = ok_json(cli(s, "explain", buyer["closed"][0]["decision_id"], "--user", "op-buyer", "--json"))
    assert closed_why["outcome"]["outcome"] == "converted"
    assert "not in the decisions topic" in one_line_error(cli(s, "explain", "no-such-decision"), 2)
    assert "holds no decision" in one_line_error(cli(s, "explain", "no-such", "--user", "op-browser"), 2)

    # the worker's read-only HTTP views answer the same, with the token only
    assert get(f"{w.base_url}/users/op-browser")[0] == 401
    assert get(f"{w.base_url}/users/op-browser", "wrong")[0] == 401
    status, live = get(f"{w.base_url}/users/op-browser", TOKEN)
    assert status == 200 and live["open_decisions"] == browser["open_decisions"]
    assert live["profile"] == browser["profile"] and live["recommended_items"] == browser["recommended_items"]
    assert get(f"{w.base_url}/users/nobody-here", TOKEN)[0] == 404
    status, live_why = get(f"{w.base_url}/decisions/{decision['decision_id']}?user=op-browser", TOKEN)
    assert status == 200 and live_why["offers"] == why["offers"] and live_why["chosen"] == why["chosen"]
    assert get(f"{w.base_url}/decisions/{decision['decision_id']}", TOKEN)[0] == 400
    assert get(f"{w.base_url}/decisions/no-such?user=op-browser", TOKEN)[0] == 404

    # ledger export: the closed decision, in evaluate policy's format, which evaluate policy reads
    out = tmp_path / "ledger.jsonl"
    res = promo(s, "ledger", "export", "--output", str(out))
    assert res.returncode == 0 and "1 closed decisions" in res.stderr, res.stderr
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["decision_id"] == buyer["closed"][0]["decision_id"] and row["outcome"] == "converted"
    assert 0 < row["propensity"] <= 1 and row["context"]["cart_value"] == 120.0
    report = ok_json(cli(s, "evaluate", "policy", str(out), "--json"))
    assert report["rows"] == 1
    assert cli(s, "ledger", "export", "--since", "2099-01-01T00:00:00Z").stdout == ""

    # forget leaves nothing to export or explain
    ok_json(cli(s, "forget", "op-buyer", "--json"))
    assert cli(s, "ledger", "export").stdout == ""
    assert cli(s, "user", "show", "op-buyer").returncode == 1
