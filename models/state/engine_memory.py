"""The engine store in process memory, for tests, offline evaluation and benchmarks (no TTLs)."""

from __future__ import annotations

from models import jsoncodec
from models.state.engine_store import EngineStore, UserLoad


class MemoryStore(EngineStore):
    """In-process store for tests, offline evaluation and benchmarks. No TTLs."""

    def __init__(self, ledger_max: int = 50) -> None:
        self.ledger_max = ledger_max  # closed decisions kept per user, as RedisStore's
        self.profiles: dict[str, str] = {}  # user -> the profile document, JSON (as RedisStore keeps it)
        self.versions: dict[str, int] = {}
        self.seen: set[tuple[str, str]] = set()
        self.decisions: dict[tuple[str, str], list] = {}  # (user, trigger) -> [json, sent, context json]
        self.ledgers: dict[str, list[str]] = {}  # user -> closed decisions' ledger records (JSON), oldest first
        self.open_until: dict[str, int] = {}
        self.policy: dict[str, float] = {}
        self.tokens: dict[str, str] = {}
        self.clock: dict[str, list[int]] = {}

    def _apply_policy(self, updates: list, counts: dict) -> None:
        pol = self.policy
        for f, n in counts.items():
            pol[f] = pol.get(f, 0) + int(n)
        for f, a0, b0, da, db in updates:
            pol.setdefault("a:" + f, float(a0))
            pol.setdefault("b:" + f, float(b0))
            pol["a:" + f] += da
            pol["b:" + f] += db

    async def policy_state(self) -> dict:
        return dict(self.policy)

    async def sync_clock(self, state):
        for key, (mark, seen) in state.items():
            old = self.clock.get(key, [mark, seen])
            self.clock[key] = [max(old[0], int(mark)), max(old[1], int(seen))]
        return {k: list(v) for k, v in self.clock.items()}

    async def load(self, event_ids, triggers):
        out = {}
        for uid, eids in event_ids.items():
            packed = self.profiles.get(uid)
            out[uid] = UserLoad(
                profile=jsoncodec.loads(packed) if packed else {},  # a fresh copy, as from Redis
                packed=packed,
                version=str(self.versions[uid]) if uid in self.versions else "",
                token=self.tokens.get(uid, ""),
                seen={e for e in eids if (uid, e) in self.seen},
                stored={
                    t: (d[0], d[1]) for t in triggers.get(uid, ()) if (d := self.decisions.get((uid, t))) is not None
                },
            )
        return out

    async def commit(self, commits):
        ok = []
        for c in commits:
            current = str(self.versions[c.user_id]) if c.user_id in self.versions else ""
            if current != c.version or any((c.user_id, e) in self.seen for e in c.event_ids):
                ok.append(False)
                continue
            self.versions[c.user_id] = self.versions.get(c.user_id, 0) + 1
            if c.token:
                self.tokens[c.user_id] = c.token
            self.seen.update((c.user_id, e) for e in c.event_ids)
            stored = jsoncodec.loads(self.profiles.get(c.user_id, "{}"))
            stored.update(c.profile)
            self.profiles[c.user_id] = jsoncodec.dumps_str(stored)  # the codec RedisStore writes with
            if c.open_until is None:
                self.open_until.pop(c.user_id, None)
            else:
                self.open_until[c.user_id] = c.open_until
            for trig, js in c.decisions:
                self.decisions[(c.user_id, trig)] = [js, False, c.contexts.get(trig, "")]
            if c.ledger and self.ledger_max > 0:
                kept = self.ledgers.setdefault(c.user_id, [])
                kept.extend(c.ledger)
                del kept[: -self.ledger_max]
            self._apply_policy(c.policy, c.counts)
            ok.append(True)
        return ok

    async def mark_sent(self, sent):
        for key in sent:
            if key in self.decisions:
                self.decisions[key][1] = True

    async def due_users(self, now_ms: int, limit: int = 1000) -> list[str]:
        return sorted(u for u, t in self.open_until.items() if t <= now_ms)[:limit]

    async def reindex(self, entries):
        for uid, until, version in entries:
            if (str(self.versions[uid]) if uid in self.versions else "") != version:
                continue
            if until is None:
                self.open_until.pop(uid, None)
            else:
                self.open_until[uid] = until

    async def ledger(self, user_id: str, n: int = 0) -> list[str]:
        kept = self.ledgers.get(user_id, [])
        return list(kept[-n:] if n > 0 else kept)

    async def decision_context(self, user_id: str, trigger_event_id: str) -> str | None:
        d = self.decisions.get((user_id, trigger_event_id))
        return (d[2] or None) if d is not None else None

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass
