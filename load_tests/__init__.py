"""Benchmarks (JSON on stdout, progress on stderr): `promo bench core|pipeline`."""
