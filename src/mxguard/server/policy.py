"""The asyncio server for the policy door.

One :class:`asyncio.Protocol` per Postfix connection, many requests per
connection answered in order. Bad input (see :mod:`mxguard.protocols.policy`)
is logged and closes only that connection. Idle connections are closed by a
sweeper after ``[policy] idle_timeout``; connections past ``max_connections``
are refused at once. A connection holds at most one incomplete request of
``max_request_bytes``; all together at most ``max_buffered_total`` bytes: past
it, the connection holding the most is closed (logged).
:meth:`PolicyServer.close` stops accepting, lets in-flight requests finish,
then closes what remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import typing
from collections import deque
from collections.abc import Awaitable, Callable

from mxguard import stats
from mxguard.config import PolicyConfig
from mxguard.protocols.policy import PolicyDecoder, PolicyProtocolError, PolicyRequest

log = logging.getLogger("mxguard")

Handler = Callable[[PolicyRequest], Awaitable[bytes]]
MAX_QUEUED = 64  # requests buffered per connection before we stop reading


def admit(conn: typing.Any, transport: asyncio.BaseTransport, connections: set[typing.Any],
          limit: int, door: str) -> bool:
    """The start every door's connection shares: remember the transport, the time
    and the peer's name, then join ``connections``, or, when ``limit`` are open
    already, log the refusal (naming ``<door>.max_connections``) and abort."""
    conn.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is no subclass
    conn.last = asyncio.get_running_loop().time()
    peer = transport.get_extra_info("peername")
    conn.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
    if len(connections) >= limit:
        log.warning("%s: refusing connection from %s: %d connections open "
                    "(%s.max_connections)", door, conn.peer, len(connections), door)
        stats.REFUSED[door] += 1
        conn.transport.abort()
        return False
    connections.add(conn)
    return True


async def listen(spec: str, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
    """Listen on ``"host:port"`` or ``"unix:/path"`` (a stale socket file is replaced)."""
    loop = asyncio.get_running_loop()
    if spec.startswith("unix:"):
        path = spec[5:]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await loop.create_unix_server(factory, path, backlog=1024)
        os.chmod(path, 0o666)  # Postfix's smtpd (user postfix) must connect
        return server
    host, _, port = spec.rpartition(":")
    return await loop.create_server(factory, host.strip("[]"), int(port), backlog=1024,
                                    reuse_address=True)


class _Connection(asyncio.Protocol):
    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        cfg = server.cfg
        self.decoder = PolicyDecoder(cfg.max_request_bytes, cfg.max_attributes)
        self.queue: deque[PolicyRequest] = deque()
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.last = 0.0
        self.counted = 0  # our share of server.buffered_total
        self.eof = False  # the client half-closed: answer what it sent, then close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        admit(self, transport, self.server.connections, self.server.cfg.max_connections,
              "policy")

    def data_received(self, data: bytes) -> None:
        self.last = self.server.loop.time()
        try:
            requests = self.decoder.feed(data)
        except PolicyProtocolError as exc:
            log.warning("policy: bad request from %s: %s; closing connection", self.peer, exc)
            self.server.stats["protocol_errors"] += 1
            self.close()
            return
        self.account()
        for req in requests:
            if req.unknown:
                self.server.note_unknown(req.unknown)
            self.queue.append(req)
        if len(self.queue) > MAX_QUEUED and self.transport is not None:
            self.transport.pause_reading()
        if self.queue and not self.busy:
            self.busy = True
            self.server.loop.create_task(self._work())

    def eof_received(self) -> bool:
        """A client that half-closes after its request still gets the reply: keep
        the sending side open while requests are pending; :meth:`_work` closes."""
        self.eof = True
        return self.busy or bool(self.queue)

    async def _work(self) -> None:
        try:
            while self.queue:
                req = self.queue.popleft()
                reply = await self.server.handler(req)
                self.server.stats["requests"] += 1
                if self.transport is None or self.transport.is_closing():
                    return
                self.transport.write(reply)
                if len(self.queue) <= MAX_QUEUED // 2:
                    self.transport.resume_reading()
        finally:
            self.busy = False
            self.last = self.server.loop.time()
            if self.eof or (self.server.closing and not self.decoder.pending):
                self.close()

    def account(self) -> None:
        """Update our share of the buffered bytes of all connections; past
        ``max_buffered_total``, the server closes whoever holds the most."""
        held = self.decoder.buffered if self.transport is not None else 0
        self.server.buffered_total += held - self.counted
        self.counted = held
        if held and self.server.buffered_total > self.server.cfg.max_buffered_total:
            self.server.shed()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.decoder.pending and self.counted:
            log.warning("policy: %s disconnected in the middle of a request", self.peer)
        self.server.buffered_total -= self.counted
        self.counted = 0
        self.server.connections.discard(self)
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue


class PolicyServer:
    def __init__(self, cfg: PolicyConfig, handler: Handler) -> None:
        self.cfg = cfg
        self.handler = handler
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closing = False
        self.stats = {"requests": 0, "protocol_errors": 0, "shed": 0}
        self.buffered_total = 0  # incomplete requests, all connections
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._unknown_seen: set[str] = set()

    async def start(self) -> None:
        self._server = await listen(self.cfg.listen, lambda: _Connection(self))
        self._sweeper = self.loop.create_task(self._sweep())
        log.info("policy: listening on %s", self.cfg.listen)

    def note_unknown(self, names: tuple[str, ...]) -> None:
        """Postfix may add attributes in later versions: log each new name once."""
        for name in names:
            if name not in self._unknown_seen and len(self._unknown_seen) < 1000:
                self._unknown_seen.add(name)
                log.info("policy: ignoring unknown attribute %r", name)

    def shed(self) -> None:
        """Close connections, those holding the most first, until the incomplete
        requests of all fit in ``max_buffered_total`` again."""
        limit = self.cfg.max_buffered_total
        for conn in sorted(self.connections, key=lambda c: c.counted, reverse=True):
            if self.buffered_total <= limit or not conn.counted:
                return
            log.warning("policy: closing %s: it holds %d bytes of an incomplete request, all "
                        "connections %d (policy.max_buffered_total %d)", conn.peer,
                        conn.counted, self.buffered_total, limit)
            self.stats["shed"] += 1
            self.buffered_total -= conn.counted
            conn.counted = 0
            if conn.transport is not None:
                conn.transport.abort()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.idle_timeout / 2))
            limit = self.loop.time() - self.cfg.idle_timeout
            for conn in [c for c in self.connections if c.idle and c.last < limit]:
                if conn.decoder.pending:
                    log.warning("policy: %s sent half a request and went idle; closing",
                                conn.peer)
                conn.close()

    async def close(self, grace: float) -> None:
        """Stop accepting, finish in-flight requests (up to ``grace`` s), close all."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        deadline = self.loop.time() + grace
        while any(not c.idle for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
