"""Contract checks every learning model, item store and policy passes, in the style of ``river.checks``.

:func:`yield_checks` yields, for one object, check functions that each take the object and raise
``AssertionError`` with a message on failure. Objects are driven through an adapter for their kind
(:data:`ADAPTERS`, :mod:`models.checks.adapters`): how to train one on a small deterministic event stream
(:func:`events`, :mod:`models.checks.data`), how to read a **fingerprint** of its state (its answers to probe
questions: predictions, neighbours, popular items, ...), and what a valid answer looks like.

The contract (:mod:`models.checks.common`):

* ``check_clone``: ``clone()`` gives an object of the same kind and parameters and no learnt state — trained
  like a fresh object, it answers like one, and cloning does not touch the original;
* ``check_reset``: after ``reset()`` / ``clear()`` the object answers like a fresh one;
* ``check_pickle``: a trained object survives ``pickle`` (answers the same, and keeps learning the same);
* ``check_determinism``: two objects built with the same parameters and seed, fed the same events, answer the
  same (no hidden global state, no unseeded randomness, no dependence on dict/set iteration of salted hashes);
* ``check_empty_and_unseen``: a fresh object answers questions about unseen users and items with valid,
  empty-ish answers (no exception), and a trained one answers about never-seen users and items the same way.

Policies (:class:`models.policy.base.Policy`) are trained on decision contexts drawn from the same events, with
rewards, and fingerprinted by their choices on probe contexts; they also pass (:mod:`models.checks.policy`):

* ``check_choices_are_valid``: every choice is an eligible, unblocked offer of the catalogue (``none`` included),
  with a probability in (0, 1], scores only for eligible offers, and holdout users get ``none``;
* ``check_propensity_is_the_choice_probability``: the ``propensity`` a policy reports is the probability of its
  choice, as off-policy evaluation needs it: over seeds, ``1{choice = k} / propensity`` averages 1 for each offer.

Choosing must not change what a policy learns next (fingerprints are read with :meth:`~Policy.choose`): policies
run here as the engine runs them, counting a decision's exposure when it is final (``defer_exposure``).

Examples
--------
>>> from models.state.item_memory import MemoryItemStore
>>> for check in yield_checks(MemoryItemStore()):
...     check(MemoryItemStore())
>>> [c.__name__ for c in yield_checks(MemoryItemStore())]
['check_clone', 'check_reset', 'check_pickle', 'check_determinism', 'check_empty_and_unseen']
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from models.checks.adapters import ADAPTERS, Adapter, adapter_for
from models.checks.common import check_clone, check_determinism, check_empty_and_unseen, check_pickle, check_reset
from models.checks.data import events
from models.checks.policy import check_choices_are_valid, check_propensity_is_the_choice_probability
from models.policy.base import Policy

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "check_choices_are_valid", "check_clone", "check_determinism",
           "check_empty_and_unseen", "check_pickle", "check_propensity_is_the_choice_probability", "check_reset",
           "events", "yield_checks"]


def yield_checks(obj) -> Iterator[Callable[[Any], None]]:
    """The contract checks that apply to ``obj`` (each takes a FRESH object of the same kind); ``TypeError`` for a
    kind the checks do not know."""
    adapter_for(obj)
    yield check_clone
    yield check_reset
    yield check_pickle
    yield check_determinism
    yield check_empty_and_unseen
    if isinstance(obj, Policy):
        yield check_choices_are_valid
        yield check_propensity_is_the_choice_probability
