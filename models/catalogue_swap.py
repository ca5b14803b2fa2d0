"""Changing the offer catalogue of a running engine: what depends on it, rebuilt for the new one.

:meth:`models.engine.Engine.set_catalogue` calls :func:`rebuild` between batches, so one batch plans, reserves and
commits with one catalogue whole. What carries over and why:

* the policy's learnt posteriors, for the offers the new catalogue keeps (an offer id is one campaign);
* a pacing controller's state, for campaigns whose budget and period are unchanged (a changed one starts over);
* the budget gate's spend as last read, for offers still budgeted (the next refresh reads it again anyway);
* removed offers, for accounting only (:func:`with_retired`): decisions already sent with them still close with
  their cost and settle their reservations; the policy never sees them, so it offers them no more.

Budgets: the limit travels with every reservation (:class:`models.state.budget_store.ReserveRequest`) and the
store compares it with the campaign's spend atomically, so a changed budget holds from the next batch on. What a
campaign already holds (reservations of open decisions, settled charges) is kept: a lower budget only stops new
reservations until settlements bring the spend below it; a higher one frees room at once.

>>> from models.policy.catalogue import parse_catalogue
>>> old = parse_catalogue("offers: [{offer_id: a, kind: coupon, value: 5}, {offer_id: b, kind: coupon, value: 3}]")
>>> new = parse_catalogue("offers: [{offer_id: c, kind: coupon, value: 7}]")
>>> with_retired(new, old).offer_ids
['none', 'c', 'a', 'b']
>>> catalogue_version(b"offers: []\\n")
'b5aca4f32626'
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import NamedTuple

from models.policy.catalogue import Catalogue


def catalogue_version(data: bytes) -> str:
    """A catalogue's version: the first 12 hex digits of the SHA-256 of its file's bytes (``promo catalogue
    check`` prints the same), so one text has one version wherever it is read."""
    return hashlib.sha256(data).hexdigest()[:12]


def with_retired(new: Catalogue, old: Catalogue) -> Catalogue:
    """``new`` plus the offers of ``old`` it no longer has, for attribution only: a decision sent with a removed
    offer still closes with that offer's cost (the user holds the coupon until it expires)."""
    retired = {oid: spec for oid, spec in old.offers.items() if oid not in new.offers}
    return dataclasses.replace(new, offers={**new.offers, **retired}) if retired else new


class Rebuilt(NamedTuple):
    policy: object  # the policy, now over the new catalogue
    budget: object  # models.policy.budget.BudgetGate or None
    accounting: Catalogue  # the new catalogue plus retired offers (the planner's, for attribution)


def rebuild(catalogue: Catalogue, accounting: Catalogue, policy, budget) -> Rebuilt:
    """The policy, budget gate and accounting catalogue for ``catalogue``, from the engine's current ones.

    A new policy object (a shallow copy) rather than a change in place: nothing of the old catalogue is left in
    it, and a caller still holding the old one sees a consistent object."""
    pacing = _pacing(getattr(policy, "pacing", None) or getattr(budget, "pacing", None), catalogue)
    new_policy = copy.copy(policy)
    new_policy.catalogue = catalogue
    if hasattr(new_policy, "pacing"):
        new_policy.pacing = pacing
    cells = getattr(policy, "cells", None)
    if isinstance(cells, dict):  # learnt posteriors of the offers kept (shared ones are read back anyway)
        new_policy.cells = {k: v for k, v in cells.items() if k[0] in catalogue.offers}
    new_budget = budget.for_catalogue(catalogue, pacing) if budget is not None else None
    return Rebuilt(new_policy, new_budget, with_retired(catalogue, accounting))


def _pacing(old, catalogue: Catalogue):
    """A pacing controller for ``catalogue`` that keeps the state of campaigns whose budget and period did not
    change (None without one before)."""
    if old is None:
        return None
    from models.policy.pacing import PacingController

    new = PacingController(catalogue)
    for oid, pacer in list(new.pacers.items()):
        was = old.pacers.get(oid)
        if was is not None and (was.budget, was.start_ms, was.end_ms) == (pacer.budget, pacer.start_ms, pacer.end_ms):
            new.pacers[oid] = was
    return new
