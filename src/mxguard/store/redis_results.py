"""Per-message DMARC results in Redis, shared by every MX host of a fleet.

The same :class:`~mxguard.store.results.ResultsStore` interface as the SQLite
store, aggregated at write time -- what an aggregate report needs, and memory
bounded by distinct groups per day, not by messages:

    mxguard:dmarc:days                   sorted set of days (score: the day's start)
    mxguard:dmarc:dom:<day>              set of policy domains with results that day
    mxguard:dmarc:n:<day>:<domain>       hash group -> message count
    mxguard:dmarc:lo:<day>:<domain>      hash group -> first ts
    mxguard:dmarc:hi:<day>:<domain>      hash group -> last ts

A *group* is the JSON of every field but ``ts`` and ``count`` (what the SQLite
store groups by). One Lua script adds a row (count, first/last time, indexes)
atomically, so hosts writing the same group at once are all counted.

:meth:`add` only appends to a list; rows are written in one pipelined round
trip when ``max_pending`` wait or the oldest has waited ``max_delay`` seconds,
and on :meth:`flush`. Inside the daemon's event loop the write runs in the
store's own thread (never blocking the loop while Redis is slow or away), at
most ``max_in_flight`` batches at a time: further batches are dropped and
counted in ``lost`` (logged once per ``log_interval``) -- never an unbounded
queue. Outside a loop (CLI, tests) every call is synchronous. :meth:`purge`
drops a group once its *last* message is older than the cutoff.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from mxguard.store.base import StoreError
from mxguard.store.redis_conn import describe_url, sync_redis_client
from mxguard.store.results import DAY, ResultRecord, ResultsStore

log = logging.getLogger("mxguard")

_GROUP = tuple(f.name for f in dataclasses.fields(ResultRecord) if f.name not in ("ts", "count"))

# KEYS: n, lo, hi, dom, days; ARGV: group, ts, count, domain, day, day score
LUA_ADD = """
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[3])
local lo = redis.call('HGET', KEYS[2], ARGV[1])
if not lo or tonumber(ARGV[2]) < tonumber(lo) then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
local hi = redis.call('HGET', KEYS[3], ARGV[1])
if not hi or tonumber(ARGV[2]) > tonumber(hi) then redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) end
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
return 1
"""

# KEYS: n, lo, hi, dom, days; ARGV: cutoff, domain, day. Returns messages removed.
LUA_PURGE = """
local removed = 0
local hi = redis.call('HGETALL', KEYS[3])
for i = 1, #hi, 2 do
  if tonumber(hi[i + 1]) < tonumber(ARGV[1]) then
    removed = removed + tonumber(redis.call('HGET', KEYS[1], hi[i]) or '0')
    redis.call('HDEL', KEYS[1], hi[i])
    redis.call('HDEL', KEYS[2], hi[i])
    redis.call('HDEL', KEYS[3], hi[i])
  end
end
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('SREM', KEYS[4], ARGV[2])
end
if redis.call('SCARD', KEYS[4]) == 0 then redis.call('ZREM', KEYS[5], ARGV[3]) end
return removed
"""


def _group(rec: ResultRecord) -> str:
    values: dict[str, Any] = {}
    for name in _GROUP:
        value = getattr(rec, name)
        if name == "dkim":
            value = sorted(list(d) for d in value)
        elif name == "rua":
            value = list(value)
        values[name] = value
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def _record(group: bytes, ts: float, count: int) -> ResultRecord:
    values = json.loads(group)
    values["dkim"] = tuple(tuple(d) for d in values["dkim"])
    values["rua"] = tuple(values["rua"])
    return ResultRecord(ts=ts, count=count, **values)


def _day_start(day: str) -> float:
    return dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()


def _day_text(day: str | dt.date) -> str:
    return day.isoformat() if isinstance(day, dt.date) else dt.date.fromisoformat(day).isoformat()


class RedisResultsStore(ResultsStore):
    """DMARC results in Redis (``url``: a storage URL, see :mod:`mxguard.store.redis_conn`)."""

    def __init__(self, url: str, *, timeout: float = 1.0, prefix: str = "mxguard:",
                 max_pending: int = 100, max_delay: float = 5.0, max_in_flight: int = 4,
                 log_interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.where = f"redis {describe_url(url)}"
        self.timeout = timeout
        self.max_pending = max_pending
        self.max_delay = max_delay
        self.max_in_flight = max_in_flight
        self.log_interval = log_interval
        self.commits = 0  # batches written
        self.lost = 0  # rows dropped: Redis failed or too many batches in flight
        self.errors = 0
        self._p = f"{prefix}dmarc:"
        self._clock = clock
        self._pending: list[ResultRecord] = []
        self._since = 0.0
        self._client: Any = sync_redis_client(url, timeout)
        self._add = self._client.register_script(LUA_ADD)
        self._purge = self._client.register_script(LUA_PURGE)
        self._lock = threading.Lock()
        self._in_flight: list[concurrent.futures.Future[int]] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._logged = -math.inf
        self._closed = False

    # ------------------------------------------------------------ plumbing

    def _keys(self, day: str, domain: str) -> list[str]:
        return [f"{self._p}n:{day}:{domain}", f"{self._p}lo:{day}:{domain}",
                f"{self._p}hi:{day}:{domain}", f"{self._p}dom:{day}", f"{self._p}days"]

    def _call(self, doing: str, fn: Callable[[], Any]) -> Any:
        if self._closed:
            raise StoreError(f"{self.where}: results store is closed")
        try:
            return fn()
        except (RedisError, OSError) as exc:
            self.errors += 1
            raise StoreError(f"{self.where}: {doing} failed: {exc or type(exc).__name__}") \
                from None

    def _write(self, rows: list[ResultRecord]) -> int:
        def go() -> Any:
            pipe = self._client.pipeline(transaction=False)
            for rec in rows:
                day = rec.day
                self._add(keys=self._keys(day, rec.policy_domain),
                          args=[_group(rec), repr(float(rec.ts)), rec.count,
                                rec.policy_domain, day, _day_start(day)], client=pipe)
            return pipe.execute()

        try:
            self._call(f"writing {len(rows)} DMARC results", go)
        except StoreError:
            self.lost += len(rows)
            raise
        self.commits += 1
        return len(rows)

    def _write_in_thread(self, rows: list[ResultRecord]) -> int:
        try:
            return self._write(rows)
        except StoreError as exc:
            self._log_loss(str(exc))
            return 0

    def _log_loss(self, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._logged < self.log_interval:
                return
            self._logged = now
        log.warning("dmarc results: %s (%d rows lost so far; logged once per %gs)", why,
                    self.lost, self.log_interval)

    def _drain(self) -> None:
        """Wait for batches written in the thread (bounded by the timeout each)."""
        with self._lock:
            pending = list(self._in_flight)
        for fut in pending:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                fut.result(timeout=self.timeout * 3 + 1)

    def _flush_sync(self) -> None:
        rows, self._pending = self._pending, []
        self._drain()
        if rows:
            self._write(rows)

    # ------------------------------------------------------------ interface

    def add(self, record: ResultRecord) -> None:
        if self._closed:
            raise StoreError(f"{self.where}: results store is closed")
        if not self._pending:
            self._since = self._clock()
        self._pending.append(record)
        if len(self._pending) >= self.max_pending or \
                self._clock() - self._since >= self.max_delay:
            self.flush()

    def flush(self) -> int:
        rows, self._pending = self._pending, []
        if not rows:
            return 0
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._write(rows)  # no event loop: the caller may block
        with self._lock:
            self._in_flight = [f for f in self._in_flight if not f.done()]
            busy = len(self._in_flight) >= self.max_in_flight
        if busy:
            self.lost += len(rows)
            self._log_loss(f"{self.max_in_flight} batches still being written "
                           f"({self.where} slow or away): {len(rows)} rows dropped")
            return 0
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="mxguard-dmarc-redis")
        fut = self._executor.submit(self._write_in_thread, rows)
        with self._lock:
            self._in_flight.append(fut)
        return len(rows)

    def days(self) -> list[str]:
        """Every day with results, oldest first."""
        self._flush_sync()
        raw = self._call("read", lambda: self._client.zrange(f"{self._p}days", 0, -1))
        return [d.decode() for d in raw]

    def domains(self, day: str | dt.date) -> list[str]:
        self._flush_sync()
        day = _day_text(day)
        raw = self._call("read", lambda: self._client.smembers(f"{self._p}dom:{day}"))
        return sorted(d.decode() for d in raw)

    def query(self, day: str | dt.date, domain: str | None = None) -> list[ResultRecord]:
        day = _day_text(day)
        doms = [domain.lower().rstrip(".")] if domain is not None else self.domains(day)
        if domain is not None:
            self._flush_sync()

        def go() -> Any:
            pipe = self._client.pipeline(transaction=False)
            for d in doms:
                keys = self._keys(day, d)
                pipe.hgetall(keys[0])
                pipe.hgetall(keys[1])
            return pipe.execute()

        raw = self._call("read", go)
        out: list[tuple[float, bytes, ResultRecord]] = []
        for counts, firsts in zip(raw[::2], raw[1::2], strict=True):
            for group, n in counts.items():
                ts = float(firsts.get(group, b"0"))
                out.append((ts, group, _record(group, ts, int(n))))
        out.sort(key=lambda item: item[:2])
        return [rec for _, _, rec in out]

    def purge(self, older_than_days: float, now: float | None = None) -> int:
        self._flush_sync()
        cutoff = (time.time() if now is None else now) - older_than_days * DAY
        days = self._call("read", lambda: self._client.zrangebyscore(
            f"{self._p}days", "-inf", f"({cutoff!r}"))
        removed = 0
        for raw_day in days:
            day = raw_day.decode()
            for dom in self.domains(day):
                step = functools.partial(self._purge, keys=self._keys(day, dom),
                                         args=[repr(cutoff), dom, day])
                removed += int(self._call("purge", step))
        return removed

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._flush_sync()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            with contextlib.suppress(RedisError, OSError):
                self._client.close()


__all__ = ["RedisResultsStore"]
