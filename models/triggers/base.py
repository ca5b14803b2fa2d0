"""What a trigger is: the moment the engine decides an offer for a user (a cart today; browse or cart abandonment,
a return after a long absence, after a purchase next).

The engine asks every configured trigger, for each new event of a user applied to the user's profile, whether it
:meth:`~Trigger.fires`; the first that does makes the decision. :meth:`~Trigger.may_fire` says, from the event
alone, whether it could: those events' stored decisions are loaded with the batch, so a redelivered trigger is
answered with its stored decision instead of a second one. Adding a trigger is one module in this package,
decorated with :func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from models.events import Event
from models.profile import Profile

TRIGGERS: dict[str, type["Trigger"]] = {}
"""Every registered trigger class by name."""


class Trigger(ABC):
    """One kind of moment to decide at. Subclasses set :attr:`name` and implement both methods."""

    name: ClassVar[str]

    @abstractmethod
    def may_fire(self, event: Event) -> bool:
        """Whether this event could fire a decision (cheap: the event alone)."""

    @abstractmethod
    def fires(self, event: Event, profile: Profile) -> bool:
        """Whether ``event``, just applied to the user's ``profile``, fires a decision now."""


def register(cls: type[Trigger]) -> type[Trigger]:
    """Class decorator: make a trigger known by its :attr:`~Trigger.name`."""
    if cls.name in TRIGGERS:
        raise ValueError(f"trigger {cls.name!r} is registered twice")
    TRIGGERS[cls.name] = cls
    return cls
