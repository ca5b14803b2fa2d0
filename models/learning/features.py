"""What the purchase propensity and segment models see: the profile's features, how often the current item and
category convert, and the event's context.

* :data:`MODEL_FEATURE_NAMES`: the dense features (:data:`models.profile_features.FEATURE_NAMES`, then
  :data:`CONVERSION_FEATURES`: the log-odds of a purchase of the user's current item and category, learnt from
  past events by :class:`models.learning.conversion.ConversionRates`, then
  :data:`models.learning.behaviour_features.BEHAVIOUR_FEATURES`: per-session rates, time of day, gaps and the
  current category), as :func:`model_values` lists them;
* :func:`context_features`: the event's ``context`` (numbers as ``ctx_<key>``, strings of the given keys one-hot
  as ``ctx_<key>=<value>``), sparse.

Examples
--------
>>> context_features({"channel": "app", "basket": 2, "gift": True, "note": "text"}, DEFAULT_CONTEXT_KEYS)
{'ctx_channel=app': 1.0, 'ctx_basket': 2.0}
>>> from models.learning.conversion import ConversionRates
>>> from models.profile import Profile
>>> values = model_values(Profile(), 0, None, ConversionRates(), ConversionRates())
>>> len(values) == len(MODEL_FEATURE_NAMES)
True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from models.learning.behaviour_features import BEHAVIOUR_FEATURES, behaviour_values
from models.profile_features import FEATURE_NAMES

if TYPE_CHECKING:
    from models.learning.conversion import ConversionRates
    from models.profile import Profile
    from models.profile_features import CategoryStats

__all__ = ["CONVERSION_FEATURES", "MODEL_FEATURE_NAMES", "DEFAULT_CONTEXT_KEYS", "model_values", "context_features"]

CONVERSION_FEATURES = ("item_conversion", "category_conversion")
"""Log-odds of a purchase of the user's current item and category (smoothed conversion rates)."""

MODEL_FEATURE_NAMES = FEATURE_NAMES + CONVERSION_FEATURES + BEHAVIOUR_FEATURES
"""The dense features, in :func:`model_values` order."""

DEFAULT_CONTEXT_KEYS = frozenset({"channel", "device", "behavior", "platform", "country"})
"""Context keys whose string values become one-hot features (low-cardinality ones)."""


def model_values(profile: Profile, now_ms: int, stats: CategoryStats | None, item_conv: ConversionRates,
                 cat_conv: ConversionRates) -> list[float]:
    """The dense features of ``profile`` at event time ``now_ms``, in :data:`MODEL_FEATURE_NAMES` order."""
    values = profile.feature_values(now_ms, stats)
    values.append(item_conv.log_odds(profile.recent_items[-1] if profile.recent_items else None))
    values.append(cat_conv.log_odds(profile.last_category))
    values += behaviour_values(profile, now_ms, cat_conv)
    return values


def context_features(context: dict | None, keys: frozenset[str]) -> dict | None:
    """The event's ``context`` as sparse features (``None`` when there are none): finite numbers as
    ``ctx_<key>``, strings of ``keys`` as ``ctx_<key>=<value>``; booleans, ``None`` and other strings are left out."""
    if not context:
        return None
    x = {}
    for k, v in context.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            if math.isfinite(v):
                x[f"ctx_{k}"] = float(v)
        elif k in keys:
            x[f"ctx_{k}={v}"] = 1.0
    return x or None
