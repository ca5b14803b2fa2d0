"""Evaluating offline: prequential evaluation of the models, off-policy evaluation of policies."""
