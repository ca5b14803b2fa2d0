"""stream.forked: work in a forked child (the model snapshot) - real forks, real pipes, no fakes."""

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import redis

from stream import forked
from stream.epoch import StateLostError
from stream.faults import Verdict, classify_fault

def _wait_until(cond, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        time.sleep(0.01)


def test_the_child_sees_the_state_at_the_fork_while_the_parent_goes_on(tmp_path):
    """The child works on the image of the fork; the parent's loop runs meanwhile (the child waits for a file
    that only the parent's loop writes, after the fork: a blocked loop would never write it)."""
    out, go = tmp_path / "out", tmp_path / "go"
    models = {"n": 1}

    def work():
        while not go.exists():
            time.sleep(0.005)
        out.write_bytes(pickle.dumps(models))

    async def main():
        task = asyncio.create_task(forked.run_forked(work))
        await asyncio.sleep(0)  # the task forks at its first step
        models["n"] = 2  # the parent learns on after the fork
        go.write_text("")  # the loop runs while the child works
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
    assert pickle.loads(out.read_bytes()) == {"n": 1}


def test_what_the_work_returns_comes_back_to_the_parent():
    held = {"u1", "u2"}

    def work():
        held.discard("u1")  # the child's copy
        return sorted(held)

    assert asyncio.run(forked.run_forked(work)) == ["u2"]
    assert held == {"u1", "u2"}  # the parent's own state is untouched
    assert asyncio.run(forked.run_forked(lambda: None)) is None


@pytest.mark.parametrize("exc, verdict", [
    (redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."), Verdict.RETRY),
    (ValueError("a bug"), Verdict.STOP),
])
def test_what_the_work_raises_is_raised_in_the_parent_with_its_fault_verdict(exc, verdict):
    def work():
        raise exc

    with pytest.raises(type(exc)) as got:
        asyncio.run(forked.run_forked(work))
    assert str(got.value) == str(exc)
    assert classify_fault(got.value).verdict is verdict


def test_lost_state_comes_back_as_lost_state():
    def work():
        raise StateLostError("the epoch marker promo:epoch is missing")

    with pytest.raises(StateLostError, match="epoch marker"):
        asyncio.run(forked.run_forked(work))


def test_an_exception_that_does_not_pickle_comes_back_as_its_text():
    class Local(Exception):  # a local class does not pickle
        pass

    def work():
        raise Local("cannot travel")

    with pytest.raises(RuntimeError, match="Local: cannot travel"):
        asyncio.run(forked.run_forked(work))


def test_a_child_killed_before_it_reports_is_an_error_naming_the_signal():
    def work():
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(forked.ChildDied, match=r"signal 9 \(SIGKILL\)"):
        asyncio.run(forked.run_forked(work))


def test_cancelling_the_wait_kills_the_child(tmp_path):
    pid_file = tmp_path / "pid"

    def work():
        pid_file.write_text(str(os.getpid()))
        while True:
            time.sleep(1)

    async def main():
        task = asyncio.create_task(forked.run_forked(work))
        while not pid_file.exists() or not pid_file.read_text():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pid_file.read_text())

    pid = asyncio.run(main())
    with pytest.raises((ProcessLookupError, ChildProcessError)):  # killed and reaped: no such child any more
        os.waitpid(pid, os.WNOHANG)


def test_the_child_dies_with_a_worker_killed_by_sigkill(tmp_path):
    """A worker killed while its child writes a snapshot leaves no writer behind (Linux: the project's platform)."""
    pid_file = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import asyncio, os, pathlib, time
        from stream import forked
        def work():
            pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        asyncio.run(forked.run_forked(work))
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    try:
        _wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30, "the child started")
        child = int(pid_file.read_text())
        worker.kill()
        worker.wait(30)

        def gone() -> bool:
            try:
                with open(f"/proc/{child}/stat") as f:  # a zombie waiting for init to reap it is gone as well
                    return f.read().split(") ")[1].startswith("Z")
            except FileNotFoundError:
                return True

        _wait_until(gone, 30, f"child {child} died with its parent")
    finally:
        worker.kill()
