"""Offer kinds: one module each (``coupon``, ``percent_off``, ``threshold``, ``gift``, ``free_shipping``, and the
built-in ``none``), registered by name in :data:`KINDS` (:mod:`models.policy.offers.base`).

Every module of this package is imported here, so a new kind is one new module.

>>> {"none", "coupon", "percent_off", "threshold", "gift"} <= set(KINDS), "none" in catalogue_kinds()
(True, False)
"""

from __future__ import annotations

import importlib
import pkgutil

from models.policy.offers.base import KINDS, OfferKind, Param, register

__all__ = ["KINDS", "OfferKind", "Param", "register", "catalogue_kinds"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def catalogue_kinds() -> tuple[str, ...]:
    """The kinds a catalogue may use (every kind but the built-in ``none``), sorted."""
    return tuple(sorted(k for k, kind in KINDS.items() if kind.in_catalogue))
