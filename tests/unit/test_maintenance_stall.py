"""``load_tests.maintenance_stall``'s memory figures: what a forked child copies is what they report."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from load_tests.bench_pipeline import proc_memory_mb
from load_tests.maintenance_stall import ChildMemory, private_dirty_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MB = 2**20


def test_child_memory_counts_the_pages_a_child_writes_not_those_it_shares():
    # a child running before the watch (the test session's broker, say) is not counted, whatever its size
    older = subprocess.Popen([sys.executable, "-c", "x = bytearray(80 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
                              "print('ready', flush=True); import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert older.stdout.readline() == b"ready\n"
    shared = bytearray(64 * MB)  # the parent's, written: resident, and shared with the child after the fork
    shared[::4096] = b"\x01" * len(range(0, len(shared), 4096))
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    with ChildMemory().watching() as watch:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: 48 MB of its own, then it waits to be let go
            mine = bytearray(48 * MB)
            mine[::4096] = b"\x02" * len(range(0, len(mine), 4096))
            os.write(ready_w, b"x")
            os.read(done_r, 1)
            os._exit(0)
        try:
            assert os.read(ready_r, 1) == b"x"
            deadline = time.monotonic() + 10
            while watch.peak_mb < 48 and time.monotonic() < deadline:  # sampled every 2 ms
                time.sleep(0.005)
        finally:
            os.write(done_w, b"x")
            os.waitpid(pid, 0)
    for fd in (ready_r, ready_w, done_r, done_w):
        os.close(fd)
    older.communicate(b"", timeout=30)
    assert 48 <= watch.peak_mb < 64, watch.peak_mb  # its own 48 MB, not the 64 MB it only shared
    assert proc_memory_mb(os.getpid())["rss_mb"] >= 64 and private_dirty_mb() >= 64
    assert private_dirty_mb(pid) == 0.0  # gone
