"""Dump one engine instance's Redis state into plain Python and compare two dumps.

Used by the crash-safety tests: the same events processed by an uninterrupted worker (prefix A) and by a worker
that is killed and restarted (prefix B) must leave the same state, key by key.

:func:`dump_state` reads EVERY key under ``<prefix>:`` whatever its type (string, hash, list, set, sorted set;
a stream or module type is reported as an error entry, never skipped) and returns
``{key without the prefix: {"type": ..., "value": ..., "expires": bool}}``. Strings (values, hash fields, list,
set and sorted-set members) are decoded as UTF-8 and then as JSON, recursively (a JSON string holding JSON is
decoded again), wherever they parse; bytes that are not UTF-8 stay ``bytes``.

What is excluded, and why each is legitimately run-dependent (everything else must be equal):

* **TTL values.** Remaining seconds depend on when the key was written and when it was read; only *whether* a
  key expires (``"expires"``) is kept, and compared.
* **``ts`` and ``latency_ms`` of a stored decision** (any decoded object with ``decision_id`` and
  ``trigger_event_id``): ``ts`` is the wall-clock time the decision was made (decision v1 contract) and
  ``latency_ms`` is measured; every other decision field is a function of the events and must match.
* **The profile's commit counter** (hash field ``ver`` of ``{u:<user>}:p``, :data:`EXCLUDED_HASH_FIELDS`): the
  optimistic-concurrency version, incremented once per successful commit, i.e. per batch that held the user's
  events; how a user's events were split into batches depends on timing. (Events applied twice would show in
  the profile itself and in the markers, which are compared.) Likewise its commit token (field ``tok``), unique per
  engine instance and commit (``models.batch.BatchProgress``: a commit in doubt is recognised by it).
* **Model snapshot blobs** (keys matching :data:`EXCLUDED_KEY_PATTERNS`: ``<prefix>:models:snapshot``, the
  learning core's pickle, and ``<prefix>:snapshot:*``, e.g. the policy's posteriors as versions before the shared
  ``<prefix>:policy`` hash kept them): copies of in-memory models written every ``maintenance_interval_s``
  seconds, so their bytes depend on when the worker happened to snapshot. (What the models decide is not excluded: it shows in the stored decisions.)
* **The log marks** (``<prefix>:logmarks``, :mod:`stream.logguard`): the last message processed per partition as
  of the last maintenance period, a timing-dependent copy of the consumer's position.
* **The event-time clock** (``<prefix>:clock``, :mod:`models.clock`): per partition the wall time of its last
  event, and a watermark published every ``maintenance_interval_s`` from the event times seen by then. What the
  clock closed is not excluded: the closed decisions show in the profiles, the policy counts and the ledgers.
* **The epoch marker** (``<prefix>:epoch``, :mod:`stream.epoch`): a random id and the time the first worker
  started on the prefix; every store has its own.

What may differ between two runs of the same events is listed field by field in :data:`DECISION_DERIVED`
(what a decision contains, and what is written because of it); :func:`decision_derived` tells whether a
:func:`difference_classes` entry is one of them.

Examples
--------
>>> a = {"{u:1}:p": {"type": "hash", "expires": True, "value": {"v": {"n": 3, "spend": 1.0}}}}
>>> b = {"{u:1}:p": {"type": "hash", "expires": True, "value": {"v": {"n": 3, "spend": 1.0 + 1e-12}}}}
>>> compare_states(a, b)
[]
>>> b["{u:1}:p"]["value"]["v"]["n"] = 4
>>> b["{u:2}:p"] = a["{u:1}:p"]
>>> for line in compare_states(a, b):
...     print(line)
{u:1}:p .v.n: 3 != 4
{u:2}:p: only in B
>>> normalise(b'{"c": "{\\\\"view\\\\": 2}", "x": "abc"}')
{'c': {'view': 2}, 'x': 'abc'}
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter

EXCLUDED_KEY_PATTERNS: tuple[str, ...] = ("models:snapshot*", "snapshot:*", "logmarks", "clock", "epoch")
"""Key patterns (after ``<prefix>:``, :mod:`fnmatch` syntax) left out of a dump; see the module docstring."""

EXCLUDED_HASH_FIELDS: tuple[tuple[str, str], ...] = (("{u:*}:p", "ver"), ("{u:*}:p", "tok"))
"""(key pattern after ``<prefix>:``, hash field) pairs left out of a dump; see the module docstring."""

DECISION_RUN_FIELDS: tuple[str, ...] = ("ts", "latency_ms")
"""Fields of a stored decision that are wall-clock or measured, dropped from a dump."""

LEDGER_RUN_FIELDS: tuple[str, ...] = ("logged_ms",)
"""Fields of a ledger record (a closed decision, models.policy.ledger) that are wall-clock, dropped from a dump."""

_CONTEXT_DERIVED: tuple[tuple[str, str], ...] = (
    # a decision context's fields that read state learnt from other users (DECISION_DERIVED says why)
    ("propensity", "p_buy: the online propensity model at decision time"),
    ("segment", "the user's segment at decision time"),
    ("blocked", "offers whose campaign budget was spent at decision time"),
    ("offers_today", "counted from offer_history"),
    ("last_offer_ms", "from offer_history"),
    ("offer_counts_today", "from offer_history"),
    ("offer_counts_total", "from offer_history"),
    ("features.price_level", "the category price statistics at decision time"),
    ("features.last_price_level", "the category price statistics at decision time"),
    ("features.item_conversion", "the item conversion statistics at decision time"),
    ("features.category_conversion", "the category conversion statistics at decision time"),
    ("features.category_share", "the category's share of all events at decision time"),
    ("features.category_buy_per_cart", "the category's purchases per add-to-cart at decision time"),
)

DECISION_DERIVED: tuple[tuple[str, str, str], ...] = (
    # (key class, field path prefix, why it is a function of the decisions, not of the events alone)
    ("{b:*}", "", "campaign budget counters: which offers the policy gave"),
    ("{b:*}:res", "", "campaign ledger: one entry per decision that got (or was refused) the offer"),
    ("{b:*}:open", "", "open reservations of the campaign's decisions"),
    ("{b:*}:gc", "", "forgetting schedule of the campaign's ledger entries"),
    ("policy", "", "the policy's posteriors: sums of the decisions' exposures (p_buy at decision time) and "
                   "outcomes, per offer and segment at decision time"),
    ("{u:*}:d:*", ".json.offer", "the offer the policy chose"),
    ("{u:*}:d:*", ".json.items", "recommend(): the item statistics as they were at decision time"),
    ("{u:*}:d:*", ".json.propensity", "the policy's probability of its choice"),
    ("{u:*}:d:*", ".json.scores", "the policy's scores"),
    ("{u:*}:d:*", ".json.reasons", "the policy's reasons, and p_buy of the propensity model"),
    ("{u:*}:p", ".v.offer_history", "which offers the user got"),
    ("{u:*}:p", ".v.offer_totals", "how many times the user got each offer"),
    ("{u:*}:p", ".v.open[*].offer_id", "an open decision's offer"),
    ("{u:*}:p", ".v.open[*].propensity", "an open decision's choice probability"),
    # the decision context, where it is kept: in the user's open decisions, beside the stored decision (for
    # promo explain) and in the ledger of closed decisions
    *((key, f"{where}.{field}", why) for key, where in (("{u:*}:p", ".v.open[*].ctx"), ("{u:*}:d:*", ".ctx"),
                                                          ("{u:*}:l", "[*].ctx"))
      for field, why in _CONTEXT_DERIVED),
    ("{u:*}:l", "[*].offer_id", "a closed decision's offer"),
    ("{u:*}:l", "[*].propensity", "a closed decision's choice probability"),
    ("{u:*}:l", "[*].reward", "margin - the offer's cost"),
    ("{u:*}:l", "[*].cost", "the offer's cost"),
    ("{u:*}:l", "[*].margin", "the margin attributed, net of the offer"),
)
"""Where the state of two runs of the same events may legitimately differ, field by field.

A decision reads state learnt from OTHER users' events - item statistics, the online propensity model and
segments, category price and conversion statistics, the policy's posteriors, campaign budgets - as it is at
the moment the decision is made, and that depends on how the partitions interleaved in the worker's batches.
So what a decision contains, and what is written because of it, differs between any two runs, with or without
a crash. Everything else - every counter, marker, profile field, item statistic, which events triggered a
decision, decision ids - is a function of the events and must be equal. The crash test checks the budget
ledgers of the decision-derived part by their invariants instead (no double charge)."""

_MAX_DEPTH = 20


def _text(raw):
    if isinstance(raw, (bytes, bytearray)):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw)
    return raw


def normalise(raw, depth: int = 0):
    """Bytes -> text -> JSON, recursively where it parses; decisions lose their run-dependent fields."""
    value = _text(raw)
    if isinstance(value, str) and depth < _MAX_DEPTH:
        s = value.strip()
        if s and (s[0] in '{["-' or s[0].isdigit() or s in ("true", "false", "null")):
            try:
                decoded = json.loads(s)
            except ValueError:
                return value
            return normalise(decoded, depth + 1)  # a JSON string holding JSON is decoded again
        return value
    if isinstance(value, dict):
        out = {str(k): normalise(v, depth + 1) for k, v in value.items()}
        if "decision_id" in out and "trigger_event_id" in out:
            for f in DECISION_RUN_FIELDS:
                out.pop(f, None)
        elif "decision_id" in out and "logged_ms" in out:  # a ledger record
            for f in LEDGER_RUN_FIELDS:
                out.pop(f, None)
        return out
    if isinstance(value, list):
        return [normalise(v, depth + 1) for v in value]
    return value


def _name(raw: bytes) -> str:
    """A hash field or sorted-set member as text (ids are compared as they are, not JSON-decoded)."""
    t = _text(raw)
    return t if isinstance(t, str) else repr(t)


def _excluded(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in EXCLUDED_KEY_PATTERNS)


def dump_state(redis_client, prefix: str) -> dict:
    """Every key under ``<prefix>:`` as plain Python (see the module docstring for the exclusions).

    Parameters
    ----------
    redis_client
        A synchronous ``redis.Redis`` (``decode_responses=False``).
    prefix
        The engine instance's ``Settings.redis_prefix``.

    Returns
    -------
    dict
        ``{key without "<prefix>:": {"type", "value", "expires"}}``; hash -> dict, list -> list,
        set -> sorted list, sorted set -> ``{member: score}``.
    """
    r = redis_client
    start = len(prefix) + 1
    keys = [k for k in sorted(set(r.scan_iter(match=_escape(prefix) + ":*", count=2000)))
            if not _excluded(k.decode("utf-8", "backslashreplace")[start:])]
    out: dict = {}
    for i in range(0, len(keys), 2000):  # pipelined: two round trips per chunk of keys
        chunk = keys[i : i + 2000]
        pipe = r.pipeline(transaction=False)
        for key in chunk:
            pipe.type(key)
        kinds = [k.decode() if isinstance(k, bytes) else k for k in pipe.execute()]
        pipe = r.pipeline(transaction=False)
        for key, kind in zip(chunk, kinds):
            fetch = _FETCH.get(kind)
            if fetch is not None:
                fetch(pipe, key)
            pipe.pttl(key)
        res = iter(pipe.execute())
        for key, kind in zip(chunk, kinds):
            name = key.decode("utf-8", "backslashreplace")[start:]
            raw = next(res) if kind in _FETCH else None
            ttl = next(res)
            if kind == "none" or ttl == -2:  # expired or deleted while dumping
                continue
            if kind == "string":
                value = normalise(raw)
            elif kind == "hash":
                value = {_name(f): normalise(v) for f, v in raw.items()}
                for pattern, fld in EXCLUDED_HASH_FIELDS:
                    if fld in value and fnmatch.fnmatchcase(name, pattern):
                        del value[fld]
            elif kind == "list":
                value = [normalise(v) for v in raw]
            elif kind == "set":
                value = sorted((normalise(v) for v in raw), key=repr)
            elif kind == "zset":
                value = {_name(m): score for m, score in raw}
            else:
                value = f"<unsupported Redis type {kind}>"
            out[name] = {"type": kind, "value": value, "expires": ttl >= 0}
    return out


_FETCH = {
    "string": lambda p, k: p.get(k),
    "hash": lambda p, k: p.hgetall(k),
    "list": lambda p, k: p.lrange(k, 0, -1),
    "set": lambda p, k: p.smembers(k),
    "zset": lambda p, k: p.zrange(k, 0, -1, withscores=True),
}


def _escape(prefix: str) -> str:
    """Escape glob metacharacters of a prefix for ``SCAN MATCH``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix)


# --- comparison ----------------------------------------------------------------------------------------------
def _num_equal(x, y, rel: float) -> bool:
    if isinstance(x, bool) or isinstance(y, bool):
        return x is y
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    fx, fy = float(x), float(y)
    if math.isnan(fx) or math.isnan(fy):
        return math.isnan(fx) and math.isnan(fy)
    if math.isinf(fx) or math.isinf(fy):
        return fx == fy
    return fx == fy or abs(fx - fy) <= rel * max(abs(fx), abs(fy))


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _diff(a, b, path: str, rel: float, out: list[str], limit: int) -> None:
    if len(out) >= limit:
        return
    if _is_num(a) and _is_num(b):
        if (isinstance(a, int) and isinstance(b, int)) or isinstance(a, float) or isinstance(b, float):
            if isinstance(a, int) and isinstance(b, int):
                if a != b:
                    out.append(f"{path}: {a!r} != {b!r}")
            elif isinstance(a, float) and isinstance(b, float):
                if not _num_equal(a, b, rel):
                    out.append(f"{path}: {a!r} != {b!r} (relative tolerance {rel:g})")
            else:  # int vs float: a type difference that JSON may still encode identically ("3" vs "3.0")
                out.append(f"{path}: {a!r} ({type(a).__name__}) != {b!r} ({type(b).__name__})")
        return
    if type(a) is not type(b):
        out.append(f"{path}: {_short(a)} ({type(a).__name__}) != {_short(b)} ({type(b).__name__})")
        return
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=repr):
            sub = f"{path}.{k}"
            if k not in b:
                out.append(f"{sub}: only in A ({_short(a[k])})")
            elif k not in a:
                out.append(f"{sub}: only in B ({_short(b[k])})")
            else:
                _diff(a[k], b[k], sub, rel, out, limit)
        return
    if isinstance(a, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)} ({_short(a)} vs {_short(b)})")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", rel, out, limit)
        return
    if a != b:
        out.append(f"{path}: {_short(a)} != {_short(b)}")


def _short(x, n: int = 120) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def compare_states(a: dict, b: dict, rel: float = 1e-9, limit: int = 200) -> list[str]:
    """Human-readable differences between two :func:`dump_state` results (``[]`` when equal).

    Same key sets; per key the same Redis type, the same "expires" flag and the same value: integers and
    strings exactly, floats within relative tolerance ``rel`` (NaN equals NaN). At most ``limit`` lines are
    returned, the last one saying how many keys differ in all.
    """
    out: list[str] = []
    differing = 0
    for key in sorted(set(a) | set(b)):
        lines: list[str] = []
        if key not in b:
            lines.append(f"{key}: only in A")
        elif key not in a:
            lines.append(f"{key}: only in B")
        else:
            ea, eb = a[key], b[key]
            if ea["type"] != eb["type"]:
                lines.append(f"{key}: Redis type {ea['type']} != {eb['type']}")
            else:
                if ea["expires"] != eb["expires"]:
                    lines.append(f"{key}: has a TTL in A: {ea['expires']}, in B: {eb['expires']}")
                sub: list[str] = []
                _diff(ea["value"], eb["value"], "", rel, sub, limit)
                lines += [f"{key} {line}" for line in sub]
        if lines:
            differing += 1
            out += lines[: max(0, limit - len(out))]
    if differing and len(out) >= limit:
        out.append(f"... {differing} keys differ in all")
    return out


# --- views of a dump ------------------------------------------------------------------------------------------
def profile_counts(state: dict) -> dict[str, "Counter[str]"]:
    """user id -> event counts by type (zero counts dropped), from the profile hashes ``{u:<user>}:p`` of a dump
    (the id in the key is escaped, :func:`models.keys.escape_user_id`).

    >>> profile_counts({"{u:7}:p": {"type": "hash", "expires": True,
    ...                              "value": {"v": {"counts": {"view": 2, "cart": 0}}}}})
    {'7': Counter({'view': 2})}
    >>> list(profile_counts({"{u:a%7D:b}:p": {"type": "hash", "expires": True, "value": {"v": {}}}}))
    ['a}:b']
    """
    from collections import Counter

    from models.keys import unescape_user_id

    out = {}
    for key, entry in state.items():
        if key.startswith("{u:") and key.endswith("}:p"):
            value = entry["value"]
            prof = value.get("v", value) if isinstance(value, dict) else {}
            counts = prof.get("counts", {}) if isinstance(prof, dict) else {}
            out[unescape_user_id(key[3:-3])] = Counter({t: n for t, n in counts.items() if n})
    return out


def key_class(key: str) -> str:
    """A key with its user / item / campaign tag and trailing event id replaced by ``*``.

    >>> key_class("{u:42}:d:taobao-abc"), key_class("sim:{i:9}:nb"), key_class("sim:idx")
    ('{u:*}:d:*', 'sim:{i:*}:nb', 'sim:idx')
    """
    import re

    key = re.sub(r"\{([a-z]+):[^}]*\}", r"{\1:*}", key)
    return re.sub(r":(e|d):.*$", r":\1:*", key)


def difference_classes(a: dict, b: dict, rel: float = 1e-9) -> set[str]:
    """Where ``a`` and ``b`` differ, as ``"<key class> <field path>"`` (indices and ids generalised).

    >>> a = {"{u:1}:p": {"type": "hash", "expires": True, "value": {"v": {"n": 1, "m": [1, 2]}}}}
    >>> sorted(difference_classes(a, {"{u:1}:p": {"type": "hash", "expires": True,
    ...                                           "value": {"v": {"n": 2, "m": [1, 3]}}}}))
    ['{u:*}:p .v.m[*]', '{u:*}:p .v.n']
    >>> z = {"sim:idx": {"type": "zset", "expires": False, "value": {"1002098": 5.0}}}
    >>> sorted(difference_classes(z, {"sim:idx": {"type": "zset", "expires": False, "value": {"1002098": 6.0}}}))
    ['sim:idx .<id>']
    >>> o = {"open": {"type": "zset", "expires": False, "value": {"tb-42": 5.0}}}
    >>> sorted(difference_classes(o, {"open": {"type": "zset", "expires": False, "value": {"tb-42": 6.0}}}))
    ['open .<id>']
    >>> p = {"{u:1}:p": {"type": "hash", "expires": True, "value": {"v": {"offer_history": {"c5": [1]}}}}}
    >>> sorted(difference_classes(p, {"{u:1}:p": {"type": "hash", "expires": True,
    ...                                           "value": {"v": {"offer_history": {"c5": [2]}}}}}))
    ['{u:*}:p .v.offer_history.<offer>[*]']
    """
    import re

    out = set()
    for line in compare_states(a, b, rel=rel, limit=10**9):
        if line.endswith("only in A") or line.endswith("only in B"):
            out.add(f"{key_class(line.rsplit(':', 1)[0].rstrip(':'))} (only in one run)")
            continue
        key, _, rest = line.partition(" ")
        key = key.rstrip(":")
        path = rest.split(":", 1)[0] if rest.startswith(".") or rest.startswith("[") else "<value>"
        generic = re.sub(r"\[\d+\]", "[*]", path)
        # members of id-keyed collections (item ids in sorted sets, decision ids in budget hashes) are one class
        generic = re.sub(r"^\.(?:\d+|[0-9a-f]{16,}|[A-Za-z]+-\w+)(?=$|[.\[])", ".<id>", generic)
        # maps keyed by offer id (which offers a run happened to choose is run-dependent as a whole)
        generic = re.sub(r"\.(offer_history|offer_totals|scores|last_offer_ms|offer_counts_today|offer_counts_total|blocked)"
                         r"\.[^.\[]+", r".\1.<offer>", generic)
        out.add(f"{key_class(key)} {generic}")
    return out


def decision_derived(cls: str) -> bool:
    """Whether a :func:`difference_classes` entry lies in :data:`DECISION_DERIVED`.

    >>> decision_derived("{u:*}:d:* .json.offer.kind"), decision_derived("{b:*}:open (only in one run)")
    (True, True)
    >>> decision_derived("{u:*}:p .v.counts.view"), decision_derived("{u:*}:d:* .json.offers")
    (False, False)
    >>> decision_derived("{u:*}:d:* (only in one run)"), decision_derived("sim:{i:*}:nb .<id>")
    (False, False)
    """
    key, _, path = cls.partition(" ")
    for k, prefix, _why in DECISION_DERIVED:
        if key != k:
            continue
        if not prefix:
            return True
        if path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "["):
            return True
    return False


def summarise(a: dict, b: dict, rel: float = 1e-9) -> list[str]:
    """One line per key class that differs: how many keys differ (of how many) and which fields, most first.

    >>> a = {"{u:1}:p": {"type": "hash", "expires": True, "value": {"v": {"n": 1, "m": 2}}}}
    >>> summarise(a, {"{u:1}:p": {"type": "hash", "expires": True, "value": {"v": {"n": 2, "m": 2}}}})
    ['{u:*}:p: 1 of 1 keys differ (1 differences); .v.n x1']
    """
    import re
    from collections import Counter, defaultdict

    keys_by_class: Counter = Counter(key_class(k) for k in set(a) | set(b))
    differing: dict[str, set] = defaultdict(set)
    fields: dict[str, Counter] = defaultdict(Counter)
    for line in compare_states(a, b, rel=rel, limit=10**9):
        key, _, rest = line.partition(" ") if not line.endswith("only in A") and not line.endswith("only in B") \
            else (line.rsplit(":", 1)[0], "", "(only in one run)")
        key = key.rstrip(":")
        cls = key_class(key)
        differing[cls].add(key)
        path = rest.split(":", 1)[0] if rest.startswith(".") or rest.startswith("[") else rest[:40]
        fields[cls][re.sub(r"\[\d+\]", "[*]", path)] += 1
    out = []
    for cls in sorted(differing, key=lambda c: -len(differing[c])):
        top = ", ".join(f"{f} x{n}" for f, n in fields[cls].most_common(6))
        n = sum(fields[cls].values())
        out.append(f"{cls}: {len(differing[cls])} of {keys_by_class[cls]} keys differ ({n} differences); {top}")
    return out
