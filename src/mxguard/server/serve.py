"""``mxguard serve``: one process, or a master forking workers that share the
listening sockets (``[server] workers``), on uvloop when installed."""

from __future__ import annotations

import asyncio

from mxguard import config, logs
from mxguard.server import workers
from mxguard.server.daemon import Daemon, force_exit, raise_fd_limit


def serve(cfg: config.Config, config_path: str | None) -> int:
    logs.setup(cfg.log)
    raise_fd_limit(cfg)
    count = workers.worker_count(cfg.server.workers)
    if count > 1:  # a master binding the sockets and forking the workers
        return workers.serve(cfg, config_path, count)
    daemon_coro = run(cfg, config_path)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(daemon_coro)
    else:
        uvloop.run(daemon_coro)
    from mxguard.core.runtime import WORKERS

    if WORKERS.busy:  # a scan still runs in a worker: do not tear the interpreter down under it
        force_exit("shutdown done, a content scan still running in a worker thread", 0)
    return 0


async def run(cfg: config.Config, config_path: str | None) -> None:
    daemon = Daemon(cfg, config_path)
    await daemon.run()


__all__ = ["run", "serve"]
