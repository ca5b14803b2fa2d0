"""``promo forget USER_ID`` and the ``<prefix>.forget`` topic: delete everything the engine holds about a user.

Removed: the profile (counts, session, cart, caps and offer history, open decisions), every de-duplication
marker, every stored decision - all keys under the user's hash tag ``{u:<user>}`` -, the user's entry in the
expiry sweep's index of open decisions, and the user's contributions to item statistics where the learning core
keeps them (``forget_user`` of the item store, when it has one).
With ``PROMO_PSEUDONYMISE_KEY`` set, the id is pseudonymised first, exactly as at ingestion.

Events of the user that arrive after the forget are new data and build a new profile.
"""

from __future__ import annotations

import time

from models.privacy import pseudonymise
from stream.errors import PromoError
from stream.settings import Settings


def engine_user_id(settings: Settings, user_id: str) -> str:
    if settings.pseudonymise_key:
        return pseudonymise(user_id, settings.pseudonymise_key.get_secret_value().encode())
    return user_id


def _kind(key: bytes, tag: str) -> str:
    rest = key.decode(errors="replace")[len(tag) + 1 :]
    return {"p": "profile", "e": "markers", "d": "decisions", "c": "item_record"}.get(rest.split(":", 1)[0], "other")


def forget_keys(client, prefix: str, uid: str) -> dict[str, int]:
    """Delete every key of user ``uid`` (sync redis-py client); counts of what was removed, by kind."""
    tag = f"{prefix}:{{u:{uid}}}"
    pattern = tag.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?").replace("[", "\\[") + ":*"
    removed: dict[str, int] = {"profile": 0, "markers": 0, "decisions": 0, "item_record": 0, "other": 0}
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        removed[_kind(key, tag)] += 1
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)  # one hash tag: one slot, a multi-key DEL is Cluster-safe
            batch.clear()
    if batch:
        client.delete(*batch)
    return removed


def keys_removed(removed: dict[str, int]) -> int:
    """How many keys ``removed`` counts (the open-decision index entry is a member of a shared key)."""
    return sum(n for kind, n in removed.items() if kind != "open_index")


def forget_user(settings: Settings, user_id: str) -> dict:
    import redis

    if not user_id or len(user_id) > settings.max_string_len:
        raise PromoError(f"user id must be 1..{settings.max_string_len} characters, got {len(user_id)}")
    t0 = time.perf_counter()
    uid = engine_user_id(settings, user_id)
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0)
        removed, items = forget_everything(settings, client, uid)
    except redis.ConnectionError as exc:
        raise PromoError(
            f"cannot reach Redis at {settings.redis_url_safe} (PROMO_REDIS_URL): {exc}; nothing was deleted"
        ) from exc
    client.close()
    return {
        "user_id": user_id if not settings.pseudonymise_key else uid,
        "removed": removed,
        "item_contributions": items,
        "keys_removed": keys_removed(removed),
        "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2),
    }


def forget_everything(settings: Settings, client, uid: str) -> tuple[dict[str, int], dict[str, int]]:
    """The user's contributions subtracted from the item statistics (which reads their record, so first), then
    every key of the user deleted; ``uid`` as the engine knows it (pseudonymised already). Sync client."""
    from models.item_store import RedisItemStore

    items = RedisItemStore(client, prefix=settings.redis_prefix).forget_user(uid)
    removed = forget_keys(client, settings.redis_prefix, uid)
    removed["item_record"] += items.pop("record")  # deleted by forget_user
    # the expiry sweep's index of users with open decisions (a member of a shared key, not a key of the user)
    removed["open_index"] = int(client.zrem(f"{settings.redis_prefix}:open", uid))
    return removed, items
