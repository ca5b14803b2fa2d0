"""What one batch is and how far it got: the result the caller sends and learns from, the progress that lets a
batch resume after a transient error, and each user's plan (:mod:`models.planning` makes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.decision import Decision
from models.events import Event
from models.policy.attribution import Closed
from models.profile import Profile
from models.state.engine_store import UserCommit, parked_field


@dataclass
class BatchResult:
    applied: dict[str, int] = field(default_factory=dict)  # valid new events by type
    duplicates: int = 0
    decisions: list[Decision] = field(default_factory=list)  # new decisions, to send
    resend: list[Decision] = field(default_factory=list)  # stored decisions of redelivered triggers, not yet sent
    new_events: list[Event] = field(default_factory=list)
    profiles: dict[str, Profile] = field(default_factory=dict)  # users' profiles after the batch
    closed: list[Closed] = field(default_factory=list)  # decisions whose attribution window closed
    parked: list[tuple[str, str]] = field(default_factory=list)  # (user, record field): contributions to apply
    learnt: set[str] = field(default_factory=set)  # stages of Engine.learn done (a retried learn skips them)
    timers_dropped: list[str] = field(default_factory=list)  # trigger names of due timers that fired nothing

    def to_send(self) -> list[Decision]:
        return self.decisions + self.resend

    def merge(self, other: "BatchResult") -> None:
        for k, v in other.applied.items():
            self.applied[k] = self.applied.get(k, 0) + v
        self.duplicates += other.duplicates
        self.decisions += other.decisions
        self.resend += other.resend
        self.new_events += other.new_events
        self.profiles.update(other.profiles)
        self.closed += other.closed
        self.parked += other.parked
        self.timers_dropped += other.timers_dropped


def group_by_user(events: list[Event]) -> dict[str, list[Event]]:
    by_user: dict[str, list[Event]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    return by_user


@dataclass
class UserPlan:
    """One user's part of a batch, planned from what the store holds for the user (:class:`models.planning.Planner`)."""

    user_id: str
    profile: Profile
    duplicates: int = 0
    new_events: list[Event] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    resend: list[Decision] = field(default_factory=list)
    commit: UserCommit | None = None
    had_open: bool = False  # the store's index listed the user before the batch (open decisions, timers)
    changed: bool = False  # something to commit without new events or closings: a timer fired or was dropped
    timers_dropped: list = field(default_factory=list)  # names of due timers that no longer applied
    open: list = field(default_factory=list)  # OpenDecision, after the batch
    closed: list = field(default_factory=list)  # Closed
    requests: list = field(default_factory=list)  # budget ReserveRequest
    exposures: list = field(default_factory=list)  # (DecisionContext, offer id) of the decisions, once committed

    def merge_into(self, r: BatchResult) -> None:
        r.duplicates += self.duplicates
        r.decisions += self.decisions
        r.resend += self.resend
        r.new_events += self.new_events
        r.profiles[self.user_id] = self.profile
        r.closed += self.closed
        r.timers_dropped += self.timers_dropped
        if self.commit is not None and self.commit.contrib:
            r.parked.append((self.user_id, parked_field(self.commit.version)))
        for e in self.new_events:
            r.applied[e.type] = r.applied.get(e.type, 0) + 1


@dataclass
class BatchProgress:
    """How far :meth:`Engine.process_batch` got with one batch.

    The caller passes the same object again after a transient error (Redis down, full or busy) and the batch
    continues where it stopped: users whose commit landed stay in :attr:`result` and are not planned again
    (so their events count once as applied, never as duplicates of the batch's own first attempt); users whose
    commit failed are planned again. When a whole commit pipeline fails (the connection dropped while it ran),
    whether each user's commit landed is unknown: the next attempt reads each user's commit token and accepts a
    plan whose token is the stored one (:attr:`in_doubt`).
    """

    result: BatchResult = field(default_factory=BatchResult)
    pending: dict[str, list[Event]] | None = None  # users still to commit, with their events (None: not started)
    blocked: dict[str, dict[str, str]] = field(default_factory=dict)  # offers refused by budgets, per user
    in_doubt: dict[str, UserPlan] = field(default_factory=dict)  # plans whose commit may have landed
    refusals: int = 0  # attempts in which another writer changed a user first (bounded by max_attempts)
    released: bool = False  # stale reservations of the batch's decisions released

    def remaining(self) -> list[Event]:
        """The events of users not committed yet, per user in their order."""
        return [e for evs in (self.pending or {}).values() for e in evs]
