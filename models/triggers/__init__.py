"""Triggers: the moments the engine decides at, one module each, registered by name in :data:`TRIGGERS`
(:mod:`models.triggers.base`). Every module of this package is imported here, so a new trigger is one new module.

>>> "cart" in TRIGGERS
True
"""

from __future__ import annotations

import importlib
import pkgutil

from models.triggers.base import TRIGGERS, Trigger, register

__all__ = ["TRIGGERS", "Trigger", "register"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
