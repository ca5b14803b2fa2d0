"""Off-policy evaluation: estimators recover known values on simulated logs; input errors name their line."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from click.testing import CliRunner

from models.evaluation.ope import LoggedRow, PolicyDataError, evaluate_rows, obd_to_jsonl
from stream.evaluate import evaluate_policy_file as evaluate_file
from stream.cli import cli

ACTIONS = ["none", "c5", "p10"]
# expected reward per (segment, action): conversion probability * margin-minus-cost
P_BUY = {"a": (0.10, 0.20, 0.12), "b": (0.30, 0.31, 0.33), "c": (0.05, 0.06, 0.15)}
GAIN = {"none": 10.0, "c5": 5.0, "p10": 7.0}
LOGGING = {"a": (0.6, 0.3, 0.1), "b": (0.2, 0.4, 0.4), "c": (0.34, 0.33, 0.33)}


def true_reward(ctx: dict, action: str) -> float:
    return P_BUY[ctx["seg"]][ACTIONS.index(action)] * GAIN[action]


def logging_true_value() -> float:
    return sum(LOGGING[s][k] * P_BUY[s][k] * GAIN[a] for s in "abc" for k, a in enumerate(ACTIONS)) / 3


def simulated_logs(n: int, seed: int) -> list[LoggedRow]:
    rnd = random.Random(seed)
    rows = []
    for t in range(n):
        seg = rnd.choice("abc")
        probs = LOGGING[seg]
        k = rnd.choices(range(3), probs)[0]
        a = ACTIONS[k]
        r = GAIN[a] if rnd.random() < P_BUY[seg][k] else 0.0
        rows.append(LoggedRow({"seg": seg, "cart": round(rnd.uniform(10, 200), 2)}, a, probs[k], r, line=t + 1))
    return rows


def test_estimators_cover_the_true_value_on_simulated_logs():
    hits = {"ips": 0, "dr": 0}
    total = 0
    for seed in range(12):
        rep = evaluate_rows(simulated_logs(3000, seed), seed=seed, true_reward=true_reward)
        for name in ["learned"] + [f"always:{a}" for a in ACTIONS]:
            pol = rep["policies"][name]
            truth = pol["true"]
            total += 1
            hits["ips"] += pol["ips_ci95"][0] <= truth <= pol["ips_ci95"][1]
            hits["dr"] += pol["dr_ci95"][0] <= truth <= pol["dr_ci95"][1]
            assert abs(pol["snips"] - truth) < 0.6, (seed, name, pol, truth)
        log_true = logging_true_value()
        lo, hi = rep["policies"]["logging"]["ci95"]
        total += 1
        hits["ips"] += lo <= log_true <= hi
        hits["dr"] += lo <= log_true <= hi
    # nominal 95 %: over 60 intervals each, allow a few misses but not systematic bias
    assert hits["ips"] >= 0.85 * total and hits["dr"] >= 0.85 * total, (hits, total)


def test_dr_is_tighter_than_ips_and_learned_beats_logging():
    rep = evaluate_rows(simulated_logs(6000, 1), true_reward=true_reward)
    p = rep["policies"]
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(p["always:p10"]["dr_ci95"]) < width(p["always:p10"]["ips_ci95"])
    # the best action per segment (a: none or c5, b: none, c: p10) is learnable: the learned policy beats logging
    assert p["learned"]["true"] > logging_true_value() + 0.2
    assert p["learned"]["dr"] > p["logging"]["dr"]
    assert set(rep) >= {"rows", "policies"} and rep["rows"] == 6000
    for name, pol in p.items():
        assert set(pol) >= {"ips", "snips", "dr", "ci95"}, name


def _write(tmp_path, lines, name="log.jsonl"):
    f = tmp_path / name
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return f


GOOD = {"context": {"seg": "a", "cart": 12.5}, "action": "c5", "propensity": 0.5, "reward": 3.0}


@pytest.mark.parametrize(
    "bad, line, fragment",
    [
        ({**GOOD, "action": "c9"}, 3, "unknown action 'c9'"),
        ({**GOOD, "propensity": 0}, 3, "'propensity' must be a number in (0, 1]"),
        ({**GOOD, "propensity": 1.5}, 3, "'propensity' must be a number in (0, 1]"),
        ({**GOOD, "reward": "1"}, 3, "'reward' must be a finite number"),
        ({**GOOD, "context": {"x": {"nested": 1}}}, 3, "context value 'x' must be a string or a finite number"),
        ({k: v for k, v in GOOD.items() if k != "reward"}, 3, "missing 'reward'"),
        ({**GOOD, "actions": ["none", "p10"]}, 3, "not among the row's eligible actions"),
        ("{not json", 3, "not valid JSON"),
        ("[1, 2]", 3, "expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad, line, fragment):
    f = _write(tmp_path, [{"actions": ACTIONS}, GOOD, bad])
    with pytest.raises(PolicyDataError) as info:
        evaluate_file(f)
    assert str(info.value).startswith(f"{f}:{line}: ") and fragment in str(info.value), str(info.value)


def test_jsonl_roundtrip_and_cli(tmp_path):
    rows = simulated_logs(400, 3)
    f = _write(tmp_path, [{"actions": ACTIONS}] + [
        {"context": r.context, "action": r.action, "propensity": r.propensity, "reward": r.reward} for r in rows])
    direct = evaluate_rows([list(ACTIONS)] + rows, seed=4, engine_policies=("thompson",))
    from_file = evaluate_file(f, seed=4)
    assert from_file["policies"] == direct["policies"] and from_file["seed"] == 4
    res = CliRunner().invoke(cli, ["evaluate", "policy", str(f), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["rows"] == 400 and out["policies"]["always:c5"] == direct["policies"]["always:c5"]
    bad = _write(tmp_path, [{"actions": ACTIONS}, {**GOOD, "action": "zz"}], "bad.jsonl")
    res = CliRunner().invoke(cli, ["evaluate", "policy", str(bad), "--json"])
    assert res.exit_code != 0 and f"{bad}:2: unknown action 'zz'" in res.output


def test_obd_reader_and_converter(tmp_path):
    from tests.helpers import DATA

    src = DATA / "open_bandit_random" / "men"
    sample = tmp_path / "men"
    sample.mkdir()
    with (src / "men.csv").open() as fh:
        (sample / "men.csv").write_text("".join(itertools.islice(fh, 1501)))
    (sample / "item_context.csv").write_text((src / "item_context.csv").read_text())
    rep = evaluate_file(sample, fmt="obd")
    assert rep["rows"] == 1500 and rep["actions"] == 34
    assert len([k for k in rep["policies"] if k.startswith("always:")]) == 34
    assert rep["policies"]["logging"]["ips"] == pytest.approx(rep["mean_reward"])
    out = tmp_path / "men.jsonl"
    assert obd_to_jsonl(sample, out) == 1500
    assert evaluate_file(out)["policies"] == rep["policies"]
    (sample / "men.csv").write_text("a,b\n1,2\n")
    with pytest.raises(PolicyDataError, match="not an Open Bandit Dataset CSV"):
        evaluate_file(sample, fmt="obd")


def test_engine_policies_are_replayed_and_reported_beside_the_others():
    """The worker's own policy classes, replayed over the log, are reported as ``engine:<name>`` with the same
    fields; the Thompson policy learning every row finds the best action and its IPS interval covers its true
    value; with replay learning it learns only the rows it would have chosen itself."""
    rows = simulated_logs(3000, 2)
    rep = evaluate_rows(rows, seed=1, true_reward=true_reward, engine_policies=("thompson", "rules"), learning="all")
    p = rep["policies"]
    for name in ("engine:thompson", "engine:rules"):
        assert set(p[name]) >= set(p["learned"]) and p[name]["rows_learnt"] == 3000, name
    best_true = max(p[f"always:{a}"]["true"] for a in ACTIONS)
    assert p["engine:thompson"]["true"] >= 0.9 * best_true, (p["engine:thompson"], best_true)
    assert p["engine:thompson"]["ips_ci95"][0] <= p["engine:thompson"]["true"] <= p["engine:thompson"]["ips_ci95"][1]
    replayed = evaluate_rows(rows, seed=1, engine_policies=("thompson",))["policies"]["engine:thompson"]
    assert replayed["learning"] == "replay" and 0 < replayed["rows_learnt"] < 3000
    assert evaluate_rows(rows, seed=1, engine_policies=("thompson",))["policies"]["engine:thompson"] == replayed


def test_cli_policy_option(tmp_path):
    rows = simulated_logs(300, 5)
    f = _write(tmp_path, [{"actions": ACTIONS}] + [
        {"context": r.context, "action": r.action, "propensity": r.propensity, "reward": r.reward} for r in rows])
    res = CliRunner().invoke(cli, ["evaluate", "policy", str(f), "--policy", "rules", "--policy", "thompson", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["policies"]
    assert {"engine:rules", "engine:thompson"} <= set(out)
    res = CliRunner().invoke(cli, ["evaluate", "policy", str(f), "--policy", "greedy", "--json"])
    assert res.exit_code != 0


def test_the_engine_replay_gives_the_policy_each_rows_trigger():
    """A ledger's context names its trigger: the replayed Thompson policy reads the cells of that trigger (logs
    without one are a cart's)."""
    from models.evaluation.ope.engine import EnginePolicyReplay
    from models.evaluation.ope.logged import LoggedRow

    replay = EnginePolicyReplay("thompson", ["none", "coupon_5"], p_min=0.5)
    at_cart = replay.context(LoggedRow({"cart_value": 40.0, "segment": 1}, "none", 0.5, 0.0, line=1))
    abandoned = replay.context(LoggedRow({"cart_value": 40.0, "segment": 1, "trigger": "cart_abandonment"},
                                         "none", 0.5, 0.0, line=2))
    assert (at_cart.trigger, abandoned.trigger) == ("cart", "cart_abandonment")
    assert "trigger" not in abandoned.features
    assert replay.policy.cell(abandoned) == replay.policy.cell(at_cart) + ("cart_abandonment",)


def _uniform_rows(n: int, paying) -> list[LoggedRow]:
    """``n`` rows logged uniformly over actions a0..a9; row ``t`` pays 1 when its action is ``paying(t)``."""
    actions = [f"a{i}" for i in range(10)]
    return [LoggedRow({"s": "x"}, actions[t % 10], 0.1, 1.0 if actions[t % 10] == paying(t) else 0.0)
            for t in range(n)]


def test_the_cross_fitted_best_constant_is_not_fooled_by_a_lucky_action():
    """a3 pays only in the first half and a7 only in the second: chosen in hindsight, either looks good; chosen on
    one half and scored on the other, neither earns anything."""
    rep = evaluate_rows(_uniform_rows(200, lambda t: "a3" if t < 100 else "a7"))
    assert rep["policies"][rep["best_constant_ips"]]["ips"] == pytest.approx(0.5)
    cross = rep["best_constant_cross_fitted"]
    assert [h["policy"] for h in cross["halves"]] == ["always:a3", "always:a7"]
    assert [h["ips_where_chosen"] for h in cross["halves"]] == [1.0, 1.0]
    assert cross["ips"] == 0.0 and all(h["ips_on_other_half"] == 0.0 for h in cross["halves"])


def test_the_cross_fitted_best_constant_keeps_an_action_that_pays_throughout():
    rep = evaluate_rows(_uniform_rows(200, lambda t: "a5"))
    cross = rep["best_constant_cross_fitted"]
    assert [h["policy"] for h in cross["halves"]] == ["always:a5", "always:a5"]
    assert cross["ips"] == pytest.approx(rep["policies"]["always:a5"]["ips"]) == pytest.approx(1.0)
    low, high = cross["halves"][0]["ci95"]
    assert low <= 1.0 <= high


def test_holdout_rows_of_a_ledger_export_are_left_out_not_counted_as_earning_nothing(tmp_path):
    """A ledger export holds the control group's decisions (always none, propensity 1, "group": "holdout"). No
    target policy could give an offer there, so IPS counted those rows as earning nothing under every offer and
    undervalued each offer by about the holdout share (0.38 for a true 0.40, outside its own interval)."""
    from models.evaluation.ope import iter_jsonl

    rnd = random.Random(1)
    p_buy = {"none": 0.2, "coupon": 0.4}
    lines = []
    for i in range(40_000):
        a, p, group = ("none", 1.0, "holdout") if rnd.random() < 0.05 else (rnd.choice(["none", "coupon"]), 0.5,
                                                                             "treatment")
        lines.append(json.dumps({"context": {"segment": "segment_1"}, "action": a, "propensity": p,
                                 "reward": float(rnd.random() < p_buy[a]), "decision_id": f"d{i}", "group": group}))
    path = tmp_path / "ledger.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = evaluate_rows(iter_jsonl(path))
    assert 0 < report["holdout_rows_left_out"] == 40_000 - report["rows"]
    lo, hi = report["policies"]["always:coupon"]["ips_ci95"]
    assert lo <= 0.4 <= hi


def test_a_constant_policy_that_falls_back_to_the_logged_action_is_weighted_as_the_logging_policy():
    """Where an action and `none` are both ineligible, `always:<a>` takes the logged action: it is the logging
    policy on that row, weight 1. Weighted 1/p, IPS estimated the sum of the actions' rewards (0.99 for 0.5)."""
    rnd = random.Random(0)
    rows: list = [["x", "y", "z"]]  # z declared, eligible on no row
    for _ in range(20_000):
        a = rnd.choice(["x", "y"])
        rows.append(LoggedRow({"s": "a"}, a, 0.5, float(rnd.random() < 0.5), actions=["x", "y"]))
    z = evaluate_rows(rows, true_reward=lambda ctx, a: 0.5 if a in "xy" else 0.0)["policies"]["always:z"]
    for estimate in ("ips", "dr"):
        lo, hi = z[f"{estimate}_ci95"]
        assert lo <= 0.5 <= hi, (estimate, z)


def test_a_value_of_exactly_zero_outranks_a_loss():
    """Rewards are margins net of cost, so they can be negative: `always:none` at exactly 0 is better than an offer
    that loses money (0.0 was ranked as minus infinity)."""
    rows = [LoggedRow({"seg": "a"}, a, 0.5, r) for _ in range(200) for a, r in (("none", 0.0), ("coupon", -1.0))]
    report = evaluate_rows(rows)
    assert report["best_constant_ips"] == report["best_constant"] == "always:none"
