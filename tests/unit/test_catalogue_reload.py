"""Changing the offer catalogue of a running engine (models.catalogue_swap, Engine.set_catalogue) and the worker's
side of it (stream.catalogue), on in-memory stores. The real stack with two workers: tests/integration/
test_catalogue_reload.py."""

from __future__ import annotations

import asyncio

import pytest

from models.batch import BatchProgress
from models.catalogue_swap import catalogue_version, rebuild
from models.engine import Engine
from models.events import Event
from models.policy.budget import BudgetGate
from models.policy.catalogue import CatalogueError, parse_catalogue
from models.policy.pacing import PacingController
from models.policy.rules import RulePolicy
from models.policy.thompson import ThompsonPolicy
from models.state.budget_memory import MemoryBudgetStore
from models.state.engine_memory import MemoryStore
from stream import metrics as m
from stream.catalogue import CatalogueWatcher, parse_stored, read_file

A = "offers:\n  - {offer_id: a5, kind: coupon, value: 5, prior_uplift: 0.5, budget: 100}\n"
B = "offers:\n  - {offer_id: b7, kind: coupon, value: 7, prior_uplift: 0.5}\n"
H = 3_600_000


def run(coro):
    return asyncio.run(coro)


def engine(text: str = A, store=None, budgets=None) -> Engine:
    cat = parse_catalogue(text)
    gate = BudgetGate(cat, budgets or MemoryBudgetStore(), window_ms=24 * H)
    return Engine(store or MemoryStore(), RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                  budget=gate, clock_ms=lambda: 0, decision_cooldown_s=0, catalogue_version="vA")


def carts(users: range, ts: int = 0) -> list[Event]:
    return [Event(f"c{u}-{ts}", "cart", f"u{u}", "i1", ts, price=100.0) for u in users]


def offers(result) -> set[str]:
    return {d.offer.offer_id for d in result.decisions}


def test_decisions_after_set_catalogue_use_the_new_one_and_removed_offers_still_close_with_their_cost():
    budgets = MemoryBudgetStore()
    eng = engine(budgets=budgets)
    first = run(eng.process_batch(carts(range(3))))
    assert offers(first) == {"a5"}
    assert eng.set_catalogue(parse_catalogue(B), "vB") is True  # no batch in progress: in use at once
    assert (eng.catalogue_version, eng.pending_catalogue_version) == ("vB", None)
    assert offers(run(eng.process_batch(carts(range(3, 6))))) == {"b7"}
    assert eng.policy.catalogue is eng.catalogue is eng.planner.policy.catalogue
    assert "a5" not in eng.catalogue and "a5" in eng.planner.catalogue  # kept for attribution only
    # a user redeems the a5 coupon sent before the change: the decision closes at a5's cost and its budget is charged
    d = first.decisions[0]
    buy = Event("p1", "purchase", d.user_id, "i1", 10, price=100.0, decision_id=d.decision_id)
    closed = run(eng.process_batch([buy])).closed
    assert [(c.outcome, c.cost) for c in closed] == [("redeemed", 5.0)]
    spend = run(budgets.spend(["a5"]))["a5"]
    assert spend.committed == 5.0 and spend.reserved == 10.0  # the other two still hold their reservations
    assert eng.budget.accounted == ["a5"] and eng.budget.budgets == {}


class FlakyStore(MemoryStore):
    """A store whose next commit fails once (a transient error: the batch is retried with the same progress)."""

    fail_next = False

    async def commit(self, commits):
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("Redis went away")
        return await super().commit(commits)


def test_a_catalogue_set_during_a_batch_waits_for_it_to_be_committed_whole():
    store = FlakyStore()
    eng = engine(store=store)
    progress = BatchProgress()
    store.fail_next = True
    with pytest.raises(ConnectionError):
        run(eng.process_batch(carts(range(3)), progress=progress))
    assert eng.set_catalogue(parse_catalogue(B), "vB") is False  # the batch is half-way: not now
    assert (eng.catalogue_version, eng.pending_catalogue_version) == ("vA", "vB")
    resumed = run(eng.process_batch(carts(range(3)), progress=progress))  # the retry of the same batch
    assert offers(resumed) == {"a5"}, "one batch decides with one catalogue"
    assert eng.catalogue_version == "vA"  # still: the next batch takes it
    assert offers(run(eng.process_batch(carts(range(3, 6))))) == {"b7"}
    assert (eng.catalogue_version, eng.pending_catalogue_version) == ("vB", None)


def test_a_changed_budget_holds_from_the_next_batch_and_money_already_held_is_kept():
    budgets = MemoryBudgetStore()
    eng = engine(budgets=budgets)
    assert offers(run(eng.process_batch(carts(range(4))))) == {"a5"}  # 4 x 5 reserved of 100
    lower = A.replace("budget: 100", "budget: 12")
    eng.set_catalogue(parse_catalogue(lower), catalogue_version(lower.encode()))
    res = run(eng.process_batch(carts(range(4, 8))))
    assert offers(res) == {"none"}, "spend 20 is above the new budget 12: nothing more is reserved"
    assert all(any("budget" in r for r in d.reasons) for d in res.decisions)
    assert run(budgets.spend(["a5"]))["a5"].reserved == 20.0  # what decisions already hold is not taken back
    higher = A.replace("budget: 100", "budget: 30")
    eng.set_catalogue(parse_catalogue(higher), catalogue_version(higher.encode()))
    assert [d.offer.offer_id for d in run(eng.process_batch(carts(range(8, 12)))).decisions].count("a5") == 2


def test_rebuild_keeps_learnt_posteriors_and_unchanged_pacing_of_the_offers_kept():
    old = parse_catalogue("offers:\n"
                          "  - {offer_id: a, kind: coupon, value: 5, budget: 100, period: {start: 0, end: 1000}}\n"
                          "  - {offer_id: b, kind: coupon, value: 5, budget: 100, period: {start: 0, end: 1000}}\n"
                          "  - {offer_id: c, kind: coupon, value: 5}\n")
    pacing = PacingController(old)
    policy = ThompsonPolicy(old, pacing=pacing)
    policy.cells = {("a", (1,)): [2.0, 3.0], ("c", (1,)): [1.0, 1.0]}
    gate = BudgetGate(old, MemoryBudgetStore(), pacing=pacing)
    new = parse_catalogue("offers:\n"
                          "  - {offer_id: a, kind: coupon, value: 6, budget: 100, period: {start: 0, end: 1000}}\n"
                          "  - {offer_id: b, kind: coupon, value: 5, budget: 50, period: {start: 0, end: 1000}}\n")
    out = rebuild(new, old, policy, gate)
    assert out.policy is not policy and out.policy.catalogue is new and policy.catalogue is old
    assert out.policy.cells == {("a", (1,)): [2.0, 3.0]}  # c is gone
    assert out.policy.pacing is out.budget.pacing
    assert out.policy.pacing.pacers["a"] is pacing.pacers["a"]  # same campaign: its controller goes on
    assert out.policy.pacing.pacers["b"] is not pacing.pacers["b"]  # budget changed: starts over
    assert out.accounting.offer_ids == ["none", "a", "b", "c"] and out.budget.budgets == {"a": 100, "b": 50}


# --- the worker's side (stream.catalogue) ------------------------------------------------------
class FakeRedis:
    """The calls CatalogueWatcher makes on the engine's asynchronous Redis client."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {}

    async def hget(self, key, field):
        return self.hashes.get(key, {}).get(field.encode())

    async def hgetall(self, key):
        return dict(self.hashes.get(key, {}))

    async def hset(self, key, mapping):
        self.hashes.setdefault(key, {}).update(
            {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in mapping.items()})


def _reloads(result: str) -> float:
    return m.CATALOGUE_RELOADS.labels(result=result)._value.get()


def test_the_watcher_takes_a_new_version_once_and_refuses_a_bad_one_with_file_and_line(tmp_path):
    from stream.settings import Settings

    settings = Settings(_env_file=None, redis_prefix="t", catalogue_path=tmp_path / "offers.yaml")
    eng = engine()
    eng.store.r = FakeRedis()
    watcher = CatalogueWatcher(settings, eng)
    applied, refused = _reloads("applied"), _reloads("refused")
    run(watcher.check())  # nothing applied: the catalogue in use stays
    assert eng.catalogue_version == "vA"

    good = tmp_path / "b.yaml"
    good.write_text(B)
    loaded = read_file(good)
    run(eng.store.r.hset("t:catalogue", loaded.fields()))
    run(watcher.check())
    run(watcher.check())  # the same version again: nothing to do
    assert eng.catalogue_version == loaded.version and "b7" in eng.catalogue
    assert _reloads("applied") == applied + 1

    bad = "offers:\n  - {offer_id: x, kind: coupon, value: 5}\n  - {offer_id: y, kind: coupn, value: 5}\n"
    run(eng.store.r.hset("t:catalogue", {"yaml": bad.encode(), "version": "badbadbadbad", "source": "hand.yaml"}))
    run(watcher.check())
    run(watcher.check())  # refused once, not every period
    assert eng.catalogue_version == loaded.version, "a bad catalogue is refused and the old one kept"
    assert _reloads("refused") == refused + 1
    with pytest.raises(CatalogueError, match=r"^hand\.yaml:3: offer y: kind 'coupn'"):
        parse_stored({b"yaml": bad.encode(), b"source": b"hand.yaml"})


def test_sighup_publishes_the_own_file_when_valid_and_refuses_it_otherwise(tmp_path):
    from stream.settings import Settings

    path = tmp_path / "offers.yaml"
    settings = Settings(_env_file=None, redis_prefix="t", catalogue_path=path)
    eng = engine()
    eng.store.r = FakeRedis()
    watcher = CatalogueWatcher(settings, eng)
    path.write_text("offers:\n  - {offer_id: b7, kind: coupon, value: 0}\n")
    run(watcher.reload_file())
    assert eng.catalogue_version == "vA" and eng.store.r.hashes == {}  # refused: nothing written
    path.write_text(B)
    run(watcher.reload_file())
    stored = eng.store.r.hashes["t:catalogue"]
    assert stored[b"version"].decode() == eng.catalogue_version == catalogue_version(B.encode())
    assert stored[b"yaml"] == B.encode() and stored[b"source"].decode() == str(path)


def test_apply_refuses_an_invalid_file_with_file_and_line_before_touching_redis(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stream.cli import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("offers:\n  - {offer_id: c5, kind: coupon, value: 5}\n  - {offer_id: c6, kind: coupon, value: -1}\n")
    monkeypatch.setenv("PROMO_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens: never reached
    res = CliRunner().invoke(cli, ["catalogue", "apply", str(bad), "--json"])
    assert res.exit_code == 2
    assert res.output.startswith(f"promo: error: {bad}:3: offer c6: value must be > 0, got -1")
