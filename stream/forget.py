"""``promo forget USER_ID`` and the ``<prefix>.forget`` topic: delete everything the engine holds about a user.

Removed: the profile (counts, session, cart, caps and offer history, open decisions), every de-duplication
marker, every stored decision - all keys under the user's hash tag ``{u:<user>}`` (the id escaped,
:func:`models.keys.escape_user_id`, so the pattern matches this user's keys and no other user's) -, the user's
entry in the expiry sweep's index of open decisions and in the set of records with parked contributions, the
user's contributions to item statistics (subtracted from them in bounded, idempotent steps of at most
``FORGET_CHUNK_FIELDS`` record fields per Lua call, :meth:`models.state.item_redis.RedisItemStore.subtract_record`),
and the user's entries in the stored model snapshot (:func:`models.learning.snapshot.scrub_snapshot`). Workers drop the
user from their in-memory models at their next snapshot (``stream.app.Maintenance``), the worker that takes a
``<prefix>.forget`` request at once.
With ``PROMO_PSEUDONYMISE_KEY`` set, the id is pseudonymised first, exactly as at ingestion.

Order, so that an interrupted forget can be run again and finishes exactly: subtract the contribution record
(each step deletes the fields it subtracted), delete the user's other keys, add to the forget sequence (what a model
snapshot being written watches, so that it cannot bring the user back), scrub the stored snapshot, then one atomic
call subtracts what was applied meanwhile, deletes the record and the index entries and counts the user in
``<prefix>:forgotten`` (the cluster-wide count every worker exports as ``promo_users_forgotten_total``).

Events of the user that arrive after the forget are new data and build a new profile; events that arrive while
it runs may be forgotten in part (their profile update or their contributions).
"""

from __future__ import annotations

import sys
import time

from models.privacy import pseudonymise
from models.state.engine_redis import forgotten_key
from stream.errors import PromoError
from stream.settings import Settings


def engine_user_id(settings: Settings, user_id: str) -> str:
    if settings.pseudonymise_key:
        return pseudonymise(user_id, settings.pseudonymise_key.get_secret_value().encode())
    return user_id


def _kind(key: bytes, tag: str) -> str:
    rest = key.decode(errors="replace")[len(tag) + 1 :]
    kinds = {"p": "profile", "e": "markers", "d": "decisions", "c": "item_record", "l": "ledger"}
    return kinds.get(rest.split(":", 1)[0], "other")


def user_pattern(prefix: str, uid: str, kind: str = "*") -> tuple[str, str]:
    """``(tag, SCAN pattern)`` of user ``uid``'s keys (those of one ``kind`` such as ``d:*``, else all): the
    escaped id holds no ``}``, so the pattern matches exactly this user's keys; glob characters are escaped for
    ``MATCH``.

    >>> user_pattern("promo", "victim}:o*")
    ('promo:{u:victim%7D:o*}', 'promo:{u:victim%7D:o\\\\*}:*')
    """
    from models.keys import user_tag

    tag = user_tag(prefix, uid)
    pattern = tag.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?").replace("[", "\\[") + ":" + kind
    return tag, pattern


def forget_keys(client, prefix: str, uid: str, keep: frozenset[bytes] = frozenset()) -> dict[str, int]:
    """Delete every key of user ``uid`` but those in ``keep`` (sync redis-py client); counts of what was removed,
    by kind."""
    tag, pattern = user_pattern(prefix, uid)
    removed: dict[str, int] = dict.fromkeys(KEY_KINDS, 0)
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        if key in keep:
            continue
        removed[_kind(key, tag)] += 1
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)  # one hash tag: one slot, a multi-key DEL is Cluster-safe
            batch.clear()
    if batch:
        client.delete(*batch)
    return removed


KEY_KINDS = ("profile", "markers", "decisions", "item_record", "ledger", "other")


def keys_removed(removed: dict[str, int]) -> int:
    """How many keys ``removed`` counts (the open-decision index entry is a member of a shared key, the snapshot
    entry a part of a shared value)."""
    return sum(removed.get(kind, 0) for kind in KEY_KINDS)


def forget_user(settings: Settings, user_id: str) -> dict:
    """``promo forget``: forget ``user_id`` (clear, as the shop knows it) and report what was removed.

    ``found`` is false when the engine held nothing about the user (a one-line note goes to stderr; the exit
    status stays 0: nothing is held, which is what a forget asks for)."""
    import redis

    import models.learning.core  # noqa: F401  (its imports take a second: not part of the forget's time)

    if not user_id or len(user_id) > settings.max_string_len:
        raise PromoError(f"user id must be 1..{settings.max_string_len} characters, got {len(user_id)}")
    t0 = time.perf_counter()
    uid = engine_user_id(settings, user_id)
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=30.0)
        removed, items = forget_everything(settings, client, uid)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise PromoError(
            f"Redis at {settings.redis_url_safe} (PROMO_REDIS_URL) did not answer ({type(exc).__name__}: {exc}); "
            "the forget may be part done: run it again when Redis answers, it finishes exactly"
        ) from exc
    client.close()
    found = bool(items.pop("counted"))
    if not found:
        print("promo forget: the engine holds nothing about this user (no keys, contributions, open decision "
              "or snapshot entry); nothing was deleted", file=sys.stderr)
    return {
        "user_id": user_id if not settings.pseudonymise_key else uid,
        "found": found,
        "removed": removed,
        "item_contributions": items,
        "keys_removed": keys_removed(removed),
        "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2),
    }


def forget_everything(settings: Settings, client, uid: str, max_rounds: int = 20) -> tuple[dict[str, int], dict]:
    """Forget ``uid`` as the engine knows it (pseudonymised already), in the order of the module docstring.
    Sync client. Returns the keys removed by kind (``open_index``: the index entry, ``snapshot``: 1 if the stored
    model snapshot held the user) and the contributions subtracted (``items``, ``pairs``, ``popularity``,
    ``fields``, ``calls``, ``max_call_ms``: the longest Lua call, ``forgotten_total``: the shared count after,
    ``counted``: 1 if something of the user was found and the user was counted)."""
    from models.state.item_redis import RedisItemStore
    from models.learning.snapshot import forget_seq_key, scrub_snapshot

    prefix = settings.redis_prefix
    store = RedisItemStore(client, prefix=prefix)
    record = store.record_key(uid)
    had_record = bool(client.exists(record))
    stats = store.subtract_record(uid)
    removed = forget_keys(client, prefix, uid, keep=frozenset({record.encode()}))
    # between the keys and the stored snapshot: a snapshot being written meanwhile sees the profile gone, or this
    # step (and writes again), or is written before the scrub below (models.learning.snapshot.save_snapshot_fenced)
    client.incr(forget_seq_key(prefix))
    scrubbed = scrub_snapshot(client, [uid], prefix)
    found = had_record or keys_removed(removed) > 0 or scrubbed > 0
    for _ in range(max_rounds):
        done = store.drop_record(uid, parked_key=f"{prefix}:sim:parked", open_index=(f"{prefix}:open", uid),
                                 counter_key=forgotten_key(prefix), found=found, stats=stats)
        if done is not None:
            break
        store.subtract_record(uid, stats=stats)  # the user's contributions kept arriving: subtract them too
    else:
        raise PromoError(f"the user's contributions kept arriving during {max_rounds} rounds of forgetting; the "
                         "user's keys are deleted but part of the contribution record is left: run the forget again")
    removed["item_record"] += int(stats.pop("record") or had_record)
    removed["open_index"] = stats.pop("open_index")
    removed["snapshot"] = scrubbed
    return removed, stats
