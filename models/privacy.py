"""Pseudonymisation of user ids: a keyed hash applied at ingestion, so clear ids never reach Redis, logs or metrics.

The shop, which holds the same key, can compute the pseudonym of a user to join engine data with its own;
without the key the mapping cannot be reversed or recomputed.

>>> p = pseudonymise("user-42", b"secret")
>>> p == pseudonymise("user-42", b"secret"), p.startswith("p-"), len(p)
(True, True, 34)
>>> p == pseudonymise("user-42", b"other key")
False
"""

from __future__ import annotations

import hashlib


def pseudonymise(user_id: str, key: bytes) -> str:
    """Keyed BLAKE2b (128 bit) of ``user_id`` as ``p-<32 hex>``."""
    return "p-" + hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), key=key[:64], digest_size=16).hexdigest()
