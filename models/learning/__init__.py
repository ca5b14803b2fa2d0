"""Learning online from every event: item similarity, purchase propensity, segments, the learning core."""
