"""User segments: online k-means (River ``cluster.KMeans``) on a few profile features.

The segment of a user is the index of the nearest centre (``0 .. n_segments - 1``); it feeds offer
eligibility. Centres move with a half-life, so segments follow the population; an unseen feature vector
(a new user) still gets a segment. The features are already on comparable scales (``log1p`` counts, shares
and scores in [0, 1]). River draws the initial centres at random, which can leave a centre that no point is
ever closest to; here the first ``20 * n_segments`` points are buffered and the centres start spread out over
them (farthest-first traversal), then k-means runs online.

Examples
--------
>>> seg = ProfileSegments(n_segments=2, seed=1)
>>> for i in range(200):
...     seg.learn_one({"spend": 0.0, "n_orders": 0.0})
...     seg.learn_one({"spend": 6.0, "n_orders": 3.0})
>>> seg.predict_one({"spend": 0.0, "n_orders": 0.0}) != seg.predict_one({"spend": 6.0, "n_orders": 3.0})
True
>>> seg.predict_one({}) in (0, 1)
True
"""

from __future__ import annotations

from river import cluster

SEGMENT_FEATURES: tuple[str, ...] = (
    "n_events", "n_orders", "spend", "cart_value", "price_level", "loyalty", "churn_risk", "top_category_share",
    "session_events",
)
"""Profile features (see :meth:`models.profile.Profile.features`) the segments are built on."""


class ProfileSegments:
    """Online clustering of profile feature vectors.

    Parameters
    ----------
    n_segments
        Number of clusters.
    halflife
        How fast a centre moves towards the points assigned to it (River ``KMeans``).
    seed
        Seed of the initial centres (same seed and inputs: same segments).
    features
        Keys used from the feature dict (others are ignored).
    """

    def __init__(self, n_segments: int = 6, halflife: float = 0.2, seed: int = 0,
                 features: tuple[str, ...] = SEGMENT_FEATURES) -> None:
        if n_segments < 1:
            raise ValueError(f"n_segments must be >= 1, got {n_segments}")
        self.n_segments = n_segments
        self.halflife = halflife
        self.seed = seed
        self.features = tuple(features)
        self.model = cluster.KMeans(n_clusters=n_segments, halflife=halflife, mu=0.0, sigma=1.0, seed=seed)
        # River's centres draw a random coordinate the first time a key is read, so a prediction could
        # change the model: draw every coordinate now, in a fixed order
        for i in range(n_segments):
            for k in self.features:
                self.model.centers[i][k]
        self.n_learned = 0
        self.n_init = 0
        self.init_points = 20 * n_segments
        self._buffer: list[dict] | None = []

    def _x(self, x: dict) -> dict:
        return {k: float(x.get(k, 0.0)) for k in self.features}

    def learn_one(self, x: dict) -> None:
        x = self._x(x)
        self.n_learned += 1
        if self._buffer is not None:
            self._buffer.append(x)
            centers = self.model.centers
            if self.n_init < self.n_segments and all(dict(centers[i]) != x for i in range(self.n_init)):
                centers[self.n_init].update(x)  # meanwhile: the first distinct points
                self.n_init += 1
            if len(self._buffer) >= self.init_points:
                self._farthest_first()
            return
        self.model.learn_one(x)

    def _farthest_first(self) -> None:
        """Restart the centres from the buffered points, spread out (farthest-first traversal from the
        first point), then learn the buffer."""
        pts = self._buffer
        self._buffer = None
        chosen = [pts[0]]
        dist = [_d2(p, pts[0]) for p in pts]
        while len(chosen) < self.n_segments:
            j = max(range(len(pts)), key=lambda i: (dist[i], -i))
            if dist[j] == 0.0:
                break
            chosen.append(pts[j])
            dist = [min(d, _d2(p, pts[j])) for d, p in zip(dist, pts)]
        for i, c in enumerate(chosen):
            self.model.centers[i].update(c)
        for p in pts:
            self.model.learn_one(p)

    def predict_one(self, x: dict) -> int:
        return int(self.model.predict_one(self._x(x)))

    def clone(self) -> "ProfileSegments":
        return ProfileSegments(self.n_segments, self.halflife, self.seed, self.features)


def _d2(a: dict, b: dict) -> float:
    return sum((a[k] - b[k]) ** 2 for k in a)
