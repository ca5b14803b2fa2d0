"""``promo forget``: after it, no Redis key or value holds the user's data; other users are untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import SecretStr

from stream.sources import read_events
from tests.helpers import ROOT, event_bytes, metric, produce_raw, wait_until

pytestmark = pytest.mark.integration
SAMPLE = ROOT / "stream" / "data" / "rees46_sample.csv"


def all_state(r, prefix: str) -> dict[bytes, bytes]:
    """Every key under ``prefix`` with a dump of its value (enough to search for an id)."""
    out = {}
    for key in r.scan_iter(match=prefix + ":*", count=1000):
        t = r.type(key)
        if t == b"string":
            out[key] = r.get(key) or b""
        elif t == b"hash":
            out[key] = json.dumps({k.decode(): v.decode(errors="replace") for k, v in r.hgetall(key).items()}).encode()
        elif t == b"zset":
            out[key] = b" ".join(m for m, _ in r.zrange(key, 0, -1, withscores=True))
        else:
            out[key] = b""
    return out


@pytest.mark.parametrize("pseudonymise", [False, True])
def test_forget_removes_every_trace_of_the_user(engine_settings, start_worker, redis_client, pseudonymise):
    s = engine_settings
    if pseudonymise:
        s = s.model_copy(update={"pseudonymise_key": SecretStr("test-key-0123456789")})
    events = list(read_events(SAMPLE, "rees46"))
    per_user: dict[str, int] = {}
    for e in events:
        per_user[e["user_id"]] = per_user.get(e["user_id"], 0) + 1

    w = start_worker(s)
    w.wait_ready()
    produce_raw(s, s.topic_events, [(e["user_id"].encode(), event_bytes(e)) for e in events])
    wait_until(lambda: metric(w.metrics(), "promo_events_total") == len(events), 120, "all events applied")
    w.stop()

    from stream.forget import engine_user_id

    # the user with most history among those with an open decision (so also in the expiry sweep's index)
    indexed = {m.decode() for m in redis_client.zrange(f"{s.redis_prefix}:open", 0, -1)}
    with_open = [u for u in per_user if engine_user_id(s, u) in indexed]
    assert with_open, "the sample must leave some users with open decisions"
    victim = max(with_open, key=lambda u: (per_user[u], u))
    uid = engine_user_id(s, victim)
    before = all_state(redis_client, s.redis_prefix)
    assert any(uid.encode() in k for k in before), "the victim must have state before the forget"
    if pseudonymise:
        assert not any(victim.encode() in k or victim.encode() in v for k, v in before.items()), \
            "a clear user id reached Redis although pseudonymisation is on"

    res = subprocess.run(
        [sys.executable, "-m", "stream.cli", "forget", victim, "--json"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **s.to_env()}, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    print(f"forget: {report['keys_removed']} keys in {report['elapsed_ms']} ms", file=sys.stderr)
    assert report["removed"]["profile"] == 1
    assert report["removed"]["markers"] == per_user[victim]
    assert report["keys_removed"] == sum(1 for k in before if uid.encode() in k)
    assert report["removed"]["item_record"] == 1
    assert report["removed"]["open_index"] == 1
    # the user's contributions left the item statistics (exactness: tests/integration/test_item_contributions.py)
    assert report["item_contributions"]["items"] > 0 and report["item_contributions"]["pairs"] > 0

    after = all_state(redis_client, s.redis_prefix)
    leaks = [k for k, v in after.items() if uid.encode() in k or uid.encode() in v]
    assert leaks == []
    # everyone else is untouched (the open-decision index lost the user's entry only); the item statistics lost
    # the user's share
    sim = f"{s.redis_prefix}:sim:".encode()
    others = {k: v for k, v in before.items() if uid.encode() not in k and k in after and not k.startswith(sim)}
    open_key = f"{s.redis_prefix}:open".encode()
    others[open_key] = b" ".join(m for m in before[open_key].split() if m != uid.encode())
    assert others == {k: v for k, v in after.items() if k in before and uid.encode() not in k and not k.startswith(sim)}
    assert {k: v for k, v in before.items() if k.startswith(sim)} != {k: v for k, v in after.items() if k.startswith(sim)}


def test_forget_topic_request_is_applied_by_the_worker(engine_settings, start_worker, redis_client):
    s = engine_settings
    events = [e for e in read_events(SAMPLE, "rees46")][:300]
    victim = events[0]["user_id"]
    w = start_worker(s)
    w.wait_ready()
    produce_raw(s, s.topic_events, [(e["user_id"].encode(), event_bytes(e)) for e in events])
    wait_until(lambda: metric(w.metrics(), "promo_events_total") == len(events), 60, "events applied")
    tag = f"{s.redis_prefix}:{{u:{victim}}}".encode()
    assert any(k.startswith(tag) for k in redis_client.scan_iter(match=s.redis_prefix + ":*"))
    # besides the request: a malformed one, and ids no event could carry (a lone surrogate, which cannot name a
    # Redis key and stopped the worker on every restart; a control character): each is dead-lettered
    bad = [b"{oops", json.dumps({"user_id": "a\ud800"}).encode(), json.dumps({"user_id": "a\x01b"}).encode()]
    produce_raw(s, s.topic_forget, [(victim.encode(), json.dumps({"user_id": victim}).encode())]
                + [(b"x", raw) for raw in bad])
    wait_until(lambda: metric(w.metrics(), "promo_users_forgotten_total") == 1, 60, "the forget request")
    assert not any(k.startswith(tag) for k in redis_client.scan_iter(match=s.redis_prefix + ":*"))
    wait_until(lambda: metric(w.metrics(), "promo_events_invalid_total", reason="bad_value") == len(bad), 30,
               "the malformed forget requests dead-lettered")
    assert w.proc.poll() is None  # the worker goes on
