"""User ids in Redis key names: escaped so that one user's keys can never match another user's pattern.

Every key of a user is ``<prefix>:{u:<escaped id>}:<kind>...`` (:class:`models.state.engine_redis.RedisStore`,
:meth:`models.state.item_redis.RedisItemStore.record_key`, ``promo forget``). The escaped id contains no ``}``, so the
hash tag ends right after it: ``promo forget`` scans ``<prefix>:{u:<escaped id>}:*`` and matches the keys of that
user and of no other (before, ``{u:victim}:*`` also matched every key of a user called ``victim}:other``), and
Redis Cluster hashes each user's keys to one slot whatever the id holds.

Escaping is percent-encoding of ``%``, ``{``, ``}`` and the control characters U+0000-U+001F and U+007F (those
are rejected at validation anyway; a ``promo forget`` argument may still hold one). Everything else is kept, so
ordinary ids (``512386086``, ``shop:42``, pseudonyms ``p-<hex>``) name the same keys as before and existing data
stays readable. ``%`` is escaped too, which makes the mapping one-to-one: the id ``a%7D`` (``a%257D``) and the id
``a}`` (``a%7D``) never share keys.

>>> escape_user_id("512386086"), escape_user_id("shop:42"), escape_user_id("victim}:other")
('512386086', 'shop:42', 'victim%7D:other')
>>> escape_user_id("a%7D"), escape_user_id("{x}\\x1f")
('a%257D', '%7Bx%7D%1F')
>>> all(unescape_user_id(escape_user_id(u)) == u for u in ("a%7D", "a}", "%", "{u:1}", "é\\x7f"))
True
"""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["escape_user_id", "unescape_user_id", "CONTROL_CHARS"]

CONTROL_CHARS = frozenset(map(chr, [*range(0x20), 0x7F]))
"""Characters an id may not contain (validation rejects them; keys escape them)."""

_ESCAPE = {ord(c): f"%{ord(c):02X}" for c in ("%", "{", "}", *CONTROL_CHARS)}


def escape_user_id(user_id: str) -> str:
    """The form of ``user_id`` used inside key names (see the module docstring)."""
    # most ids need no escape: three C-speed scans and isprintable (False for every control character) say so
    # five times faster than translate, which runs for every key of every event
    if "%" not in user_id and "{" not in user_id and "}" not in user_id and user_id.isprintable():
        return user_id
    return user_id.translate(_ESCAPE)


def user_tag(prefix: str, user_id: str) -> str:
    """``<prefix>:{u:<id>}``, the id escaped: the start of every key of one user (one hash tag, one Redis Cluster
    slot), and of no other user's.

    >>> user_tag("promo", "victim}:other")
    'promo:{u:victim%7D:other}'
    """
    return f"{prefix}:{{u:{escape_user_id(user_id)}}}"


def unescape_user_id(escaped: str) -> str:
    """The user id an escaped key part stands for (inverse of :func:`escape_user_id`)."""
    return unquote(escaped) if "%" in escaped else escaped
