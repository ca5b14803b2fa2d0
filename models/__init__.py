"""Everything that decides: profiles, similarity, online models, offer policy.

Pure Python, numpy/numba and River. No Faust import anywhere under ``models/``: every piece can be
tested and benchmarked without a broker.
"""
