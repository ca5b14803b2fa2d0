"""What an offer kind is: its cost model, its catalogue parameters and their validation (one module per kind).

A kind says what one redemption costs the shop on a basket (:meth:`OfferKind.cost`), the most it may cost (what a
budget reserves at decision time, :meth:`OfferKind.max_cost`), which catalogue keys it takes beyond the common
ones (:attr:`OfferKind.params`) and what makes an offer of the kind inconsistent (:meth:`OfferKind.check`).
Adding a kind is one module in this package, decorated with :func:`register`; the catalogue parser, the cost
model, budgets and the decision schema's enum (a test holds them equal) follow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # the spec is the catalogue's; only its fields are read here
    from models.policy.catalogue import OfferSpec

KINDS: dict[str, "OfferKind"] = {}
"""Every registered kind by name (``none`` included), in registration order."""


@dataclass(frozen=True, slots=True)
class Param:
    """A catalogue key of one kind: ``lo``/``hi`` bound it (``lo_open``: strictly above ``lo``)."""

    name: str
    doc: str
    required: bool = False
    lo: float = 0.0
    lo_open: bool = False
    hi: float | None = None


class OfferKind(ABC):
    """One kind of offer. Subclasses set :attr:`name`, :attr:`doc` and :attr:`params` and implement the cost."""

    name: ClassVar[str]
    doc: ClassVar[str]
    """The cost model in one line, for the catalogue's documentation."""
    params: ClassVar[tuple[Param, ...]] = ()
    value_hi: ClassVar[float | None] = None
    """The largest ``value`` an offer of this kind may have (``None``: no limit; ``value`` is always > 0)."""
    in_catalogue: ClassVar[bool] = True
    """False for the built-in ``none``, which no catalogue defines."""

    def basket(self, spec: "OfferSpec", cart_value: float) -> float:
        """Basket value if the offer is redeemed: at least ``min_spend`` (the user tops up to redeem)."""
        return max(cart_value, spec.min_spend)

    @abstractmethod
    def cost(self, spec: "OfferSpec", basket: float) -> float:
        """What one redemption on a basket of this value costs the shop."""

    @abstractmethod
    def max_cost(self, spec: "OfferSpec", cart_value: float) -> float:
        """The most one redemption may cost: what a budget reserves at decision time."""

    def check(self, spec: "OfferSpec") -> tuple[str | None, str] | None:
        """What makes ``spec`` inconsistent, as ``(catalogue key to point at or None, message)``; None if fine."""
        return None


def register(cls: type[OfferKind]) -> type[OfferKind]:
    """Class decorator: make a kind known by its :attr:`~OfferKind.name`."""
    if cls.name in KINDS:
        raise ValueError(f"offer kind {cls.name!r} is registered twice")
    KINDS[cls.name] = cls()
    return cls
