"""Triggers: the moments the engine decides at, one module each, registered by name in :data:`TRIGGERS`
(:mod:`models.triggers.base`). Every module of this package is imported here, so a new trigger is one new module.

>>> "cart" in TRIGGERS
True
"""

from __future__ import annotations

import importlib
import pkgutil

from models.triggers.base import TRIGGERS, TimerTrigger, Trigger, TriggerSpec, register

__all__ = ["TRIGGERS", "TimerTrigger", "Trigger", "TriggerSpec", "build_triggers", "register", "trigger_names"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

ORDER = ("cart", "post_purchase", "retention", "cart_abandonment", "browse_abandonment")
"""The order triggers are asked in (the first event trigger that fires at an event decides); others follow by name."""


def trigger_names(catalogue, names: list[str] | None = None) -> list[str]:
    """The triggers that are on: ``names`` (``PROMO_TRIGGERS``) when given, else ``cart`` unless the catalogue's
    ``triggers:`` section turns it off, and every trigger that section names without ``enabled: false``.

    >>> from models.policy.catalogue import load_catalogue
    >>> trigger_names(load_catalogue())
    ['cart']
    >>> trigger_names(load_catalogue(), ["browse_abandonment", "cart"])
    ['cart', 'browse_abandonment']
    """
    if names is not None:
        unknown = sorted(set(names) - set(TRIGGERS))
        if unknown:
            raise ValueError(f"unknown trigger(s) {unknown} (known: {', '.join(sorted(TRIGGERS))})")
        on = set(names)
    else:
        specs = getattr(catalogue, "triggers", {}) or {}
        on = {n for n, spec in specs.items() if spec.enabled}
        if "cart" not in specs:
            on.add("cart")
    return sorted(on, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def build_triggers(catalogue, names: list[str] | None = None, cart_cooldown_ms: int | None = None) -> list[Trigger]:
    """The triggers that are on (:func:`trigger_names`), configured by the catalogue's ``triggers:`` section; the
    cart's cooldown defaults to ``cart_cooldown_ms`` (``PROMO_DECISION_COOLDOWN_S``).

    >>> from models.policy.catalogue import load_catalogue
    >>> [(t.name, t.cooldown_ms) for t in build_triggers(load_catalogue(), None, 60_000)]
    [('cart', 60000)]
    """
    from models.triggers.base import TriggerSpec

    specs = getattr(catalogue, "triggers", {}) or {}
    out = []
    for name in trigger_names(catalogue, names):
        spec = specs.get(name) or TriggerSpec(name)
        out.append(TRIGGERS[name].from_spec(spec, cart_cooldown_ms if name == "cart" else None))
    return out
