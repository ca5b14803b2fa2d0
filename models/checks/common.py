"""The checks every kind of object passes (each takes a fresh object and raises ``AssertionError`` on failure);
see :mod:`models.checks` for the contract they state."""

from __future__ import annotations

import pickle

from models.checks.adapters import adapter_for
from models.checks.data import events
from models.state.item_memory import MemoryItemStore
from models.state.item_store import ItemStore

__all__ = ["check_clone", "check_determinism", "check_empty_and_unseen", "check_pickle", "check_reset"]


def check_clone(obj) -> None:
    """A clone has the same kind and parameters and no learnt state, learns like a fresh object, and leaves the
    original as it was."""
    adapter = adapter_for(obj)
    data = events()
    fresh_fp = adapter.fingerprint(adapter.rebuild(obj))
    adapter.train(obj, data[:150])
    trained_fp = adapter.fingerprint(obj)
    clone = adapter.rebuild(obj)
    assert type(clone) is type(obj) or isinstance(obj, ItemStore), \
        f"clone of {type(obj).__name__} is {type(clone).__name__}"
    assert adapter.fingerprint(clone) == fresh_fp, "a clone must not carry learnt state"
    assert adapter.fingerprint(obj) == trained_fp, "cloning must not change the original"
    adapter.train(clone, data)
    reference = adapter.rebuild(obj)
    adapter.train(reference, data)
    assert adapter.fingerprint(clone) == adapter.fingerprint(reference), "a clone must learn like a fresh object"


def check_reset(obj) -> None:
    """After ``reset()`` / ``clear()`` the object answers like a fresh one (kinds without a reset pass)."""
    adapter = adapter_for(obj)
    if adapter.reset is None:
        return
    fresh_fp = adapter.fingerprint(adapter.rebuild(obj))
    adapter.train(obj, events())
    adapter.reset(obj)
    assert adapter.fingerprint(obj) == fresh_fp, "after reset/clear the object must answer like a fresh one"


def check_pickle(obj) -> None:
    """A trained object survives ``pickle``: the copy answers the same, and keeps learning the same."""
    adapter = adapter_for(obj)
    data = events()
    adapter.train(obj, data[:150])
    copy = pickle.loads(pickle.dumps(obj))
    assert adapter.fingerprint(copy) == adapter.fingerprint(obj), "a pickle round trip changed the answers"
    if isinstance(obj, ItemStore) and not isinstance(obj, MemoryItemStore):
        return  # an external store: the copy shares the state, so continued learning is not independent
    adapter.train(copy, data[150:])
    adapter.train(obj, data[150:])
    assert adapter.fingerprint(copy) == adapter.fingerprint(obj), "a pickled copy must keep learning the same way"


def check_determinism(obj) -> None:
    """Two objects with the same parameters and seed, fed the same events, answer the same."""
    adapter = adapter_for(obj)
    data = events()
    first, second = adapter.rebuild(obj), adapter.rebuild(obj)
    adapter.train(first, data)
    adapter.train(second, data)
    assert adapter.fingerprint(first) == adapter.fingerprint(second), \
        "same parameters, seed and events must give the same answers"


def check_empty_and_unseen(obj) -> None:
    """Fresh, and trained, the object answers questions about never-seen users and items validly."""
    adapter = adapter_for(obj)
    fresh = adapter.rebuild(obj)
    adapter.validate_unseen(fresh)
    adapter.train(fresh, events())
    adapter.validate_unseen(fresh)
