"""How a profile is stored: plain JSON values (one document, what the engine's store writes) or, as earlier
versions wrote it, a Redis hash of text values; both read back exactly.

:class:`ProfileCodec` holds the field tables of the profile dataclass (made once, when
:mod:`models.profile` is imported); :class:`models.profile.Profile`'s ``to_dict``, ``from_dict``, ``to_redis``
and ``from_redis`` call it.

Examples
--------
>>> from models.profile import Profile
>>> codec = ProfileCodec(Profile)
>>> p = Profile(n_orders=2, spend=1.5, session_id="s1", item_window=[["i1", 5, 1.0]])
>>> text = codec.to_redis(p)
>>> text["n_orders"], text["spend"], text["session_id"], text["item_window"]
('2', '1.5', 's1', '[["i1",5,1.0]]')
>>> codec.from_redis(text) == p == codec.from_dict(codec.to_dict(p)) == codec.from_dict(text)
True
"""

from __future__ import annotations

import json
from dataclasses import fields

from models.events import EVENT_TYPES

__all__ = ["ProfileCodec", "JSON_FIELDS", "TEXT_FIELDS"]

JSON_FIELDS = ("counts", "cart", "recent_items", "offer_history", "offer_totals", "cat_aff", "item_aff", "item_window",
               "timers", "fired", "trigger_log")
RENAMED_FIELDS = {"win": "item_window"}
"""Fields written by earlier versions under another name: read under the new one."""
"""Fields held as JSON text in the Redis hash (containers)."""

TEXT_FIELDS = ("session_id", "last_type", "last_category")
"""Fields held as they are in the Redis hash (strings); every other field is a number written with ``repr``."""


class ProfileCodec:
    """Encodes and decodes the profiles of the dataclass ``cls``; a field of another version is ignored on read
    (and dropped on the next write), a missing one keeps its default."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.types = {f.name: f.type for f in fields(cls)}
        self.names = tuple(self.types)
        self.name_set = frozenset(self.types)
        self.numeric = frozenset(n for n in self.types if n not in JSON_FIELDS and n not in TEXT_FIELDS)

    def to_redis(self, p) -> dict[str, str]:
        """The full hash to write (absolute values; floats in ``repr`` so they round-trip exactly)."""
        out: dict[str, str] = {}
        for name in self.names:
            v = getattr(p, name)
            if name in JSON_FIELDS:
                out[name] = json.dumps(v, separators=(",", ":"))
            elif name in TEXT_FIELDS:
                out[name] = v
            else:
                out[name] = repr(v)
        return out

    def to_dict(self, p) -> dict:
        """The profile as plain JSON values (what the engine's store packs into ONE JSON document)."""
        d = p.__dict__
        return {name: d[name] for name in self.names}

    def from_dict(self, mapping: dict):
        """Inverse of :meth:`to_dict`; also reads :meth:`to_redis` mappings (values as text), so profiles written
        by earlier versions load unchanged. An empty mapping is a new user."""
        if not mapping:
            return self.cls()
        numeric = self.numeric
        if any(isinstance(v, (str, bytes)) for k, v in mapping.items() if k in numeric):
            return self.from_redis(mapping)  # the text encoding
        p = self.cls()
        d = p.__dict__
        names = self.name_set
        for k, v in mapping.items():
            k = RENAMED_FIELDS.get(k, k)
            if k in names:
                d[k] = v
        counts = p.counts
        for t in EVENT_TYPES:
            counts.setdefault(t, 0)
        return p

    def from_redis(self, mapping: dict):
        """Build from an ``HGETALL`` answer (bytes or str); an empty mapping is a new user."""
        p = self.cls()
        if not mapping:
            return p
        types = self.types
        for k, v in mapping.items():
            k = k.decode() if isinstance(k, bytes) else k
            k = RENAMED_FIELDS.get(k, k)
            v = v.decode() if isinstance(v, bytes) else v
            if k not in types:
                continue  # a field of another version: ignored (and dropped on the next write)
            if k in JSON_FIELDS:
                setattr(p, k, json.loads(v))
            elif k in TEXT_FIELDS:
                setattr(p, k, v)
            elif types[k] in ("int", int):
                setattr(p, k, int(v))
            else:
                setattr(p, k, float(v))
        for t in EVENT_TYPES:
            p.counts.setdefault(t, 0)
        return p
