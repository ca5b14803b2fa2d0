"""Learning online from every event: item similarity, purchase propensity, segments, the learning core.

* :mod:`models.learning.core` - :class:`~models.learning.core.LearningCore`, what the engine calls once per batch
  and asks at decision time;
* :mod:`models.learning.similarity`, :mod:`models.learning.contrib`, :mod:`models.learning.recommend` - item
  co-occurrence from users' recent windows (numba), the per-user contributions, recommendations;
* :mod:`models.learning.propensity` - the purchase propensity models (engine and frequency baseline);
* :mod:`models.learning.delayed_labels` - decision points waiting for their delayed labels, scored then learnt;
* :mod:`models.learning.decision_points` - which moments of a batch become decision points;
* :mod:`models.learning.features` - the models' features (profile, conversion rates, context);
* :mod:`models.learning.conversion` - item and category conversion rates;
* :mod:`models.learning.rolling_logloss` - the online log loss;
* :mod:`models.learning.segments` - user segments;
* :mod:`models.learning.snapshot` - the models' snapshot in Redis, its stored format, old snapshots.
"""
