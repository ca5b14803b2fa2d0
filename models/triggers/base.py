"""What a trigger is: a moment the engine decides an offer for a user.

Two kinds, one base:

* an **event trigger** (:class:`Trigger`) fires at an event: the engine asks every configured trigger, for each
  new event of a user just applied to the user's profile, whether it :meth:`~Trigger.fires`; the first that does
  makes the decision. :meth:`~Trigger.may_fire` says, from the event alone, whether it could: those events' stored
  decisions are loaded with the batch, so a redelivered trigger is answered with its stored decision.
* a **timer trigger** (:class:`TimerTrigger`) fires when nothing happens: an event arms (or re-arms, or disarms)
  the user's timer (:meth:`~TimerTrigger.arm`), kept in the profile with the event-time moment it is due; the
  expiry sweep fires it once the event-time clock passes that moment, or the user's next event does, before it is
  applied, if it comes later than that (so whether and how a timer fires depends on the user's events only, not on
  when the sweep ran). Its decision's trigger id is :func:`timer_trigger_id` of the event that armed it: the same
  whichever path fires it, so its decision id is deterministic too.

Every trigger carries what the catalogue's ``triggers:`` section says of it (:class:`TriggerSpec`): the offers it
may give, its cooldown and its daily cap per user. Adding a trigger is one module in this package, decorated with
:func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from models.events import Event
from models.profile import DAY_MS, Profile

TRIGGERS: dict[str, type["Trigger"]] = {}
"""Every registered trigger class by name."""

TIMER_PREFIX = "t:"
"""Trigger ids of timer-fired decisions start with this (:func:`timer_trigger_id`)."""

DISARM = -1
"""What :meth:`TimerTrigger.arm` returns to cancel the user's timer."""


def timer_trigger_id(name: str, anchor_event_id: str) -> str:
    """The trigger id of the decision timer ``name`` fires, armed last by event ``anchor_event_id``.

    >>> timer_trigger_id("cart_abandonment", "e9")
    't:cart_abandonment:e9'
    """
    return f"{TIMER_PREFIX}{name}:{anchor_event_id}"


def is_timer_trigger_id(trigger_event_id: str) -> bool:
    """Whether a decision's trigger id is a timer's (:func:`timer_trigger_id`)."""
    return trigger_event_id.startswith(TIMER_PREFIX)


@dataclass(frozen=True, slots=True)
class TriggerSpec:
    """One trigger as the catalogue's ``triggers:`` section configures it.

    ``offers``: the offer ids it may give (``none`` always may), or None for every offer; ``cooldown_s``: the
    least event time between two of its decisions for one user (None: the trigger's default); ``max_per_day``: its
    decisions per user and UTC day (None: no cap); ``params``: the trigger's own settings (:attr:`Trigger.PARAMS`).
    """

    name: str
    enabled: bool = True
    offers: tuple[str, ...] | None = None
    cooldown_s: int | None = None
    max_per_day: int | None = None
    params: dict = field(default_factory=dict)


class Trigger(ABC):
    """One kind of moment to decide at. Subclasses set :attr:`name` (and :attr:`PARAMS`), and implement
    :meth:`may_fire` and :meth:`fires` (event triggers) or :meth:`TimerTrigger.arm` (timer triggers).

    Parameters
    ----------
    offers
        Offer ids this trigger may give (``none`` always may); None: every offer of the catalogue.
    cooldown_ms
        Least event time between two of its decisions for one user (default :attr:`DEFAULT_COOLDOWN_MS`).
    max_per_day
        Its decisions per user and UTC day; None: no cap.
    **params
        The trigger's own settings, named in :attr:`PARAMS` (``{name: (default, lowest allowed[, highest
        allowed])}``).
    """

    name: ClassVar[str]
    timer: ClassVar[bool] = False
    DEFAULT_COOLDOWN_MS: ClassVar[int] = 86_400_000
    PARAMS: ClassVar[dict[str, tuple[float, ...]]] = {}

    def __init__(self, offers: tuple[str, ...] | list[str] | None = None, cooldown_ms: int | None = None,
                 max_per_day: int | None = None, **params) -> None:
        unknown = set(params) - set(self.PARAMS)
        if unknown:
            raise ValueError(f"trigger {self.name!r} has no setting {sorted(unknown)} (it has {sorted(self.PARAMS)})")
        cooldown_ms = self.DEFAULT_COOLDOWN_MS if cooldown_ms is None else cooldown_ms
        if cooldown_ms < 0:
            raise ValueError(f"cooldown_ms must be >= 0, got {cooldown_ms}")
        if max_per_day is not None and max_per_day < 0:
            raise ValueError(f"max_per_day must be >= 0, got {max_per_day}")
        self.offers = frozenset(offers) if offers is not None else None
        self.cooldown_ms = int(cooldown_ms)
        self.max_per_day = max_per_day
        for key, (default, low, *high) in self.PARAMS.items():
            value = params.get(key, default)
            if value < low:
                raise ValueError(f"trigger {self.name!r}: {key} must be >= {low}, got {value}")
            if high and value > high[0]:
                raise ValueError(f"trigger {self.name!r}: {key} must be <= {high[0]}, got {value}")
            setattr(self, key, type(default)(value))

    @classmethod
    def from_spec(cls, spec: TriggerSpec, default_cooldown_ms: int | None = None) -> "Trigger":
        """The trigger the catalogue's ``spec`` configures; ``default_cooldown_ms`` where it gives none."""
        cooldown = spec.cooldown_s * 1000 if spec.cooldown_s is not None else default_cooldown_ms
        return cls(spec.offers, cooldown, spec.max_per_day, **spec.params)

    @abstractmethod
    def may_fire(self, event: Event) -> bool:
        """Whether this event could fire a decision (cheap: the event alone)."""

    @abstractmethod
    def fires(self, event: Event, profile: Profile) -> bool:
        """Whether ``event``, just applied to the user's ``profile``, fires a decision now."""

    def allows(self, profile: Profile, ts: int) -> bool:
        """The trigger's cooldown and daily cap, at event time ``ts``, from its decisions the profile logged."""
        log = profile.trigger_log.get(self.name)
        if not log:
            return self.max_per_day != 0
        if ts - log[-1] < self.cooldown_ms:
            return False
        if self.max_per_day is not None:
            day_start = ts - ts % DAY_MS
            return sum(1 for t in log if t >= day_start) < self.max_per_day
        return True

    def blocked(self, offer_ids) -> dict[str, str]:
        """The offers of ``offer_ids`` this trigger may not give, with the reason (``DecisionContext.blocked``)."""
        if self.offers is None:
            return {}
        return {o: f"not given at trigger {self.name}" for o in offer_ids if o != "none" and o not in self.offers}


class TimerTrigger(Trigger):
    """A trigger that fires when nothing happens for a while (see the module docstring).

    Never fires at an event (:meth:`may_fire` and :meth:`fires` are False); :meth:`arm` says what each event
    does to the user's timer, :meth:`still_applies` whether a due timer still makes sense when it fires.
    """

    timer = True

    def may_fire(self, event: Event) -> bool:
        return False

    def fires(self, event: Event, profile: Profile) -> bool:
        return False

    @abstractmethod
    def arm(self, event: Event, profile: Profile) -> int | None:
        """What ``event``, just applied to ``profile``, does to the timer: the event time it is due at (arms it,
        or re-arms it from this event), :data:`DISARM` (cancels it), or None (leaves it as it is)."""

    def still_applies(self, profile: Profile) -> bool:
        """Whether the due timer still fires for ``profile`` (e.g. the cart is not empty)."""
        return True


def register(cls: type[Trigger]) -> type[Trigger]:
    """Class decorator: make a trigger known by its :attr:`~Trigger.name`."""
    if cls.name in TRIGGERS:
        raise ValueError(f"trigger {cls.name!r} is registered twice")
    TRIGGERS[cls.name] = cls
    return cls
