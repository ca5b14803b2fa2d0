"""Deciding: the policy interface and its implementations, the offer catalogue, budgets, pacing, attribution."""
