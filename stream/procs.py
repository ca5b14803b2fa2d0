"""Child processes the CLI, the benchmark and the tests start: stopping them the same way everywhere, and free
loopback ports for them."""

from __future__ import annotations

import signal
import socket
import subprocess

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, never one this process was given before.

    The kernel may give the same free port to two ``bind(port 0)`` in a row, and a caller often asks for two
    before starting anything (a broker's and a Redis', in one settings object): they must differ.

    >>> free_port() != free_port()
    True
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM (a Faust worker then leaves its group cleanly), SIGKILL after ``timeout`` s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
