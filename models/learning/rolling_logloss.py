"""The rolling log loss: the online log loss gauge of the propensity models over their most recent labels."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["RollingLogLoss"]


class RollingLogLoss:
    """Mean binary log loss over the last ``window`` updates (the same number as River's
    ``utils.Rolling(metrics.LogLoss, window_size=window)``, without its per-update overhead).

    >>> m = RollingLogLoss(2)
    >>> for y, p in ((True, 0.9), (False, 0.2), (True, 0.5)):
    ...     m.update(y, p)
    >>> round(m.get(), 6)  # mean of -log(0.8) and -log(0.5)
    0.458145
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.losses: deque[float] = deque()
        self.total = 0.0

    def update(self, y: bool, p: float) -> None:
        p = min(max(p, 1e-15), 1 - 1e-15)
        loss = -math.log(p) if y else -math.log(1.0 - p)
        self.losses.append(loss)
        self.total += loss
        if len(self.losses) > self.window:
            self.total -= self.losses.popleft()

    def get(self) -> float:
        n = len(self.losses)
        if not n:
            return 0.0
        if n % 4096 == 0:  # refresh the running sum now and then (no drift)
            self.total = math.fsum(self.losses)
        return self.total / n
