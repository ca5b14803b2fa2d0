"""Every implementation of a state interface or of the policy runs its contract: a new store or policy without a
contract run fails here, naming what to add."""

from __future__ import annotations

import importlib
import pkgutil

import models
from models.policy.base import Policy
from models.state.budget_store import BudgetStore
from models.state.engine_store import EngineStore
from models.state.item_store import ItemStore
from tests.contracts import test_budget_stores, test_engine_stores, test_estimators, test_item_stores
from tests.contracts.mixins import BudgetStoreContract, EngineStoreContract, ItemStoreContract


def _implementations(base: type) -> set[type]:
    for info in pkgutil.walk_packages(models.__path__, "models."):
        importlib.import_module(info.name)
    out, todo = set(), [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if not getattr(sub, "__abstractmethods__", None) and sub.__module__.startswith("models."):
                out.add(sub)
    return out


def _covered(module, mixin: type) -> set[type]:
    """Implementations a contract test class of ``module`` builds (by the class name it is named after)."""
    names = {name.removeprefix("Test") for name, obj in vars(module).items()
             if isinstance(obj, type) and issubclass(obj, mixin) and obj is not mixin}
    return names


def test_every_store_implementation_runs_its_contract():
    for base, module, mixin in ((EngineStore, test_engine_stores, EngineStoreContract),
                                (ItemStore, test_item_stores, ItemStoreContract),
                                (BudgetStore, test_budget_stores, BudgetStoreContract)):
        impls = {cls.__name__ for cls in _implementations(base)}
        missing = impls - _covered(module, mixin)
        assert not missing, f"{sorted(missing)} implement {base.__name__} but run no contract: add a " \
                            f"Test<Name>({mixin.__name__}) to {module.__name__}"


def test_every_policy_and_learning_model_runs_the_checks():
    impls = {cls.__name__ for cls in _implementations(Policy)}
    missing = impls - set(test_estimators.FACTORIES)
    assert not missing, f"{sorted(missing)} implement Policy but run no checks: add a factory to " \
                        "tests/contracts/test_estimators.py FACTORIES"


def test_every_registered_trigger_and_offer_kind_comes_from_its_own_module():
    """The seams hold: a trigger or an offer kind is one module, found by its package (nothing else lists them)."""
    from models.policy.offers import KINDS
    from models.triggers import TRIGGERS

    assert {k: type(v).__module__.rsplit(".", 1)[1] for k, v in KINDS.items()} == {k: k for k in KINDS}
    assert {k: v.__module__.rsplit(".", 1)[1] for k, v in TRIGGERS.items()} == {k: k for k in TRIGGERS}
