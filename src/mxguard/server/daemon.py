"""``mxguard serve``: start the doors, handle signals, reload.

* SIGTERM / SIGINT: stop accepting, finish in-flight requests for up to
  ``[server] shutdown_grace`` seconds, exit 0. A content scan still running in
  a worker thread (:data:`mxguard.core.runtime.WORKERS`, daemon threads) does
  not hold up the exit; should the shutdown itself not end within the grace
  (plus :data:`EXIT_MARGIN`), a watchdog thread logs it, flushes the logs and
  ends the process (``os._exit``).
* SIGHUP: reload the config file and the whitelist files; the new config is
  swapped in as one object only when all of it loads. A bad file is refused
  with a log line and the old config stays. Connections are not dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import sys
import threading
from typing import Any

from mxguard import __version__, config, logs
from mxguard.checks.rules import RULES_SERVICE
from mxguard.core.runner import log_failure
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Mode
from mxguard.dns import Resolver
from mxguard.jobs import dmarc_reports
from mxguard.redact import redact
from mxguard.server.policy import PolicyServer
from mxguard.server.policy_door import PolicyDoor

log = logging.getLogger("mxguard")

RECONNECT_INTERVAL = 1.0  # seconds between tries of a store that was down at start
EXIT_MARGIN = 2.0  # seconds past shutdown_grace before the watchdog ends the process


def flush_logs() -> None:
    """Write out the decision log and every log handler (before an ``os._exit``)."""
    with contextlib.suppress(Exception):
        logs.decisions.flush()
    for logger in (logging.getLogger(), log):
        for handler in logger.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def force_exit(reason: str, code: int) -> None:
    """Log ``reason``, flush the logs, end the process now (no interpreter teardown)."""
    from mxguard.core.runtime import WORKERS

    log.error("shutdown: %s (scans in progress=%d): exiting now", reason, WORKERS.busy)
    flush_logs()
    os._exit(code)


def start_exit_watchdog(grace: float) -> threading.Timer:
    """A daemon timer that ends the process if the shutdown outlasts ``grace``."""
    timer = threading.Timer(grace + EXIT_MARGIN, force_exit,
                            (f"not finished {grace + EXIT_MARGIN:g} s after SIGTERM", 1))
    timer.daemon = True
    timer.start()
    return timer


class StartupError(Exception):
    """A problem that stops start-up, phrased for the admin."""


def load_keys(cfg: config.Config) -> Any:
    """The DKIM KeyTable; a bad or too-readable key file is one clear message."""
    from mxguard.auth.dkim_keys import DkimKeyError, KeyTable
    from mxguard.auth.dkim_rotation import active_keys

    try:  # [dkim] keys as `mxguard dkim rotate` has advanced them
        return KeyTable.from_config(dataclasses.replace(cfg.dkim, keys=active_keys(cfg)))
    except (DkimKeyError, OSError, ValueError) as exc:
        raise StartupError(f"{cfg.source}: [dkim] keys: {exc}") from None


def load_content_rules(cfg: config.Config, interim: bool = False) -> Any:
    """The compiled rule set (built-in and SpamAssassin .cf files); seconds with SA's rules."""
    from mxguard.content.rules import load_rules

    try:  # Hyperscan databases not cached yet: compiled in a thread, served meanwhile
        return load_rules(cfg, background=True, interim=interim)
    except (OSError, ValueError) as exc:
        raise StartupError(f"{cfg.source}: [content] rules: {exc}") from None


async def open_services(cfg: config.Config) -> dict[str, Any]:
    """Shared services for checks that keep state (greylist, keys, DMARC results)."""
    from mxguard.checks import dkim_sign
    from mxguard.checks import dmarc as dm
    from mxguard.checks.greylist import open_greylister
    from mxguard.store.backends import open_results_store
    from mxguard.store.base import StoreError

    services: dict[str, Any] = {dkim_sign.KEYTABLE_SERVICE: load_keys(cfg)}
    # fail_open: a store that is down at start (Redis) is not a reason to refuse to
    # start; each request gets the fail mode until it is back (Daemon._reconnect)
    services["greylist"] = await open_greylister(cfg, fail_open=True)
    if cfg.milter.enabled and cfg.dmarc.store_results:
        try:  # Redis connects on first use; a SQLite file may be unusable now
            services[dm.RESULTS_SERVICE] = open_results_store(cfg)
        except StoreError as exc:
            log.error("dmarc results: not recorded until mxguard is restarted: %s", exc)
    if cfg.milter.enabled:
        services.update(open_content_services(cfg, interim=True))
    from mxguard.core.history import open_history

    await open_history(cfg, services)  # [history] enabled: the recorder, writing in background
    from mxguard.web import metrics

    metrics.install(services, cfg.state_dir)  # the decision observer; counted store calls
    return services


def open_content_services(cfg: config.Config, interim: bool = False) -> dict[str, Any]:
    """The rule set and the Bayes classifier: what the milter door and ``mxguard
    scan`` share, so both score a message alike."""
    services: dict[str, Any] = {}
    if cfg.mode("content") is Mode.OFF:
        return services
    services[RULES_SERVICE] = load_content_rules(cfg, interim)
    if cfg.bayes.enabled:
        from mxguard.checks import bayes
        from mxguard.content.bayes import BayesClassifier
        from mxguard.store.backends import open_bayes_store
        from mxguard.store.base import StoreError

        try:
            store = open_bayes_store(cfg)
        except StoreError as exc:  # an unusable Bayes store: scan without Bayes
            log.warning("bayes: disabled: %s", exc)
        else:
            services["bayes_store"] = store
            services[bayes.SERVICE] = BayesClassifier(store, cfg.bayes)
    return services


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value):
        return await value
    return value


async def close_services(services: dict[str, Any]) -> None:
    for svc in services.values():
        close = getattr(svc, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await _maybe_await(close())


GC_THRESHOLDS = (10000, 20, 50)


def tune_gc() -> None:
    """Once the daemon is set up: its objects (rules, config, modules) go to the
    permanent generation, so no collection walks them again, and young collections
    run every 10,000 container allocations instead of 700 (a policy request makes a
    few hundred). Measured with bench/policy_bench.py --checks full: server CPU per
    request ~20 % lower for new triplets, ~15 % for known ones; the thresholds alone
    brought it, freezing alone did not."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Daemon:
    def __init__(self, cfg: config.Config, config_path: str | None = None) -> None:
        self.config_path = config_path
        self.runtime = Runtime(config=cfg, resolver=Resolver(cfg.dns))
        self.stopping = asyncio.Event()
        self.policy: PolicyServer | None = None
        self.milter: Any = None
        self.web: Any = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        cfg = self.runtime.config
        if cfg.web.enabled:  # a bad [web] stops the start before any socket opens
            from mxguard.web.server import check_config

            problem = check_config(cfg)
            if problem is not None:
                raise StartupError(problem)
        self.runtime.services = await open_services(cfg)
        self.runtime.services["metrics"].attach(self)  # snapshot file every few seconds
        self.policy = PolicyServer(cfg.policy, PolicyDoor(self))
        await self.policy.start()
        if cfg.milter.enabled:
            await self.start_milter(cfg)
        if cfg.web.enabled:
            await self.start_web(cfg)
        loop = asyncio.get_running_loop()
        greylister = self.runtime.services.get("greylist")
        run_expiry = getattr(greylister, "run_expiry", None)
        if run_expiry is not None:
            self._tasks.append(loop.create_task(run_expiry()))
        if greylister is not None and not greylister.ready:
            self._tasks.append(loop.create_task(self._reconnect(greylister)))
        self._tasks.append(loop.create_task(self._flush_results()))
        self._tasks.append(loop.create_task(self._bayes_maintenance()))
        self._tasks.append(loop.create_task(dmarc_reports.run_forever(cfg)))
        log.info("mxguard %s started (config %s, storage %s, pid %d)", __version__,
                 cfg.source, redact(cfg.storage_url), os.getpid())

    async def _reconnect(self, greylister: Any) -> None:
        """Started without its store (Redis down): try again until it answers, even
        when no request comes; :meth:`Greylister.ensure_ready` logs the recovery."""
        from mxguard.store.base import StoreError

        while not greylister.ready:
            await asyncio.sleep(RECONNECT_INTERVAL)
            with contextlib.suppress(StoreError):
                await greylister.ensure_ready()

    async def _flush_results(self) -> None:
        """Per-message DMARC results are batched: write them out every few seconds."""
        from mxguard.checks.dmarc import RESULTS_SERVICE

        while True:
            await asyncio.sleep(5)
            store = self.runtime.services.get(RESULTS_SERVICE)
            if store is not None:
                try:
                    store.flush()
                except Exception as exc:  # a full disk must not stop the daemon
                    log_failure("dmarc-results", self.runtime.config.storage
                                .fail_open_log_interval, "dmarc results: flush failed: %s",
                                exc)

    async def _bayes_maintenance(self) -> None:
        """Token access times and expiry in small batches, never a long sweep."""
        while True:
            await asyncio.sleep(30)
            clf = self.runtime.services.get("bayes")
            if clf is not None:
                try:
                    await clf.maintenance()
                except Exception as exc:
                    log_failure("bayes-maintenance", self.runtime.config.storage
                                .fail_open_log_interval, "bayes: maintenance failed: %s", exc)

    async def start_milter(self, cfg: config.Config) -> None:
        from mxguard.server.milter import MilterServer, MilterServerSettings
        from mxguard.server.milter_door import MxguardMilter

        m = cfg.milter
        settings = MilterServerSettings(
            listen=m.listen, max_body_memory=m.max_body_memory,
            max_message_size=m.max_message_size, max_headers=m.max_headers,
            max_header_bytes=m.max_header_bytes, limit_action=m.limit_action,
            max_packet=m.max_packet, max_buffered_total=m.max_buffered_total,
            idle_timeout=m.idle_timeout, max_connections=m.max_connections,
            progress_interval=m.progress_interval, fail_action=m.fail_action,
            stage_timeout=m.stage_timeout, eom_timeout=m.eom_timeout,
            skip_large_bodies=False)  # no body replies: one round trip less per message
        self.milter = MilterServer(settings, MxguardMilter(self))
        await self.milter.start()

    async def start_web(self, cfg: config.Config) -> None:
        from mxguard.web.server import WebServer

        web_server = WebServer(self)
        try:
            await web_server.start()
        except OSError as exc:
            # The dashboard is not worth a mail outage: a port taken (by another daemon,
            # after an upgrade) leaves the doors serving, with one line saying what is off.
            log.error("dashboard: cannot listen on %s: %s; mail is served, the dashboard "
                      "and /metrics over HTTP are off until mxguard restarts",
                      cfg.web.listen, exc.strerror or exc)
            await web_server.close()
            return
        self.web = web_server

    async def reload(self) -> None:
        """Load config and lists anew; keep the old ones if anything is wrong."""
        old = self.runtime
        try:
            cfg = config.load(self.config_path) if self.config_path else config.Config()
            keys = load_keys(cfg)
            rules = None
            if cfg.milter.enabled and cfg.mode("content") is not Mode.OFF:
                rules = await asyncio.to_thread(load_content_rules, cfg)
            from mxguard.web.server import check_config

            web_problem = check_config(cfg) if cfg.web.enabled else None
            if web_problem is not None:
                raise ValueError(web_problem)
            greylister = old.services.get("greylist")
            if greylister is not None:
                greylister.reload(cfg)
        except Exception as exc:  # ConfigError, a whitelist file or a key error
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        resolver = old.resolver if cfg.dns == old.config.dns else Resolver(cfg.dns)
        for key in ("listen",):
            if getattr(cfg.policy, key) != getattr(old.config.policy, key):
                log.warning("reload: policy.%s changed; restart mxguard to apply it", key)
        if (cfg.web.enabled, cfg.web.listen) != (old.config.web.enabled, old.config.web.listen):
            log.warning("reload: web.enabled / web.listen changed; restart mxguard to apply it")
        if cfg.storage_url != old.config.storage_url:
            log.warning("reload: storage.url changed; restart mxguard to apply it")
        if self.policy is not None:
            self.policy.cfg = cfg.policy
        logs.setup(cfg.log)
        from mxguard.checks.dkim_sign import KEYTABLE_SERVICE

        services = dict(old.services)
        services[KEYTABLE_SERVICE] = keys
        if rules is not None:
            services[RULES_SERVICE] = rules
        self.runtime = Runtime(config=cfg, resolver=resolver, services=services,
                               clock=old.clock)
        log.info("reloaded configuration from %s", cfg.source)

    async def stop(self) -> None:
        logs.decisions.flush()
        grace = self.runtime.config.server.shutdown_grace
        # Both doors drain at once: the grace is one deadline, not one per door.
        closing = [door.close(grace) for door in (self.policy, self.milter) if door is not None]
        await asyncio.gather(*closing)
        if self.web is not None:
            await self.web.close()
        for task in self._tasks:
            task.cancel()
        await close_services(self.runtime.services)
        logs.decisions.flush()
        log.info("mxguard stopped")

    async def run(self) -> None:
        # Signal handlers first: a SIGHUP that arrives while the sockets open must
        # not kill the daemon (its default action); it reloads once started.
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        watchdog: list[threading.Timer] = []

        async def reload_when_started() -> None:
            await started.wait()
            await self.reload()

        def on_stop(signum: int, frame: Any) -> None:
            # A plain signal handler, not loop.add_signal_handler: it runs as soon
            # as the main thread runs Python again, even while a scan holds the
            # loop, and arms the watchdog before the loop hears of the signal.
            if not watchdog:
                watchdog.append(start_exit_watchdog(self.runtime.config.server.shutdown_grace))
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(self.stopping.set)

        previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_when_started()))
        try:
            await self.start()
            tune_gc()  # a serving process only (tests drive start() in their own process)
            started.set()
            await self.stopping.wait()
            log.info("shutting down: finishing in-flight requests")
            if not watchdog:  # stopped by other means than a signal
                watchdog.append(start_exit_watchdog(self.runtime.config.server.shutdown_grace))
            await self.stop()
        finally:
            for timer in watchdog:
                timer.cancel()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


FD_RESERVE = 256  # descriptors besides connections: listeners, stores, DNS, logs, spool files


def fd_need(cfg: config.Config) -> int:
    """Descriptors the configured connection limits can take at once."""
    milter = cfg.milter.max_connections if cfg.milter.enabled else 0
    return cfg.policy.max_connections + milter + FD_RESERVE


def raise_fd_limit(cfg: config.Config | None = None) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each Postfix smtpd process
    keeps a policy and a milter connection: thousands), and warn, with the
    numbers, when even that cannot cover ``[policy]`` + ``[milter]``
    ``max_connections``: beyond it, accept() fails and clients are dropped.
    Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = fd_need(cfg) if cfg is not None else 0
    want = hard if hard != resource.RLIM_INFINITY else max(65536, need)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s",
                        soft, want, exc)
    if cfg is not None and soft != resource.RLIM_INFINITY and soft < need:
        milter = cfg.milter.max_connections if cfg.milter.enabled else 0
        log.warning("file descriptor limit %d (hard limit %s) is below the %d that "
                    "policy.max_connections = %d and milter.max_connections = %d need "
                    "(+%d for the rest); connections beyond it are refused: raise "
                    "LimitNOFILE= / ulimit -n, or lower max_connections", soft,
                    "unlimited" if hard == resource.RLIM_INFINITY else hard, need,
                    cfg.policy.max_connections, milter, FD_RESERVE)
    return int(soft)
