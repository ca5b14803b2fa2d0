"""Work the worker hands to a forked child so that its event loop does not wait for it: the model snapshot.

Pickling the learning core holds the GIL from start to end (the pickler is C code that never lets another thread
run), and it grows with the users the models hold: 16 MB in 0.25-0.45 s after 110k events of the public slices.
In a thread it would still stop every batch for that long, once per ``PROMO_SNAPSHOT_INTERVAL_S``. A forked child
instead starts as a copy-on-write image of the worker at the moment of the fork, so it sees the models exactly as
they were then (consistent with the offsets the parent noted just before), serialises and writes them, and exits;
the parent stops only for the fork itself (its page tables) and goes on deciding and learning meanwhile.

The child is kept simple, since it is a copy of a process with other threads (Faust's consumer): it runs only
``work``, with the garbage collector off (no finalizer of an inherited object runs in it), without logging,
asyncio or exit handlers, and leaves with ``os._exit``. It dies with the worker (``PR_SET_PDEATHSIG`` on Linux):
a worker killed while its child writes leaves no writer behind. What ``work`` returns or raises comes back to the
parent, pickled through a pipe: the value is returned there, the exception raised there, so the caller's fault
policy sees the same exception as if the work had run in the parent (a transient Redis error skips a period;
anything else stops the worker).

Where ``os.fork`` is missing (not a POSIX system) :func:`available` is False and callers do the work in-process.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = ["ChildDied", "available", "run_forked"]

T = TypeVar("T")


class ChildDied(RuntimeError):
    """The child ended without reporting (killed by a signal, or out of memory)."""


def available() -> bool:
    """Whether :func:`run_forked` can fork here (POSIX)."""
    return hasattr(os, "fork")


async def run_forked(work: Callable[[], T]) -> T:
    """Run ``work()`` in a forked child and wait for it without blocking the event loop; returns what it returned
    (pickled through the pipe: keep it small).

    Raises what ``work`` raised (or :class:`RuntimeError` with its text, when it cannot be pickled), or
    :class:`ChildDied`. Cancelled while it waits, it kills the child.
    """
    prctl = _prctl()  # looked up before the fork: the child takes no loader lock another thread may have held
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its effects are what the tests check
        os.close(read_fd)
        _child(work, write_fd, os.getppid(), prctl)
    os.close(write_fd)
    reaped = False
    try:
        report = await asyncio.to_thread(_read_all, read_fd)  # the thread closes the pipe: it may outlive a cancel
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        reaped = True
    finally:
        if not reaped:  # cancelled (the worker stops): the child must not outlive the wait for it
            _kill(pid)
    if status == 0:
        return pickle.loads(report) if report else None
    if report and os.WIFEXITED(status):  # the child caught what ``work`` raised and reported it
        raise pickle.loads(report)
    raise ChildDied(f"the child process doing background work ended with {_describe(status)} before it "
                    "reported; the work was not done (out of memory? see the kernel log)")


def _child(work: Callable[[], object], write_fd: int, parent: int, prctl) -> None:  # pragma: no cover - in the child
    gc.disable()
    code = 0
    try:
        _die_with_parent(parent, prctl)
        _default_signals()
        result = work()
        report = b"" if result is None else pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # everything goes back to the parent, which raises it where the work was asked
        code = 1
        try:
            report = pickle.dumps(exc)
        except Exception:  # an exception that does not pickle comes back as its text
            report = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    try:
        view = memoryview(report)
        while view:
            view = view[os.write(write_fd, view):]
    finally:
        os._exit(code)


@functools.cache
def _prctl():
    """libc's ``prctl`` (Linux; None elsewhere), looked up once."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int, prctl) -> None:  # pragma: no cover - in the child
    if prctl is not None:
        pr_set_pdeathsig = 1
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _default_signals() -> None:  # pragma: no cover - in the child
    # the worker's handlers (asyncio's, Faust's) write to the worker's wake-up pipe, which the child shares
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # not the main thread of the worker: its handlers never run in this thread anyway
        pass


def _read_all(fd: int) -> bytes:
    """Read the pipe to its end (the child exited or was killed) and close it."""
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _kill(pid: int) -> None:
    """Kill the child and reap it (a thread waiting for it may reap it first)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _describe(status: int) -> str:
    """How a child ended, from its ``waitpid`` status.

    >>> _describe(9), _describe(256)
    ('signal 9 (SIGKILL)', 'exit code 1')
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"signal {sig} ({signal.Signals(sig).name})"
    return f"exit code {os.WEXITSTATUS(status)}"
