r"""Compact JSON for the engine's hot path: orjson where it gives what the standard library gives, json otherwise.

Every event is parsed once and every commit writes the user's profile document and contribution payload, so JSON
was about a fifth of the worker's CPU per event in an in-process replay; orjson does the same work in a fraction of
the time. What is written and read stays what ``json`` (compact separators) wrote and read:

* **Values round-trip the same.** Floats are written in their shortest exact form by both (``1e-07`` by json,
  ``1e-7`` by orjson: the same float when read back); integers and strings are the same values.
* **Non-ASCII text is written as UTF-8** instead of ``\uXXXX`` escapes: the same string when read back (Redis'
  ``cjson`` reads both alike).
* **Non-finite floats stay as json writes them.** orjson writes NaN and infinities as ``null``; an output holding
  ``null`` is written again by ``json`` when the value holds a non-finite float, so a NaN still reads back as NaN.
  The engine's profile documents and contribution payloads hold ``null`` only with learning off (an open
  decision's context has no segment then): there a document costs orjson's encoding plus json's, about what json
  alone cost before. A decision holds one (``expires_at``), so decisions keep ``json``.
* **Whatever orjson refuses** (integers beyond 64 bits, strings with lone surrogates, non-string keys it cannot
  convert, types it does not know) is written by ``json`` exactly as before (ASCII, escapes), with json's errors
  for what json refuses too.
* **Reading**: text orjson refuses or would read differently (``NaN`` literals written by ``json``, integers
  beyond 64 bits) is read by ``json``, with json's errors for what is not JSON (:func:`loads`).

>>> dumps({"a": [1, 2.5, "é"], "b": None})
b'{"a":[1,2.5,"\xc3\xa9"],"b":null}'
>>> dumps({"x": float("nan")})
b'{"x":NaN}'
>>> loads(dumps({"x": float("inf"), "n": 2 ** 70}))
{'x': inf, 'n': 1180591620717411303424}
>>> loads(b'{"a":NaN}')["a"] != loads(b'{"a":NaN}')["a"]
True
>>> lone = chr(0xD800)  # a lone surrogate: not UTF-8, so json writes it, escaped, as before
>>> dumps(lone), loads(dumps(lone)) == lone
(b'"\\ud800"', True)
"""

from __future__ import annotations

import json
from typing import Callable

import orjson

__all__ = ["dumps", "dumps_str", "loads"]

_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19  # a run of 19 digits: possibly an integer beyond 64 bits
_OPTIONS = orjson.OPT_NON_STR_KEYS  # keys as json writes them: 1 -> "1", True -> "true", None -> "null"
_compact = json.JSONEncoder(separators=(",", ":")).encode  # ASCII: escapes non-ASCII and lone surrogates
_strict = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _json_bytes(obj) -> bytes:
    return _compact(obj).encode("ascii")


def dumps(obj) -> bytes:
    """``obj`` as compact JSON bytes (UTF-8), as ``json.dumps(obj, separators=(",", ":"))`` would read back."""
    try:
        out = orjson.dumps(obj, option=_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: beyond what orjson writes; json decides (and raises if it must)
        return _json_bytes(obj)
    if b"null" in out:  # a None, or a non-finite float orjson wrote as null: only json keeps the NaN
        try:
            _strict(obj)
        except ValueError:
            return _json_bytes(obj)
    return out


def dumps_str(obj) -> str:
    """:func:`dumps` as text."""
    return dumps(obj).decode("utf-8")


def _long_number(masked: bytes) -> bool:
    """Whether ``masked`` (a text with its digits turned to ``0``) may hold a number of 19 digits or more: a run of
    19 digits not right after a ``"``. A run right after one is a string's first characters (or invalid JSON, which
    orjson refuses): a long numeric id (REES46's category ids, many shops' 64-bit ids) is no reason to leave orjson.
    A run inside a string after other characters counts: slower, never wrong. C-speed search and split: a regex
    over the text costs as much as the parse.

    >>> _long_number(b'{"c":"0000000000000000000"}'), _long_number(b'{"c": -0000000000000000000}')
    (False, True)
    """
    if masked.find(_LONG_RUN) < 0:
        return False
    return any(before[-1:] != b'"' for before in masked.split(_LONG_RUN)[:-1])


def _json_loads(raw):
    return json.loads(bytes(raw) if isinstance(raw, memoryview) else raw)


def loads(raw: bytes | bytearray | memoryview | str, fallback: Callable = _json_loads):
    """Parse JSON text or UTF-8 bytes (what :func:`dumps` or ``json.dumps`` wrote).

    ``fallback(raw)`` (``json.loads`` by default; the event decoder passes its own strict one) reads what orjson
    refuses or would read differently, and raises what is not JSON:

    * NaN and infinity literals, numbers beyond a float's range (json reads ``1e400`` as ``inf``), lone surrogate
      escapes: orjson refuses them;
    * integers beyond 64 bits: orjson reads them as floats, json as integers. A run of 19 digits or more that does
      not follow a ``"`` sends the text to ``fallback`` (:func:`_long_number`): a long id that is a whole string
      stays with orjson; one inside a string after other characters is read by ``fallback``: slower, never wrong.
      The engine's own numbers have at most 17 digits (timestamps 13).

    >>> loads(b'{"ts": 1700000000000, "p": 0.1}'), loads("12345678901234567890123")
    ({'ts': 1700000000000, 'p': 0.1}, 12345678901234567890123)
    >>> loads('{"cat": "2053013555631882655", "n": [1, -12345678901234567890]}')
    {'cat': '2053013555631882655', 'n': [1, -12345678901234567890]}
    """
    data = raw
    if type(data) is not bytes:
        try:
            data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        except UnicodeEncodeError:  # a lone surrogate in the text: not UTF-8, so not for orjson
            return fallback(raw)
    if not _long_number(data.translate(_DIGITS_AS_ZERO)):  # C-speed masking and search; a regex costs a parse
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return fallback(raw)
