"""Decision v1: what the engine tells the shop to show one user.

>>> d = Decision(decision_id="d1", user_id="u1", ts=5, trigger_event_id="e1",
...              offer=Offer(offer_id="none", kind="none"), propensity=1.0)
>>> d.to_dict()["offer"]
{'offer_id': 'none', 'kind': 'none', 'value': 0.0, 'min_spend': 0.0, 'expires_at': None}
>>> Decision.from_dict(d.to_dict()) == d
True
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

GROUPS: tuple[str, ...] = ("treatment", "holdout")


@dataclass(slots=True)
class Offer:
    offer_id: str
    kind: str
    value: float = 0.0
    min_spend: float = 0.0
    expires_at: int | None = None


@dataclass(slots=True)
class Decision:
    decision_id: str
    user_id: str
    ts: int
    trigger_event_id: str
    offer: Offer
    items: list[str] = field(default_factory=list)
    propensity: float = 1.0
    scores: dict[str, float] = field(default_factory=dict)
    group: str = "treatment"
    model_version: str = "rules-1"
    reasons: list[str] = field(default_factory=list)
    latency_ms: float = 0.0
    # the moment decided at (models.triggers); decisions stored before triggers other than the cart had none
    trigger: str = "cart"

    def to_dict(self) -> dict:
        """Field by field, the containers copied: what ``dataclasses.asdict`` gives, without its recursive deep
        copy (which cost more than the rest of a decision's JSON; a test holds this to every field)."""
        o = self.offer
        return {
            "decision_id": self.decision_id, "user_id": self.user_id, "ts": self.ts,
            "trigger_event_id": self.trigger_event_id,
            "offer": {"offer_id": o.offer_id, "kind": o.kind, "value": o.value, "min_spend": o.min_spend,
                      "expires_at": o.expires_at},
            "items": list(self.items), "propensity": self.propensity, "scores": dict(self.scores),
            "group": self.group, "model_version": self.model_version, "reasons": list(self.reasons),
            "latency_ms": self.latency_ms, "trigger": self.trigger,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Decision":
        return cls.from_dict(json.loads(raw))

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        d = dict(d)
        d["offer"] = Offer(**d["offer"])
        return cls(**d)


def decision_id_for(trigger_event_id: str) -> str:
    """Deterministic decision id: a redelivered trigger yields the same id.

    >>> decision_id_for("e1") == decision_id_for("e1")
    True
    >>> len(decision_id_for("e1"))
    32
    """
    return hashlib.blake2b(f"decision|{trigger_event_id}".encode(), digest_size=16).hexdigest()
