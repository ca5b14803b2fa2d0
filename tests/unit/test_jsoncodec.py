"""models.jsoncodec reads and writes what the standard library's json did: same values back, same errors."""

import json
import math
import random
import struct

import pytest

from models import jsoncodec

TEXTS = [
    '{"a": 1}', " [1, 2.5, -0.0, 1E5, 4.9e-325] ", '"\\uD83D\\uDE00"', '{"a":"\\u0000"}', '"\\u2028"', "true ",
    '{"a":1,"a":2}', '{"":1}', "9223372036854775807", "18446744073709551615", "-9223372036854775809",
    "123456789012345678901234567890", '{"id": "12345678901234567890123"}', "1e400", "-1e400", "1.7976931348623157e309",
    "NaN", "Infinity", "-Infinity", '{"ts": NaN}', '"\\uDE00\\uD83D"', '"\\ud800"',
    # integers beyond 64 bits wherever a value starts, and long ids inside strings (read by orjson)
    '[1, 18446744073709551616]', '{"a":\n\t -9223372036854775809}', ' 18446744073709551616', '[\r18446744073709551616]',
    '{"cat": "2053013555631882655", "s": "x,12345678901234567890", "n": 1234567890123456789}',
    # not JSON: the same error class from both
    '"a\x01b"', "01", "+1", ".5", "1.", "-", '{"a":1}x', "[1 2]", '"\\x41"', '{"a":"\t"}', "1e5e5", "[1,]", "",
    "\ufeff{}",
]


def _outcome(fn, raw):
    try:
        return "ok", repr(fn(raw))  # repr: NaN equals NaN, 1 differs from 1.0, -0.0 from 0.0
    except json.JSONDecodeError:
        return "error", "JSONDecodeError"


@pytest.mark.parametrize("text", TEXTS)
def test_loads_reads_every_text_as_json_does(text):
    assert _outcome(jsoncodec.loads, text) == _outcome(json.loads, text)
    raw = text.encode("utf-8", "surrogatepass")
    assert _outcome(jsoncodec.loads, raw) == _outcome(json.loads, raw)


def test_loads_uses_the_callers_fallback_for_what_orjson_does_not_read():
    seen = []

    def strict(raw):
        seen.append(raw)
        return "fallback"

    assert jsoncodec.loads('{"a": 1}', strict) == {"a": 1} and seen == []
    assert jsoncodec.loads('{"a": NaN}', strict) == "fallback"
    assert jsoncodec.loads("[12345678901234567890]", strict) == "fallback"
    assert jsoncodec.loads('{"b": 1, "a": [0,\n 12345678901234567890]}', strict) == "fallback"
    assert jsoncodec.loads('{"cat": "2053013555631882655"}', strict) == {"cat": "2053013555631882655"}
    assert len(seen) == 3  # a long id inside a string is no reason to leave orjson
    assert jsoncodec.loads("not json", strict) == "fallback"


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]  # any double, NaN and inf too
    if kind == 1:
        return rng.choice([0.1, 1e-7, 1e16, 1e300, -2.5, 0.0, -0.0, 1 / 3, 1700000000000.0])
    if kind == 2:
        return rng.choice([0, -1, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 30, 1700000000000])
    if kind == 3:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF), rng.randrange(0, 32),
                                       0xD800, 0x1F600])) for _ in range(rng.randrange(6)))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return str(rng.getrandbits(80))  # a long numeric id inside a string
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["a", "é", "ts", "", "null", "12345678901234567890"]
    d = {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if rng.random() < 0.2:
        d[rng.choice([1, 2.5, True, None])] = 1  # non-string keys json converts
    return d


def test_dumps_reads_back_as_json_dumps_does_for_any_value():
    rng = random.Random(7)
    for _ in range(3000):
        v = _random_value(rng)
        want = repr(json.loads(json.dumps(v, separators=(",", ":"))))
        assert repr(jsoncodec.loads(jsoncodec.dumps(v))) == want, v
        assert repr(json.loads(jsoncodec.dumps(v))) == want, v
        assert jsoncodec.dumps_str(v) == jsoncodec.dumps(v).decode("utf-8")


def test_dumps_keeps_nan_and_refuses_what_json_refuses():
    assert jsoncodec.dumps({"p": math.nan, "q": None}) == b'{"p":NaN,"q":null}'
    assert jsoncodec.dumps([math.inf]) == b"[Infinity]"
    assert jsoncodec.dumps({"item": "null", "v": 1.0}) == b'{"item":"null","v":1.0}'  # 'null' in a string: fine
    with pytest.raises(TypeError):
        jsoncodec.dumps({"x": object()})
    with pytest.raises(TypeError):
        jsoncodec.dumps({(1, 2): 1})
