"""The engine store: what a batch reads and writes per user, as an interface (:class:`EngineStore`).

Implementations: :class:`models.state.engine_memory.MemoryStore` (tests, offline) and
:class:`models.state.engine_redis.RedisStore` (production).

Per user the engine keeps (all under the user's hash tag ``{u:<user>}``, so one Lua call is atomic; ``<user>`` is
the id escaped by :func:`models.keys.escape_user_id`, so that no other user's keys start with a user's tag):

* ``<prefix>:{u:<user>}:p``             the profile hash (field ``v``: the profile's fields as one JSON object,
  absolute values; one field instead of one per profile field keeps a batch's load and commit small), idle TTL
* ``<prefix>:{u:<user>}:e:<event_id>``  de-duplication marker, ``SET`` with TTL
* ``<prefix>:{u:<user>}:d:<event_id>``  the decision a trigger event produced, ``json`` + ``sent`` flag, and the
  context the policy saw (``ctx``: ``promo explain`` recomputes the decision from it), TTL twice the window
* ``<prefix>:{u:<user>}:l``             the user's ledger: the last closed decisions with context, action,
  propensity and reward (``promo ledger export``), newest last, idle TTL
* ``<prefix>:{u:<user>}:c``             item-statistics contributions: parked (``w:<version>``) until applied,
  and the applied totals ``promo forget`` subtracts (:mod:`models.learning.contrib`)

and, shared by all users, ``<prefix>:open``: the expiry sweep's index of users with open decisions (a sorted set
by earliest expiry), and ``<prefix>:clock``: every partition's event-time watermark and when it last had an event
(:mod:`models.clock`; workers combine them, and a restarted worker starts from them). Applying contributions and
writing that index touch keys outside the user's slot: the engine needs one Redis, not Cluster.

:meth:`EngineStore.commit` writes a user's markers, profile, decisions and index entry in one atomic step, and
refuses if any marker already exists (another worker got there first during a rebalance): a batch is applied
once, even when Kafka redelivers it after a crash.

Examples
--------
>>> import asyncio
>>> from models.state.engine_memory import MemoryStore
>>> store = MemoryStore()
>>> c = UserCommit("u1", {"n": "1"}, ["e1"], [("e1", b"{}")])
>>> asyncio.run(store.commit([c]))
[True]
>>> asyncio.run(store.commit([c]))  # e1 already applied: refused, nothing written twice
[False]
>>> load = asyncio.run(store.load({"u1": ["e1", "e2"]}, {"u1": ["e1"]}))["u1"]
>>> sorted(load.seen), load.profile, load.stored
(['e1'], {'n': '1'}, {'e1': (b'{}', False)})
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from models import jsoncodec


@dataclass(slots=True)
class UserLoad:
    """What the store knows about one user of a batch, read before planning.

    A plan changes the profile it is given in place (its counts, cart and windows), and a user may be planned
    more than once from one load (a budget reservation refused: :meth:`models.engine.Engine._plan_and_reserve`).
    So each plan takes its profile with :meth:`take_profile`: the first the decoded :attr:`profile`, every later one
    its own copy decoded again from :attr:`packed`, the document as stored.

    >>> load = UserLoad({"counts": {"cart": 1}}, packed=b'{"counts":{"cart":1}}')
    >>> load.take_profile()["counts"]["cart"] += 1   # a first plan folds an add-to-cart
    >>> load.take_profile()                           # a plan made again starts from the stored profile
    {'counts': {'cart': 1}}
    """

    profile: dict
    seen: set[str] = field(default_factory=set)
    stored: dict[str, tuple[bytes, bool]] = field(default_factory=dict)  # trigger event id -> (json, sent)
    version: str = ""  # the profile version read; a commit succeeds only if it is still current
    token: str = ""  # the token of the user's last commit (models.batch.BatchProgress: a commit in doubt)
    packed: bytes | str | None = None  # the profile document as stored (None: a new user, or not kept)
    taken: bool = False  # whether a plan took :attr:`profile` (see :meth:`take_profile`)

    def take_profile(self) -> dict:
        """The stored profile for one plan to change: :attr:`profile` the first time, then a fresh copy each time.

        A store that keeps no :attr:`packed` document gets one encoded here, at the first take, before any plan
        could change the profile."""
        if not self.taken:
            self.taken = True
            if self.packed is None and self.profile:
                self.packed = jsoncodec.dumps(self.profile)
            return self.profile
        return jsoncodec.loads(self.packed) if self.packed else {}


@dataclass(slots=True)
class UserCommit:
    """Everything a batch changes for one user, written atomically."""

    user_id: str
    profile: dict  # the profile's fields as plain JSON values (models.profile.Profile.to_dict), encoded once
    event_ids: list[str]
    decisions: list[tuple[str, bytes]]  # (trigger event id, decision json)
    version: str = ""  # the version the commit was planned from (optimistic concurrency)
    open_until: int | None = None  # earliest expiry of the user's open decisions (None: none open)
    had_open: bool = True  # whether the store's index may list the user (False: nothing to remove from it)
    contrib: str = ""  # the user's item-statistics contributions (models.learning.contrib payload JSON), or ""
    # what the user's decisions and closed decisions teach, added to the store's shared hash:
    # posterior updates (cell field, alpha if new, beta if new, d_alpha, d_beta) as models.policy.thompson.ThompsonPolicy
    # builds them, and integer counts by field (outcomes learnt ``n``; ``closed:<group>``, ``converted:<group>``)
    policy: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    # the context each decision was made in (trigger event id -> DecisionContext JSON), kept beside the decision
    contexts: dict = field(default_factory=dict)
    # the decisions this commit closes, one JSON ledger record each (models.policy.ledger), appended to the
    # user's ledger in the same atomic step
    ledger: list = field(default_factory=list)
    # unique per commit; stored with the profile (hash field ``tok``) so that a writer whose commit pipeline
    # failed as a whole can tell, by reading it back, whether its commit landed
    token: str = ""


def parked_field(version: str) -> str:
    """The record field a commit planned from profile ``version`` parks its contributions in (the commit script
    names it ``w:<new version>``)."""
    return f"w:{int(version or 0) + 1}"


class EngineStore(ABC):
    """What the engine reads and writes per user, and the state all workers share.

    Lifecycle of a batch: :meth:`load` (one round trip for every user of the batch) -> the engine plans each user
    -> :meth:`commit` (one atomic step per user) -> the decisions are sent -> :meth:`mark_sent` -> with
    :attr:`applies_contributions`, :meth:`apply_contributions` applies the item statistics the commits parked.
    The expiry sweep uses :meth:`due_users` and :meth:`reindex`; every worker reads what the commits taught with
    :meth:`policy_state` and shares its event-time clock with :meth:`sync_clock`. ``tests/contracts/`` runs one
    suite over every implementation.
    """

    applies_contributions: bool = False
    """Commits carry the users' item-statistics contributions (:mod:`models.learning.contrib`), parked with the
    markers, and :meth:`apply_contributions` applies them to an item store on the same server (Redis). Without it
    the learning core counts item statistics per batch itself."""

    contributions_capped: int = 0
    """Parked contributions left unapplied because the user's contribution record was full (a counter)."""

    @abstractmethod
    async def load(self, event_ids: dict[str, list[str]], triggers: dict[str, list[str]]) -> dict[str, UserLoad]:
        """Profiles, already-applied event ids and stored decisions for the users of a batch."""

    @abstractmethod
    async def commit(self, commits: list[UserCommit]) -> list[bool | Exception]:
        """Apply each user's commit atomically: ``True`` where it was applied, ``False`` where it was refused (a
        marker already existed or the profile changed since it was loaded: nothing written), or the exception
        the store answered for that commit (nothing written: Redis scripts are atomic, and a full Redis refuses
        a script at its first write). An exception raised instead of the list means the outcome of every commit
        is unknown (the connection dropped): read the users' tokens back (:attr:`UserLoad.token`).

        What the users' decisions and closings teach (:attr:`UserCommit.policy`, :attr:`UserCommit.counts`) is
        added to the shared state :meth:`policy_state` reads, in the same atomic step."""

    @abstractmethod
    async def mark_sent(self, sent: list[tuple[str, str]]) -> None:
        """Flag stored decisions (user id, trigger event id) as delivered to the decisions topic."""

    @abstractmethod
    async def due_users(self, now_ms: int, limit: int = 1000) -> list[str]:
        """Users whose earliest open decision expires at or before event time ``now_ms``."""

    @abstractmethod
    async def reindex(self, entries: list[tuple[str, int | None, str]]) -> None:
        """Correct the index of users with open decisions: (user id, earliest expiry or None when none open,
        the profile version it was computed from). An entry whose user committed since is skipped: that commit
        wrote the index itself."""

    @abstractmethod
    async def policy_state(self) -> dict:
        """What the commits taught, shared by all workers: ``{field: value}``, posteriors and counts."""

    @abstractmethod
    async def sync_clock(self, state: dict[str, list[int]]) -> dict[str, list[int]]:
        """Publish this worker's partition watermarks (``models.clock.EventClock.state``; each entry only ever
        rises) and return every partition's, as published by all workers."""

    async def ledger(self, user_id: str, n: int = 0) -> list[str]:
        """The user's ledger records (JSON, :mod:`models.policy.ledger`), oldest first; the last ``n`` with
        ``n > 0``. A store that keeps no ledger has none."""
        return []

    async def decision_context(self, user_id: str, trigger_event_id: str) -> str | None:
        """The context (JSON) a stored decision was made in, as its commit gave it (:attr:`UserCommit.contexts`),
        or None."""
        return None

    async def forgotten_total(self) -> int:
        """How many users every forget path removed so far, all workers together (0 where not counted)."""
        return 0

    async def apply_contributions(self, parked: list[tuple[str, str]]) -> int:
        """Apply parked contributions ``(user id, record field)`` (:attr:`applies_contributions` stores; each
        exactly once); returns how many were applied. A store that parks none has nothing to apply."""
        return 0

    async def apply_parked(self, limit: int = 1000) -> int:
        """Apply what commits parked and nobody applied (a worker died between commit and apply); returns how
        many. A store that parks none has nothing to apply."""
        return 0

    @abstractmethod
    async def ping(self) -> bool:
        """True when the store answers."""

    async def close(self) -> None:
        """Release connections."""
