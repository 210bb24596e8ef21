"""The dashboard's listener, started and stopped with the daemon.

It listens through :func:`mxguard.server.policy.listen`, like the doors, so
with ``[server] workers = N`` every worker serves the socket the master bound
(:func:`mxguard.server.workers.use_inherited`); pages read shared state from
the store, so any worker answers. The session key comes from a secret in the
greylist store, so a session issued by one worker is valid in all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from typing import Any

from aiohttp import web

from mxguard import config
from mxguard.core.runtime import HasRuntime
from mxguard.web.app import WebState, make_app
from mxguard.web.auth import HashFormatError, parse_hash

log = logging.getLogger("mxguard")

SESSION_SECRET = "web_session_key"
CLOSE_TIMEOUT = 2.0


def check_config(cfg: config.Config) -> str | None:
    """What is wrong with ``[web]`` for serving it (one line), or None."""
    w = cfg.web
    if w.password_hash:
        try:
            parse_hash(w.password_hash)
        except HashFormatError as exc:
            return f"{cfg.source}: [web] password_hash: {exc}"
    for net in w.metrics_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            return f"{cfg.source}: [web] metrics_networks: {net!r} is not a CIDR network"
    return None


async def store_secret(services: dict[str, Any]) -> bytes:
    """The shared session secret (greylist store); a per-process one without it."""
    g = services.get("greylist")
    store = getattr(g, "store", None)
    if store is not None:
        try:
            return bytes(await store.secret(SESSION_SECRET))
        except Exception as exc:
            log.warning("web: store unavailable for the session key (%s): sessions are "
                        "valid in this process only until restart", exc)
    return secrets.token_bytes(32)


class WebServer:
    def __init__(self, daemon: HasRuntime) -> None:
        self.daemon = daemon
        self.runner: web.AppRunner | None = None
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        from mxguard.server import policy as policy_server

        rt = self.daemon.runtime
        state = WebState(await store_secret(rt.services), clock=lambda: self.daemon.runtime
                         .clock())
        app = make_app(lambda: self.daemon.runtime, state)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        # the module attribute, looked up now: workers replace it by the inherited socket
        self.server = await policy_server.listen(rt.config.web.listen,
                                                 self.runner.server)  # type: ignore[arg-type]
        log.info("dashboard on http://%s/ (%s)", rt.config.web.listen,
                 "login required" if rt.config.web.password_hash else
                 "read-only, loopback clients only: no [web] password_hash")

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), CLOSE_TIMEOUT)
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.runner.cleanup(), CLOSE_TIMEOUT)


__all__ = ["WebServer", "check_config", "store_secret"]
