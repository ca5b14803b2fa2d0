"""Model snapshots in Redis: one key per engine, the learning core's state as a pickle with the offsets it covers.

:meth:`models.learning.core.LearningCore.snapshot` and ``restore`` make and read the bytes (:func:`core_snapshot`,
:func:`restore_core`: the stored format, :data:`SNAPSHOT_VERSION`); this module keeps them under ONE key
(:func:`snapshot_key`), writes it without users forgotten while it was taken (:func:`save_snapshot_fenced`, the
worker's snapshot), and removes forgotten users from the stored snapshot (:func:`scrub_snapshot`, used by
``promo forget``). A snapshot is a pickle (not compressed):
load only snapshots written by the engine's own Redis.

Snapshots written before the models moved into packages (``models.similarity``, ``models.propensity``, ...) or
before a module was split (``models.learning.propensity``, ``models.profile``) still load: :func:`loads` finds
each class where it lives now (:data:`MOVED_MODULES`), under its new name if it was renamed (:data:`RENAMED`).

>>> from models.learning.similarity import ItemVocab
>>> v = ItemVocab()
>>> _ = v.index(["a", "b"])
>>> loads(dumps({"vocab": v}))["vocab"].index(["b"]).tolist()
[1]
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle

from models.state.item_memory import MemoryItemStore

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 2
"""The stored format: a dict of the core's state (:func:`core_snapshot`); the purchase model is under ``labels``.
Version 2: the purchase model sees more features (:data:`models.learning.features.MODEL_FEATURE_NAMES`); an
engine of version 1 refuses it (it would fail on the longer feature vectors) rather than misread it."""

READABLE_VERSIONS = (1, 2)
"""Versions :func:`restore_core` reads. A version 1 snapshot keeps everything but its purchase model, learnt on
fewer features: that model starts afresh (:func:`_restored_purchase_model`)."""

_PROPENSITY_MODULES = ("models.learning.propensity", "models.learning.delayed_labels", "models.learning.conversion",
                       "models.learning.rolling_logloss")
"""Where the classes of the one propensity module live now (it was split into one module per concept)."""

MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "models.similarity": ("models.learning.similarity",),
    "models.propensity": _PROPENSITY_MODULES,
    "models.learning.propensity": _PROPENSITY_MODULES,
    "models.segments": ("models.learning.segments",),
    "models.contrib": ("models.learning.contrib",),
    "models.learning": ("models.learning.core",),
    "models.item_store": ("models.state.item_memory", "models.state.item_store"),
    "models.profile": ("models.profile_features",),  # CategoryStats (the profile stays)
}
"""Where the classes of a module that moved live now (the first module that has the name wins)."""


RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("models.propensity", "ConversionStats"): ("models.learning.conversion", "ConversionRates"),
    ("models.learning.propensity", "ConversionStats"): ("models.learning.conversion", "ConversionRates"),
    ("models.propensity", "_Point"): ("models.learning.delayed_labels", "DecisionPoint"),
    ("models.learning.propensity", "_Point"): ("models.learning.delayed_labels", "DecisionPoint"),
}
"""Classes that changed their name: (old module, old name) -> (module, name)."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in RENAMED:
            module, name = RENAMED[(module, name)]
            return getattr(importlib.import_module(module), name)
        for new in MOVED_MODULES.get(module, ()):
            mod = importlib.import_module(new)
            if hasattr(mod, name):
                return getattr(mod, name)
        return super().find_class(module, name)


def dumps(state: dict) -> bytes:
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes):
    """Unpickle a snapshot, also one written before the package layout changed."""
    return _Unpickler(io.BytesIO(data)).load()


def core_snapshot(core, offsets: dict) -> bytes:
    """The learnt state of a :class:`models.learning.core.LearningCore` and the offsets it covers, as bytes. The
    item store is included only when it lives in memory (Redis holds its own)."""
    state = {
        "version": SNAPSHOT_VERSION,
        "offsets": dict(offsets),
        "vocab": core.vocab,
        "windows": core.windows,
        "stats": core.stats,
        "item_conv": core.item_conv,
        "cat_conv": core.cat_conv,
        "labels": core.purchase_model,
        "segments": core.segments,
        "last_sample": core.last_sample,
        "watermark": core.watermark,
        "n_events": core.n_events,
        "store": core.store if isinstance(core.store, MemoryItemStore) else None,
    }
    return dumps(state)


def restore_core(core, data: bytes) -> dict:
    """Put the state of a :func:`core_snapshot` back into ``core``; returns the offsets it covers. Raises
    ``ValueError`` on a snapshot this engine cannot read."""
    try:
        state = loads(data)
    except Exception as exc:  # whatever a corrupt or foreign pickle raises, re-raised as the documented error
        raise ValueError(f"model snapshot ({len(data)} bytes) cannot be read: {exc}; "
                         "delete the snapshot key to start from empty models") from exc
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"model snapshot has version {got!r}, this engine reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}; delete the snapshot key to start from empty "
                         "models")
    core.vocab = state["vocab"]
    core.windows = state["windows"]
    core.stats = state["stats"]
    core.item_conv = state["item_conv"]
    core.cat_conv = state["cat_conv"]
    core.purchase_model = _restored_purchase_model(core.purchase_model, state["labels"])
    # the bounds are the running core's (PROMO_MODEL_MAX_USERS), not those the snapshot was written with
    core.windows = core.windows.resized(core.max_users)
    core.purchase_model.max_pending = core.max_pending
    core.segments = state["segments"]
    core.last_sample = state["last_sample"]
    core.watermark = state["watermark"]
    core.n_events = state["n_events"]
    if state["store"] is not None and isinstance(core.store, MemoryItemStore):
        core.store = state["store"]
    return state["offsets"]


def _restored_purchase_model(current, stored):
    """The stored delayed-label learner when its model reads the features the engine computes now; otherwise
    (a snapshot from before the features changed) a fresh one like ``current`` that keeps the stored frequency
    baseline: the pending decision points hold features of the old layout and are dropped unlearnt."""
    from models.learning.features import MODEL_FEATURE_NAMES

    names = tuple(getattr(getattr(stored, "model", None), "feature_names", ()))
    if names == tuple(MODEL_FEATURE_NAMES):
        return stored
    fresh = current.clone()
    fresh.baseline = getattr(stored, "baseline", fresh.baseline)
    log.warning("model snapshot: the purchase model was learnt on %d features, the engine now computes %d; it "
                "starts afresh (%d pending decision points dropped)", len(names), len(MODEL_FEATURE_NAMES),
                len(stored) if hasattr(stored, "n_open") else 0)
    return fresh


def snapshot_key(prefix: str = "promo") -> str:
    """The one Redis key holding the model snapshot."""
    return f"{prefix}:models:snapshot"


def save_snapshot(client, core, offsets: dict, prefix: str = "promo") -> int:
    """Write ``core.snapshot(offsets)`` under :func:`snapshot_key` (one ``SET``); returns its size in bytes."""
    data = core.snapshot(offsets)
    client.set(snapshot_key(prefix), data)
    return len(data)


def load_snapshot(client, core, prefix: str = "promo") -> dict | None:
    """Restore ``core`` from Redis; returns the offsets covered, or ``None`` when there is no snapshot."""
    data = client.get(snapshot_key(prefix))
    if data is None:
        return None
    return core.restore(data)


def forget_users_in(windows, purchase_model, last_sample: dict, users) -> int:
    """Drop ``users`` from a core's windows, pending decision points and last-sample times; how many it held."""
    users = set(users)
    held = (set(windows.slot) | purchase_model.users() | last_sample.keys()) & users
    if held:
        windows.drop(held)
        purchase_model.forget(held)
        for u in held:
            last_sample.pop(u, None)
    return len(held)


def without_users(data: bytes, users) -> tuple[bytes, int]:
    """``data`` (a stored snapshot) with ``users`` removed, as :meth:`models.learning.core.LearningCore.forget_users`
    would, and how many of them it held; ``data`` itself when it holds none of them (or is not a snapshot this
    engine reads: a worker refuses such a snapshot at start and says why).

    A snapshot is a pickle (no compression): a user id it holds is in its bytes as UTF-8, so a snapshot without
    those bytes is not even decoded."""
    needles = [u.encode("utf-8", "surrogatepass") for u in users]
    if not any(n in data for n in needles):
        return data, 0
    state = loads(data)
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        return data, 0
    n = forget_users_in(state["windows"], state["labels"], state["last_sample"], users)
    return (dumps(state), n) if n else (data, 0)


def scrub_snapshot(client, users, prefix: str = "promo", attempts: int = 10) -> int:
    """Remove ``users`` from the model snapshot stored in Redis (sync client), as
    :meth:`models.learning.core.LearningCore.forget_users` would; returns how many of them it held (0: the
    snapshot was left as it is).

    The rewrite is optimistic (``WATCH``): a worker writing a newer snapshot meanwhile wins, and the check runs
    again on that one. A snapshot being written while the user is forgotten is :func:`save_snapshot_fenced`'s
    concern: ``promo forget`` adds to :func:`forget_seq_key` before it calls this."""
    import redis

    key = snapshot_key(prefix)
    for _ in range(attempts):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                data = pipe.get(key)
                if data is None:
                    return 0
                scrubbed, n = without_users(data, users)
                if not n:
                    return 0
                pipe.multi()
                pipe.set(key, scrubbed)
                pipe.execute()
                return n
            except redis.WatchError:
                continue
    raise RuntimeError(f"the model snapshot {key} changed {attempts} times while users were removed from it")


def forget_seq_key(prefix: str = "promo") -> str:
    """A count every forget adds to after it deleted the user's keys and before it scrubs the stored snapshot
    (``stream.forget.forget_everything``): what a snapshot being written watches (:func:`save_snapshot_fenced`).
    It holds no user id."""
    return f"{prefix}:forget:seq"


def missing_keys(client, keys: list[str], chunk: int = 5000) -> list[int]:
    """Indexes of ``keys`` that do not exist (sync client; one pipelined ``EXISTS`` per key, ``chunk`` per round
    trip)."""
    gone: list[int] = []
    for i in range(0, len(keys), chunk):
        pipe = client.pipeline(transaction=False)
        for k in keys[i : i + chunk]:
            pipe.exists(k)
        gone += [i + j for j, exists in enumerate(pipe.execute()) if not exists]
    return gone


class ForgetsKeptLanding(Exception):
    """A snapshot was not written: a forget landed during each of its attempts. Nothing is lost (the stored
    snapshot is the previous one, still scrubbed); the next snapshot period tries again.

    It is Redis' own "try again" to the worker's fault policy (:func:`stream.faults.classify_fault`), which then
    skips the maintenance period instead of stopping the worker: see :func:`save_snapshot_fenced`."""


def save_snapshot_fenced(client, held, render, profile_key, prefix: str = "promo", attempts: int = 5,
                         missing=missing_keys) -> tuple[int, list[str]]:
    """Write a snapshot holding the users ``held`` under :func:`snapshot_key`, without any of them whose profile is
    gone by the time it is written; returns its size in bytes and the users left out.

    ``render(gone)`` makes the snapshot's bytes without the users ``gone`` (a list: the users left out so far,
    every call; it must drop them, e.g. :meth:`models.learning.core.LearningCore.forget_users` then ``snapshot``,
    or :func:`without_users` on bytes taken before). ``profile_key(user)`` is the key of a user's profile,
    ``missing(client, keys)`` answers the indexes of the keys that do not exist.

    Why. The worker's snapshot is made by a forked child from the models as they were at the fork: a user
    forgotten meanwhile would come back with it, since ``promo forget`` scrubs the snapshot stored *before* this
    one, and the workers drop the user from memory only after their next snapshot. The check of the profiles runs
    here, in the child, off the worker's event loop (for 100k held users it is a second of pipelined ``EXISTS``).

    How, with no lock the forget has to wait for. The writer ``WATCH``es :func:`forget_seq_key`, then checks the
    profiles of ``held``, renders without the users whose profile is gone, and writes in ``MULTI``/``EXEC``. A
    forget deletes the user's keys, adds to the sequence, then scrubs the stored snapshot. So for any forget: its
    sequence step came before the ``WATCH`` (its profile was gone at the check: left out here), or between the
    ``WATCH`` and the write (the write fails, and the check and the write are done again), or after the write
    (its scrub runs after, on this snapshot). After ``attempts`` failed writes it raises
    :class:`ForgetsKeptLanding` with nothing written.

    Users whose profile expired (idle) are left out too: they are what the worker drops from its models.
    """
    import redis

    key, seq = snapshot_key(prefix), forget_seq_key(prefix)
    users = sorted(held)
    left_out: list[str] = []
    data = None
    for _ in range(attempts):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(seq)
                gone = [users[i] for i in missing(client, [profile_key(u) for u in users])]
                if gone:
                    left_out += gone
                    users = sorted(set(users) - set(gone))
                    data = None
                if data is None:
                    data = render(left_out)
                pipe.multi()
                pipe.set(key, data)
                pipe.execute()
                return len(data), left_out
            except redis.WatchError:
                continue
    raise ForgetsKeptLanding(f"the model snapshot {key} was not written: a user was forgotten during each of "
                             f"{attempts} attempts to write it; the next snapshot period tries again")
