"""Decision points: the moments of a batch at which the purchase propensity model predicts, to learn when the label
arrives (:class:`models.learning.delayed_labels.DelayedLabelLearner`).

River is not called per event: a user has at most one decision point per batch, at their last event of the batch
if it is not a purchase and the profile after the batch holds no later event (then the profile after the batch is
the profile at that event, with no leak of a later purchase or cart removal), and at most one per ``gap_ms`` of
event time. With ``milestones`` a point is taken only when the batch
holds a ``cart`` of the user (the engine's trigger) or the user's session reached its 2nd, 4th, 8th, ... event in
it (:func:`reached_milestone`): points where an offer could be made, a logarithmic number per session; without,
one at every batch of the user.

Examples
--------
>>> from models.events import Event
>>> from models.profile import Profile
>>> last = {"u1": Event("e2", "view", "u1", "i", 2_000), "u2": Event("e3", "purchase", "u2", "i", 3_000)}
>>> profiles = {"u1": Profile(session_events=2), "u2": Profile(session_events=2)}
>>> [u for u, _, _ in batch_decision_points(last, {"u1": 2, "u2": 1}, set(), profiles, {}, 60_000, milestones=True)]
['u1']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from models.events import Event
    from models.profile import Profile

__all__ = ["batch_decision_points", "reached_milestone"]


def reached_milestone(session_events: int, events_in_batch: int) -> bool:
    """Whether the session, now at ``session_events`` events, passed its 2nd, 4th, 8th, ... event among the last
    ``events_in_batch`` ones.

    >>> reached_milestone(4, 1), reached_milestone(5, 1), reached_milestone(7, 3), reached_milestone(9, 2)
    (True, False, False, True)
    """
    lowest = max(2, session_events - events_in_batch + 1)
    return session_events >= 2 and (1 << (session_events.bit_length() - 1)) >= lowest


def batch_decision_points(last_events: dict[str, Event], events_per_user: dict[str, int],
                          users_with_cart: set[str], profiles: dict[str, Profile], last_sample: dict[str, int],
                          gap_ms: int, milestones: bool) -> Iterator[tuple[str, Event, Profile]]:
    """``(user, event, profile)`` of each decision point of a batch, in the order of ``last_events`` (each user's
    last event of the batch); ``last_sample`` holds the time of each user's previous decision point."""
    for u, e in last_events.items():
        if e.type == "purchase":
            continue
        prev = last_sample.get(u)
        if prev is not None and e.ts - prev < gap_ms:
            continue
        prof = profiles.get(u)
        if prof is None:
            continue
        if prof.last_ts > e.ts:  # the profile holds a later event (a removal, a purchase delivered before an
            continue             # earlier-stamped event): its features would leak it into the point
        if milestones and u not in users_with_cart and not reached_milestone(prof.session_events, events_per_user[u]):
            continue
        yield u, e, prof
