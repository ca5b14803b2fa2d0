"""models.keys: user ids in key names."""

import random

from models.keys import CONTROL_CHARS, escape_user_id, unescape_user_id

_REFERENCE = {ord(c): f"%{ord(c):02X}" for c in ("%", "{", "}", *CONTROL_CHARS)}


def test_escape_equals_percent_encoding_of_the_reserved_characters_for_any_id():
    """The fast path (ids needing no escape returned as they are) gives what the plain mapping gives, and the
    mapping stays one-to-one."""
    rng = random.Random(7)
    alphabet = ["%", "{", "}", "\x00", "\x1f", "\x7f", "\x85", "\u2028", "a", "7", ":", "é", "\U0001F600"]
    for _ in range(20_000):
        uid = "".join(rng.choice(alphabet) if rng.random() < 0.5 else chr(rng.randrange(0, 0x3000))
                      for _ in range(rng.randrange(8)))
        assert escape_user_id(uid) == uid.translate(_REFERENCE), repr(uid)
        assert unescape_user_id(escape_user_id(uid)) == uid
