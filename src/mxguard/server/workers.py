"""``[server] workers = N | "auto"``: several processes sharing the listening sockets.

The master (the ``mxguard serve`` process) binds the policy and milter sockets
once -- TCP or UNIX -- and forks N workers. Each worker runs the ordinary
asyncio daemon (:class:`mxguard.server.daemon.Daemon`) on the inherited sockets; the
kernel hands each new connection to whichever worker accepts it first. The
master runs no event loop and opens no storage: SQLite is opened by each worker
after the fork (WAL works across processes), Redis likewise.

* SIGTERM / SIGINT to the master: forwarded; workers finish in-flight requests
  and exit; the master exits 0 once all are gone (SIGKILL after
  ``shutdown_grace`` + 10 s for a worker that hangs).
* SIGHUP: forwarded; every worker reloads. The master reloads its own copy of
  the config too, so a worker started later uses the latest good one.
* A worker that dies is restarted (one log line); one that keeps dying soon
  after its start is restarted with a growing delay (up to 30 s).
* A worker that exits 2 could not start (bad key, rules, storage): the master
  stops the others and exits 2, as ``mxguard serve`` does with one process.
* Workers get SIGTERM when the master dies (PR_SET_PDEATHSIG), so no orphan
  keeps the sockets.

``workers = 1`` (the default) does not use this module: one process, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from mxguard import config

log = logging.getLogger("mxguard")

BACKLOG = 1024
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
MASTER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
FAST_DEATH = 10.0  # a worker dying sooner than this after its start counts as crash-looping
MAX_DELAY = 30.0
EXIT_CANNOT_START = 2


def worker_count(value: int | str) -> int:
    """``[server] workers`` as a number: "auto" is one per usable core."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return max(1, int(value))


def bind(spec: str) -> socket.socket:
    """A listening socket for ``"host:port"`` or ``"unix:/path"``, as ``listen()`` makes it."""
    if spec.startswith("unix:"):
        path = spec[5:]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o666)  # Postfix's smtpd (user postfix) must connect
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock
    host, _, port = spec.rpartition(":")
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.filename is None:
            exc.filename = spec
        raise
    sock.setblocking(False)
    return sock


def bind_all(cfg: config.Config) -> dict[str, socket.socket]:
    """The sockets the daemon listens on, keyed by their ``listen`` spec."""
    sockets: dict[str, socket.socket] = {}
    specs = [cfg.policy.listen] + ([cfg.milter.listen] if cfg.milter.enabled else [])
    try:
        for spec in specs:
            if spec not in sockets:
                sockets[spec] = bind(spec)
    except OSError:
        for sock in sockets.values():
            sock.close()
        raise
    if cfg.web.enabled and cfg.web.listen not in sockets:
        # the dashboard is not worth a mail outage: each worker logs what is off
        with contextlib.suppress(OSError):
            sockets[cfg.web.listen] = bind(cfg.web.listen)
    return sockets


def use_inherited(sockets: dict[str, socket.socket]) -> None:
    """Make the protocol servers listen on ``sockets`` instead of binding anew.

    Both servers go through ``policy_server.listen`` (the milter server imports
    it by name), so both module attributes are replaced in this process only.
    A spec not in ``sockets`` (changed by a reload) falls back to binding.
    """
    from mxguard.server import milter as milter_server
    from mxguard.server import policy as policy_server

    original = policy_server.listen

    async def listen(spec: str, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
        sock = sockets.get(spec)
        if sock is None:
            return await original(spec, factory)
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            return await loop.create_unix_server(factory, sock=sock, backlog=BACKLOG)
        return await loop.create_server(factory, sock=sock, backlog=BACKLOG)

    policy_server.listen = listen
    milter_server.listen = listen  # type: ignore[attr-defined]


def _die_with_parent() -> None:
    """SIGTERM this worker when the master goes away (Linux only; best effort)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited {os.waitstatus_to_exitcode(status)}"


class Worker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.pid = 0
        self.started = 0.0
        self.fast_deaths = 0
        self.restart_at: float | None = None


class Master:
    """Binds, forks, forwards signals, restarts; see the module docstring."""

    def __init__(self, cfg: config.Config, config_path: str | None, count: int) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.count = count
        self.sockets: dict[str, socket.socket] = {}
        self.workers = [Worker(i + 1) for i in range(count)]
        self.stopping = False
        self.kill_at: float | None = None
        self.exit_code = 0
        self._mask: set[int | signal.Signals] = set()

    # ------------------------------------------------------------ master side

    def run(self) -> int:
        self.sockets = bind_all(self.cfg)  # OSError: "cannot start", exit 2 (cli)
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            log.info("master: pid %d, %d workers on %s", os.getpid(), self.count,
                     ", ".join(self.sockets))
            for w in self.workers:
                self.spawn(w)
            while True:
                self.reap()
                if self.stopping and not any(w.pid for w in self.workers):
                    break
                now = time.monotonic()
                if self.stopping and self.kill_at is not None and now >= self.kill_at:
                    for w in self.workers:
                        if w.pid:
                            log.warning("master: worker %d (pid %d) did not stop; killing it",
                                        w.slot, w.pid)
                            self._send(w, signal.SIGKILL)
                    self.kill_at = None
                if not self.stopping:
                    for w in self.workers:
                        if not w.pid and w.restart_at is not None and now >= w.restart_at:
                            self.spawn(w)
                info = signal.sigtimedwait(MASTER_SIGNALS, self._timeout())
                if info is not None:
                    self.on_signal(signal.Signals(info.si_signo))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            for sock in self.sockets.values():
                sock.close()
        log.info("master: all workers stopped")
        return self.exit_code

    def _timeout(self) -> float:
        now = time.monotonic()
        waits = [1.0]
        waits += [w.restart_at - now for w in self.workers
                  if not w.pid and w.restart_at is not None]
        if self.kill_at is not None:
            waits.append(self.kill_at - now)
        return max(0.01, min(waits))

    def on_signal(self, sig: signal.Signals) -> None:
        if sig in STOP_SIGNALS:
            if not self.stopping:
                log.info("master: %s: stopping %d workers", sig.name,
                         sum(1 for w in self.workers if w.pid))
            self.stop()
        elif sig == signal.SIGHUP and not self.stopping:
            self.reload()
            for w in self.workers:
                self._send(w, signal.SIGHUP)

    def stop(self) -> None:
        first = not self.stopping
        self.stopping = True
        for w in self.workers:
            w.restart_at = None
            if first:
                self._send(w, signal.SIGTERM)
        if first:
            self.kill_at = time.monotonic() + self.cfg.server.shutdown_grace + 10

    def reload(self) -> None:
        """The master's copy of the config, for workers started from now on."""
        if not self.config_path:
            return
        try:
            cfg = config.load(self.config_path)
        except Exception as exc:  # the workers log why they refuse it
            log.debug("master: config not reloaded: %s", exc)
            return
        if cfg.policy.listen != self.cfg.policy.listen or \
                cfg.milter.listen != self.cfg.milter.listen:
            log.warning("reload: listen addresses changed; restart mxguard to apply them")
            cfg = _keep_listen(cfg, self.cfg)
        if worker_count(cfg.server.workers) != self.count:
            log.warning("reload: server.workers changed; restart mxguard to apply it")
        self.cfg = cfg

    def _send(self, w: Worker, sig: signal.Signals) -> None:
        if w.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, sig)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for w in self.workers:
                if w.pid == pid:
                    self.on_exit(w, status)

    def on_exit(self, w: Worker, status: int) -> None:
        w.pid = 0
        if self.stopping:
            log.info("master: worker %d stopped (%s)", w.slot, describe_status(status))
            return
        code = os.waitstatus_to_exitcode(status)
        if code == EXIT_CANNOT_START:
            log.error("master: worker %d could not start; stopping", w.slot)
            self.exit_code = EXIT_CANNOT_START
            self.stop()
            return
        now = time.monotonic()
        w.fast_deaths = w.fast_deaths + 1 if now - w.started < FAST_DEATH else 0
        delay = min(MAX_DELAY, 0.5 * 2 ** (w.fast_deaths - 1)) if w.fast_deaths else 0.0
        log.warning("master: worker %d died (%s); restarting it%s", w.slot,
                    describe_status(status), f" in {delay:g} s" if delay else "")
        w.restart_at = now + delay

    def spawn(self, w: Worker) -> None:
        w.restart_at = None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child (covered by integration tests)
            code = 1
            try:
                code = self.child(w.slot)
            except BaseException:
                log.exception("worker %d: crashed", w.slot)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        w.pid = pid
        w.started = time.monotonic()
        log.info("master: worker %d started (pid %d)", w.slot, pid)

    # ------------------------------------------------------------ worker side

    def child(self, slot: int) -> int:
        """Runs in the forked worker: the ordinary daemon on the inherited sockets."""
        from mxguard.server.daemon import Daemon, StartupError

        master = os.getppid()
        _die_with_parent()
        if os.getppid() != master:  # the master died before prctl took effect
            return 0
        use_inherited(self.sockets)
        mask = self._mask

        class WorkerDaemon(Daemon):
            async def start(self) -> None:
                # run() has installed the signal handlers: a SIGHUP/SIGTERM held
                # back since the fork is delivered now and handled.
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                await super().start()

        async def main() -> None:
            await WorkerDaemon(self.cfg, self.config_path).run()

        try:
            _run_loop(main)
        except StartupError as exc:
            print(f"mxguard: worker {slot}: cannot start: {exc}", file=sys.stderr)
            return EXIT_CANNOT_START
        except OSError as exc:
            print(f"mxguard: worker {slot}: cannot start: {exc.strerror or exc}",
                  file=sys.stderr)
            return EXIT_CANNOT_START
        except KeyboardInterrupt:
            return 0
        return 0


def _keep_listen(cfg: config.Config, old: config.Config) -> config.Config:
    import dataclasses

    return dataclasses.replace(
        cfg, policy=dataclasses.replace(cfg.policy, listen=old.policy.listen),
        milter=dataclasses.replace(cfg.milter, listen=old.milter.listen))


def _run_loop(main: Callable[[], Any]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())


def serve(cfg: config.Config, config_path: str | None, count: int) -> int:
    """The master: returns its exit status once every worker has stopped."""
    return Master(cfg, config_path, count).run()
