"""A real ``redis-server`` on a free loopback port, for tests.

* :class:`RedisServer` runs one private server (no persistence: ``--save ""
  --appendonly no``), so :meth:`RedisServer.restart` brings it back **empty** on
  the same port; :meth:`RedisServer.stop` / :meth:`RedisServer.start` model an
  outage.
* :func:`shared_server` is one server per test process, started on first use
  and stopped at exit; the ``redis_url`` fixture hands out its database 0,
  flushed before each test.
* ``redis_server`` is a private server per test (for tests that stop it).

Without ``redis-server`` the tests that need it are skipped, unless CI is set:
then they fail, because CI must run them (scripts/install-test-deps.sh installs
redis-server). Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxguard.testing.ports import free_port


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_redis_server() -> str:
    """The redis-server binary; skip (fail under CI) when there is none."""
    exe = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if exe is not None:
        return exe
    problem = "redis-server is not installed (run scripts/install-test-deps.sh)"
    if running_in_ci():
        pytest.fail(f"CI must run the Redis tests, but {problem}", pytrace=False)
    pytest.skip(problem)


def ping(port: int, password: str | None = None, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as s:
            if password is not None:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One private redis-server process on 127.0.0.1."""

    def __init__(self, workdir: Path | None = None, port: int | None = None,
                 password: str | None = None, extra: list[str] | None = None) -> None:
        self.exe = require_redis_server()
        self.port = port or free_port()
        self.password = password
        self.extra = list(extra or [])
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mxg-redis-"))
        self.log = self.workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
                "--protected-mode", "no", *self.extra]
        if self.password:
            args += ["--requirepass", self.password]
        logf = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            if ping(self.port, self.password):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM; nothing is saved). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> RedisServer:
        """Stop and start again on the same port: the data is gone."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, db: int = 0):  # type: ignore[no-untyped-def]
        """A synchronous redis-py client (for checks from tests)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password,
                           socket_timeout=5)

    def flush(self) -> None:
        c = self.client()
        try:
            c.flushall()
        finally:
            c.close()


class RedisSentinel:
    """A redis-server in Sentinel mode watching one master (``name``) on loopback."""

    def __init__(self, workdir: Path, master: RedisServer, name: str = "mxmaster") -> None:
        self.exe = require_redis_server()
        self.port = free_port()
        self.name = name
        self.conf = workdir / f"sentinel-{self.port}.conf"
        self.conf.write_text(f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\n"
                             f"dir {workdir}\n"
                             f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n")
        self.log = workdir / f"sentinel-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}/{db}"

    def start(self, timeout: float = 10.0) -> RedisSentinel:
        logf = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([self.exe, str(self.conf), "--sentinel"], stdout=logf,
                                     stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis sentinel did not start:\n"
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


_shared: RedisServer | None = None


def shared_server() -> RedisServer:
    """One redis-server for the whole test process (started on first use)."""
    global _shared
    if _shared is None or not _shared.running:
        _shared = RedisServer().start()
        atexit.register(_shared.stop)
    return _shared


@pytest.fixture
def redis_url() -> str:
    """``redis://127.0.0.1:PORT/0`` of the shared server, flushed for this test."""
    server = shared_server()
    server.flush()
    return server.url(0)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server for this test (which may stop and restart it)."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
