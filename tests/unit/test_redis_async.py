"""The hiredis-packing connections of ``models.state.redis_async`` put the same bytes on the wire as redis-py."""

import pytest
import redis.asyncio.connection as aconn
from redis.exceptions import DataError

from models.state.redis_async import Scripts, connection_class

COMMANDS = [
    ("SET", "k", 1.5), ("SET", "k", 0.1), ("SET", "k", 1e-20), ("SET", "k", 10**30), ("SET", "k", -0.0),
    ("EVALSHA", "ab" * 20, 2, "{u:a}:p", b"\x00\xff", "ü", 3.141592653589793, 1e22, -7),
    ("SCRIPT LOAD", "return 1"), (b"CLIENT SETNAME", b"x"), ("HSET", "h", "f", memoryview(b"mv")), ("HSET", "h", "g", bytearray(b"ba")),
    ("HSET", "h", "big", "x" * 100_000),
]


@pytest.mark.parametrize("args", COMMANDS, ids=range(len(COMMANDS)))
def test_hiredis_packing_is_byte_identical_to_redis_py(args):
    plain = aconn.Connection()
    fast = connection_class(aconn.Connection)()
    assert b"".join(fast.pack_command(*args)) == b"".join(bytes(c) for c in plain.pack_command(*args))


def test_an_argument_redis_py_cannot_encode_is_a_data_error():
    with pytest.raises(DataError):
        connection_class(aconn.Connection)().pack_command("SET", "k", object())


def test_scripts_need_names_and_know_their_sha():
    with pytest.raises(ValueError):
        Scripts()
    import hashlib

    from models.state.scripts import lua

    assert Scripts("commit").sha["commit"] == hashlib.sha1(lua("commit").encode()).hexdigest()
