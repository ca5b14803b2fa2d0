"""Operating-system errors in the batch loop: a network's answer is transient (retry), a file system's is not."""

from __future__ import annotations

import errno
import socket

import pytest

from stream.faults import Verdict, classify_fault


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    BrokenPipeError(errno.EPIPE, "Broken pipe"),
    socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
    OSError(errno.ENETUNREACH, "Network is unreachable"),
    OSError(errno.EHOSTUNREACH, "No route to host"),
    OSError("Multiple exceptions: [Errno 111] Connect call failed ('127.0.0.1', 6379)"),
    OSError(errno.ENOSPC, "No space left on device"),
    TimeoutError("timed out"),
])
def test_a_networks_answer_is_retried(exc):
    assert classify_fault(exc).verdict is Verdict.RETRY


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/etc/promo/offers.yaml"),
    PermissionError(errno.EACCES, "Permission denied", "/data/promo"),
    IsADirectoryError(errno.EISDIR, "Is a directory", "/data"),
    OSError(errno.EROFS, "Read-only file system"),
])
def test_a_file_systems_answer_stops_the_worker(exc):
    """Retried, a missing file or a permission kept the worker at 503 forever: no retry can fix them."""
    assert classify_fault(exc).verdict is Verdict.STOP


def test_a_broker_that_is_not_available_for_a_moment_is_retried():
    """Kafka's BROKER_NOT_AVAILABLE is a broker restarting: aiokafka does not mark it retriable, but stopping the
    worker for it would turn a rolling restart of the brokers into a restart of every worker."""
    import aiokafka.errors as kex

    fault = classify_fault(kex.BrokerNotAvailableError())
    assert (fault.verdict, fault.component, fault.kind) == (Verdict.RETRY, "kafka", "connection")
