"""One contract every :class:`models.state.engine_store.EngineStore` passes; run against each implementation."""

from __future__ import annotations

import asyncio

from models.state.engine_store import UserCommit


def run(coro):
    return asyncio.run(coro)


class EngineStoreContract:
    """Subclasses provide ``make_store()`` returning a fresh, empty store."""

    def make_store(self):
        raise NotImplementedError

    def test_empty_user_loads_empty(self):
        store = self.make_store()
        load = run(store.load({"nobody": ["e1"]}, {"nobody": ["e1"]}))["nobody"]
        assert load.profile == {} and load.seen == set() and load.stored == {}

    def test_commit_then_load_round_trip(self):
        store = self.make_store()
        c = UserCommit("u1", {"a": "1", "b": "x"}, ["e1", "e2"], [("e2", b'{"d":1}')])
        assert run(store.commit([c])) == [True]
        load = run(store.load({"u1": ["e1", "e2", "e3"]}, {"u1": ["e2", "e3"]}))["u1"]
        assert {k.decode() if isinstance(k, bytes) else k: (v.decode() if isinstance(v, bytes) else v)
                for k, v in load.profile.items()} == {"a": "1", "b": "x"}
        assert load.seen == {"e1", "e2"}
        assert load.stored == {"e2": (b'{"d":1}', False)}

    def test_commit_is_refused_whole_when_any_marker_exists(self):
        store = self.make_store()
        assert run(store.commit([UserCommit("u1", {"n": "1"}, ["e1"], [])])) == [True]
        again = UserCommit("u1", {"n": "2"}, ["e2", "e1"], [("e2", b"{}")])
        assert run(store.commit([again])) == [False]
        load = run(store.load({"u1": ["e1", "e2"]}, {"u1": ["e2"]}))["u1"]
        assert load.seen == {"e1"} and load.stored == {}
        assert {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in load.profile.items()} == {"n": "1"}

    def test_users_are_independent_in_one_commit_call(self):
        store = self.make_store()
        run(store.commit([UserCommit("u1", {"n": "1"}, ["e1"], [])]))
        res = run(store.commit([UserCommit("u1", {"n": "2"}, ["e1"], []), UserCommit("u2", {"n": "1"}, ["e1"], [])]))
        assert res == [False, True]

    def test_mark_sent(self):
        store = self.make_store()
        run(store.commit([UserCommit("u1", {}, ["e1"], [("e1", b"{}")])]))
        run(store.mark_sent([("u1", "e1"), ("u1", "unknown")]))
        assert run(store.load({"u1": []}, {"u1": ["e1"]}))["u1"].stored == {"e1": (b"{}", True)}

    def test_ping(self):
        assert run(self.make_store().ping()) is True

    def test_reindex_and_due_users(self):
        store = self.make_store()
        run(store.commit([UserCommit("u1", {}, ["e1"], [], open_until=100, had_open=False)]))
        run(store.commit([UserCommit("u2", {}, ["e1"], [], open_until=300, had_open=False)]))
        assert run(store.due_users(200)) == ["u1"]
        run(store.reindex([("u1", None, "1"), ("u2", 150, "1")]))
        assert run(store.due_users(200)) == ["u2"]
        # a correction computed from an older profile version is skipped: the newer commit wrote the index
        run(store.commit([UserCommit("u1", {}, ["e2"], [], version="1", open_until=120, had_open=False)]))
        run(store.reindex([("u1", None, "1")]))
        assert run(store.due_users(200)) == ["u1", "u2"]
        run(store.reindex([("u1", None, "2")]))
        assert run(store.due_users(200)) == ["u2"]
        run(store.commit([UserCommit("u2", {"n": "1"}, ["e2"], [], version="1", had_open=True)]))
        assert run(store.due_users(10**9)) == []

    def test_policy_updates_ride_on_the_commit_and_only_on_a_successful_one(self):
        store = self.make_store()
        f = '["c5",[3]]'
        first = UserCommit("u1", {}, ["e1"], [], policy=[(f, 2.0, 1.0, 0.0, 0.25)])
        assert run(store.commit([first])) == [True]
        # the prior is written once (the first commit), increments add up, ``n`` counts outcomes
        closing = UserCommit("u1", {}, ["e2"], [], version="1", policy=[(f, 9.0, 9.0, 1.0, 0.0)],
                             counts={"n": 1, "closed:treatment": 1})
        refused = UserCommit("u1", {}, ["e3"], [], version="0", policy=[(f, 9.0, 9.0, 1.0, 1.0)], counts={"n": 1})
        assert run(store.commit([closing, refused])) == [True, False]
        state = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in run(store.policy_state()).items()}
        assert state == {"a:" + f: 3.0, "b:" + f: 1.25, "n": 1.0, "closed:treatment": 1.0}
