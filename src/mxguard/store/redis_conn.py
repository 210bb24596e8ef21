"""What every Redis store shares: storage URLs, clients and the bounded connection.

URLs (``[storage] url``): ``redis://[[user]:password@]host:port/db``,
``rediss://…`` (TLS; ``?ssl_ca_certs=/path`` and the other ``ssl_*`` query
options of redis-py apply) or ``redis+sentinel://[[user]:password@]host:port
[,host:port…]/mastername[/db]`` (the master is found through Sentinel and
followed on failover). :func:`redis_client` / :func:`sync_redis_client` make
the asyncio / blocking client of one; :func:`describe_url` names it in messages
without the password.

**Faults.** Each Redis command is bounded by ``timeout`` (``[storage]
redis_timeout``); any failure raises :class:`StoreError` at once. Nothing is
queued while Redis is away: a write either happens or fails. After a
connection failure, calls fail immediately for :data:`RETRY_AFTER` seconds
(no request waits a full timeout on a dead host), then the next call tries
again; the connection pool reconnects by itself. ``errors`` counts failed
operations, ``outages`` the transitions from working to failing.

**Speed.** The per-request commands of concurrent requests go to Redis as one
pipeline per event-loop iteration (see :class:`RedisConnection`); Lua scripts
run by SHA (``EVALSHA``) and are loaded again after ``NOSCRIPT`` (e.g. once
Redis was restarted empty).

Used by :mod:`mxguard.store.redis` (greylist), :mod:`mxguard.store.redis_bayes`
and :mod:`mxguard.store.redis_results`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from mxguard.redact import redact
from mxguard.store.base import StoreError

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import (
        BusyLoadingError,
        NoScriptError,
        ReadOnlyError,
        RedisError,
        ResponseError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # pragma: no cover - redis is a dependency of the Redis store only
    aioredis = None  # type: ignore[assignment]

T = TypeVar("T")

RETRY_AFTER = 1.0  # seconds calls fail at once after a connection failure
SCAN_COUNT = 500  # keys per SCAN step
MAX_CONNECTIONS = 64


# --------------------------------------------------------------- URLs and clients


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]
    master: str
    db: int
    username: str | None
    password: str | None
    options: dict[str, str]


def parse_sentinel_url(url: str) -> SentinelUrl:
    """``redis+sentinel://[[user]:pass@]h1:p1[,h2:p2…]/mastername[/db][?opts]``."""
    rest = url[len("redis+sentinel://"):]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, sep, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    sentinels: list[tuple[str, int]] = []
    for item in filter(None, netloc.split(",")):
        host, port = _hostport(item, 26379, url)
        sentinels.append((host, port))
    parts = [p for p in path.split("/") if p]
    if not sentinels or not parts or len(parts) > 2:
        raise StoreError(f"storage.url {redact(url)!r}: expected "
                         "redis+sentinel://host:port[,host:port]/mastername[/db]")
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise StoreError(f"storage.url {redact(url)!r}: db {parts[1]!r} is not a number") \
            from None
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    return SentinelUrl(sentinels, unquote(parts[0]), db, username, password, options)


def _hostport(item: str, default: int, url: str) -> tuple[str, int]:
    if item.startswith("["):
        host, _, port = item[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    try:
        return host, int(port) if port else default
    except ValueError:
        raise StoreError(f"storage.url {redact(url)!r}: bad port in {item!r}") from None


def describe_url(url: str) -> str:
    """``host:port/db`` (or the sentinel's master name) of a Redis URL, for messages."""
    if url.startswith("redis+sentinel://"):
        s = parse_sentinel_url(url)
        return f"sentinel {s.master}/{s.db}"
    parts = urlsplit(url)
    db = parts.path.strip("/") or "0"
    return f"{parts.hostname}:{parts.port or 6379}/{db}"


def redis_client(url: str, timeout: float) -> Any:
    """An asyncio Redis client for a storage URL.

    Reads carry no socket timeout of their own: :class:`RedisConnection` bounds
    each whole command (pool, connect, retry, reply) with one ``asyncio.timeout``,
    and a command cut short closes its connection (redis-py does that on
    cancellation), so no late reply is read by the next command. Connects are
    bounded by ``timeout`` too.
    """
    if aioredis is None:  # pragma: no cover
        raise StoreError("storage.url: a Redis URL needs the 'redis' Python package")
    common: dict[str, Any] = {
        "socket_timeout": None, "socket_connect_timeout": timeout,
        # one immediate retry on a broken connection: a pooled connection to a
        # Redis that restarted fails once, the retry reconnects
        "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),
    }
    try:
        if url.startswith("redis+sentinel://"):
            from redis.asyncio.sentinel import Sentinel

            s = parse_sentinel_url(url)
            sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout,
                                               "socket_connect_timeout": timeout}
            if "sentinel_password" in s.options:
                sentinel_kwargs["password"] = s.options["sentinel_password"]
            make_sentinel: Any = Sentinel  # typed in some redis-py releases, not in others
            sentinel = make_sentinel(s.sentinels, sentinel_kwargs=sentinel_kwargs)
            return sentinel.master_for(s.master, db=s.db, username=s.username,
                                       password=s.password, **common)
        pool = aioredis.ConnectionPool.from_url(url, **common)
        return aioredis.Redis(connection_pool=pool)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"storage.url {redact(url)!r}: {exc}") from None


def sync_redis_client(url: str, timeout: float) -> Any:
    """A blocking redis-py client for a storage URL (CLI work, the results writer thread)."""
    import redis as syncredis
    from redis.retry import Retry as SyncRetry

    common: dict[str, Any] = {
        "socket_timeout": timeout, "socket_connect_timeout": timeout,
        "retry": SyncRetry(NoBackoff(), 1, (RedisConnectionError,)),
    }
    try:
        if url.startswith("redis+sentinel://"):
            from redis.sentinel import Sentinel

            s = parse_sentinel_url(url)
            sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout,
                                               "socket_connect_timeout": timeout}
            if "sentinel_password" in s.options:
                sentinel_kwargs["password"] = s.options["sentinel_password"]
            make_sync_sentinel: Any = Sentinel  # as above
            sentinel: Any = make_sync_sentinel(s.sentinels, sentinel_kwargs=sentinel_kwargs)
            return sentinel.master_for(s.master, db=s.db, username=s.username,
                                       password=s.password, **common)
        return syncredis.Redis.from_url(url, **common)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"storage.url {redact(url)!r}: {exc}") from None


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# --------------------------------------------------------------- connection wrapper


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


_OUTAGE: tuple[type[BaseException], ...] = ()
if aioredis is not None:
    _OUTAGE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError,
               BusyLoadingError, ReadOnlyError)


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script run by its SHA1 (``EVALSHA``), loaded again after ``NOSCRIPT``."""

    lua: str
    sha: str

    @classmethod
    def of(cls, lua: str) -> Script:
        return cls(lua, hashlib.sha1(lua.encode()).hexdigest())


@dataclass(slots=True)
class _Queued:
    args: tuple[Any, ...]
    script: Script | None
    future: asyncio.Future[Any]


class RedisConnection:
    """A Redis client whose every command is bounded, counted and turned into StoreError.

    One per store object (greylist, Bayes).

    **Pipelining.** :meth:`command` / :meth:`evalsha` (the per-request calls)
    queue the command; all commands queued during one event-loop iteration go to
    Redis as one pipeline (one write, one read), like the SQLite store's group
    commit. Under load that cuts the per-command cost of the client library and
    the system calls several-fold; a lone request waits one loop iteration
    (microseconds). Each pipeline is bounded by ``timeout`` as a whole; when it
    fails, each of its commands fails with a :class:`StoreError` of its own.
    """

    def __init__(self, url: str, *, timeout: float = 1.0,
                 max_connections: int = MAX_CONNECTIONS,
                 client: Any = None) -> None:
        self.url = url
        self.where = f"redis {describe_url(url)}"
        self.timeout = timeout
        # typed Any: redis-py's overloaded command signatures add nothing here
        self.client: Any = client if client is not None else redis_client(url, timeout)
        # at most this many commands in flight (so as many connections): the rest wait
        # for a turn, within their timeout
        self._slots = asyncio.Semaphore(max_connections)
        self.errors = 0  # operations that failed
        self.outages = 0  # transitions from working to failing
        self.calls = 0
        self.pipelines = 0  # pipelines sent (commands / pipelines = batching achieved)
        self._down_until = 0.0
        self._down_reason = ""
        self._failing = False
        self._closed = False
        self._queue: list[_Queued] = []
        self._sending: set[asyncio.Task[None]] = set()

    def script(self, lua: str) -> Script:
        return Script.of(lua)

    def _refuse(self) -> None:
        if self._closed:
            raise StoreError(f"{self.where}: store is closed")
        if self._down_until and time.monotonic() < self._down_until:
            self.errors += 1
            raise StoreError(f"{self.where}: unavailable ({self._down_reason}); "
                             f"retrying within {RETRY_AFTER:g}s")

    def _outage(self, exc: BaseException) -> str:
        self._down_reason = _describe(exc)
        self._down_until = time.monotonic() + RETRY_AFTER
        if not self._failing:
            self._failing = True
            self.outages += 1
        return self._down_reason

    def _working(self) -> None:
        self._down_until = 0.0
        self._failing = False

    # ------------------------------------------------------------ pipelined commands

    async def command(self, doing: str, *args: Any) -> Any:
        """Run one Redis command in this loop iteration's pipeline; its reply."""
        return await self._queued(doing, args, None)

    async def evalsha(self, doing: str, script: Script, keys: list[Any],
                      args: list[Any]) -> Any:
        """Run a Lua script (by SHA) in this loop iteration's pipeline; its reply."""
        return await self._queued(doing, ("EVALSHA", script.sha, len(keys), *keys, *args),
                                  script)

    async def _queued(self, doing: str, args: tuple[Any, ...], script: Script | None) -> Any:
        self._refuse()
        loop = asyncio.get_running_loop()
        item = _Queued(args, script, loop.create_future())
        self._queue.append(item)
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        self.calls += 1
        try:
            # shielded: a cancelled request must not cancel the others' pipeline
            return await asyncio.shield(item.future)
        except _BatchFailed as failed:
            self.errors += 1
            raise StoreError(f"{self.where}: {doing} failed: {failed.reason}") from None

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Queued]) -> None:
        """Send one pipeline and settle every future of it, whatever happens."""
        try:
            async with asyncio.timeout(self.timeout), self._slots:
                replies = await self._pipeline([q.args for q in batch])
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if missing:  # Redis lost its script cache (restarted): load, run those again
                    scripts = {batch[i].script for i in missing} - {None}
                    await self._pipeline([("SCRIPT", "LOAD", sc.lua) for sc in scripts
                                          if sc is not None])
                    again = await self._pipeline([batch[i].args for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except _OUTAGE as exc:
            reason = self._outage(exc)
            for q in batch:
                _settle(q.future, error=_BatchFailed(reason))
            return
        except (RedisError, asyncio.CancelledError) as exc:
            for q in batch:
                _settle(q.future, error=_BatchFailed(_describe(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.pipelines += 1
        self._working()
        for q, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                _settle(q.future, error=_BatchFailed(_describe(reply)))
            else:
                _settle(q.future, value=reply)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if len(commands) == 1:  # a lone command: the plain call costs less than a pipeline
            try:
                return [await self.client.execute_command(*commands[0])]
            except ResponseError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    # ------------------------------------------------------------ direct commands

    async def run(self, doing: str, make: Callable[[], Awaitable[T]]) -> T:
        """Run one client call (``make()`` builds its awaitable) within the timeout,
        outside the shared pipeline (scans, bulk writes)."""
        self._refuse()
        self.calls += 1
        try:
            async with asyncio.timeout(self.timeout), self._slots:
                result = await make()
        except _OUTAGE as exc:
            self.errors += 1
            reason = self._outage(exc)
            raise StoreError(f"{self.where}: {doing} failed: {reason}") from None
        except RedisError as exc:
            self.errors += 1
            raise StoreError(f"{self.where}: {doing} failed: {_describe(exc)}") from None
        self._working()
        return result

    @property
    def available(self) -> bool:
        """False while the last command failed for lack of Redis."""
        return not self._failing

    async def scan(self, match: str, count: int = SCAN_COUNT) -> AsyncIterator[list[bytes]]:
        """Batches of keys matching ``match`` (one SCAN step each, each step bounded)."""
        cursor = 0
        while True:
            cursor, keys = await self.run(
                "scan", functools.partial(self.client.scan, cursor, match=match, count=count))
            if keys:
                yield list(keys)
            if cursor == 0:
                return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flush()
        if self._sending:
            await asyncio.wait(list(self._sending), timeout=self.timeout)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.client.aclose(), self.timeout)


class _BatchFailed(Exception):
    """Carried by a queued command's future: why its pipeline (or it) failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _settle(fut: asyncio.Future[Any], value: Any = None,
            error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(value)
    else:
        fut.set_exception(error)
        fut.exception()  # retrieved: a future whose waiter was cancelled logs nothing


__all__ = ["MAX_CONNECTIONS", "RETRY_AFTER", "SCAN_COUNT", "RedisConnection", "Script",
           "SentinelUrl", "describe_url", "glob_escape", "parse_sentinel_url",
           "redis_client", "sync_redis_client"]
