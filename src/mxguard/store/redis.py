"""Redis greylist store: one greylist for several MX hosts.

Chosen by ``[storage] url`` = ``redis://…``, ``rediss://…`` (TLS) or
``redis+sentinel://…`` (see :mod:`mxguard.store.redis_conn` for their forms).

Keys (``prefix`` defaults to ``mxguard:``)::

    mxguard:gl:t:<triplet key>   hash f=first_seen l=last_seen p=passed_at e=expires
    mxguard:gl:c:<client key>    hash n=count f=first_seen lc=last_counted l=last_seen e=expires
    mxguard:gl:wl                hash entry -> JSON [kind, added, comment]
    mxguard:gl:wlv               integer, bumped on every whitelist change
    mxguard:gl:m:<name>          secrets (the privacy key)

**Expiry.** Every write sets the record's Redis TTL to ``expires - now`` (the
caller's own clock, so clock skew between MX hosts and the Redis host does not
matter) plus :data:`TTL_GRACE`; Redis deletes the record itself. The exact
``expires`` is kept in the record, so :meth:`expire_batch` still honours the
caller's ``now`` (bounded SCAN batches, resumed where the last call stopped).

**Atomicity.** Every read-modify-write is one Lua script (``EVALSHA``; the
script is loaded again after ``NOSCRIPT``, e.g. once Redis was restarted
empty), so two hosts deciding on one triplet at once agree:

* ``FIRST_SEEN`` replaces the record, except a pending record first seen less
  than :data:`FIRST_SEEN_RACE` seconds ago: then a concurrent first sight by
  another host already wrote it, and its first-seen time is kept (NX-like).
* ``MARK_PASSED`` sets ``passed_at`` only when it is 0: True for exactly one
  caller.
* ``COUNT_CLIENT`` counts a delivery at most once per interval.
* ``TOUCH`` updates an existing record and never creates a partial one.
* whitelist add/remove bump the version in the same script.

**Faults and speed.** :class:`~mxguard.store.redis_conn.RedisConnection` bounds
every command by ``[storage] redis_timeout``, turns any failure into
:class:`StoreError`, fails at once for a moment after a connection failure,
and pipelines the per-request commands of concurrent requests; a request
costs one round trip per store call (lookup; plus one write when it changes
something). bench/storage_bench.py measures it against SQLite.

Not supported: Redis Cluster (the scripts touch a triplet and its client key
together); use one master, with replicas and Sentinel for failover.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from mxguard.store.base import (
    ClientRecord,
    GreylistStore,
    StoreError,
    StoreStats,
    TripletRecord,
    WhitelistEntry,
)
from mxguard.store.redis_conn import (
    MAX_CONNECTIONS,
    SCAN_COUNT,
    RedisConnection,
    Script,
    glob_escape,
)

TTL_GRACE = 60.0  # seconds a record lives in Redis beyond its own `expires`
FIRST_SEEN_RACE = 60.0  # a pending record this fresh was written by a concurrent first sight
EXPIRE_SCAN_STEPS = 20  # SCAN steps one expire_batch call may take
SECRET_CHECK = 10.0  # seconds between re-assertions of cached secrets (Redis restarted empty)

# --------------------------------------------------------------- Lua scripts

# Both records as one bulk string "f l p e|n f lc l e" ("" for a missing record):
# one reply line to parse instead of eleven.
LUA_LOOKUP = """
local function pack(values)
  if not values[1] then return '' end
  for i, v in ipairs(values) do if not v then values[i] = '0' end end
  return table.concat(values, ' ')
end
return pack(redis.call('HMGET', KEYS[1], 'f', 'l', 'p', 'e')) .. '|' ..
       pack(redis.call('HMGET', KEYS[2], 'n', 'f', 'lc', 'l', 'e'))
"""

# ARGV: now, expires, ttl_ms, race window
LUA_FIRST_SEEN = """
local old = redis.call('HMGET', KEYS[1], 'f', 'p')
if old[1] and tonumber(old[2]) == 0 and
   math.abs(tonumber(ARGV[1]) - tonumber(old[1])) < tonumber(ARGV[4]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'f', ARGV[1], 'l', ARGV[1], 'p', '0', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# ARGV: now, expires, ttl_ms
LUA_MARK_PASSED = """
local p = redis.call('HGET', KEYS[1], 'p')
if not p or tonumber(p) ~= 0 then return 0 end
redis.call('HSET', KEYS[1], 'p', ARGV[1], 'l', ARGV[1], 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# ARGV: now, expires, ttl_ms
LUA_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'l', ARGV[1], 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# ARGV: now, expires, interval, ttl_ms
LUA_COUNT_CLIENT = """
local lc = redis.call('HGET', KEYS[1], 'lc')
if not lc then
  redis.call('HSET', KEYS[1], 'n', 1, 'f', ARGV[1], 'lc', ARGV[1], 'l', ARGV[1], 'e', ARGV[2])
elseif tonumber(ARGV[1]) - tonumber(lc) >= tonumber(ARGV[3]) then
  redis.call('HINCRBY', KEYS[1], 'n', 1)
  redis.call('HSET', KEYS[1], 'lc', ARGV[1], 'l', ARGV[1], 'e', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'l', ARGV[1], 'e', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: whitelist hash, version; ARGV: entry, value, random base. A version counter
# created anew (Redis restarted empty) starts at a random base, so a daemon that cached
# a version from before never mistakes the new whitelist for the one it has.
LUA_WL_ADD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'NX')
redis.call('INCR', KEYS[2])
return 1
"""

LUA_WL_REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'NX')
redis.call('INCR', KEYS[2])
return 1
"""

# KEYS: candidates of one SCAN step; ARGV: now, most to delete.
# Returns {deleted, keys examined}: fewer examined than given means "stopped at the cap".
LUA_EXPIRE = """
local n = 0
local cap = tonumber(ARGV[2])
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if n >= cap then return {n, i - 1} end
  local e = redis.call('HGET', key, 'e')
  if e and tonumber(e) < now then
    redis.call('DEL', key)
    n = n + 1
  end
end
return {n, #KEYS}
"""

# KEYS: candidates; ARGV: older_than ('' = all)
LUA_PURGE = """
local n = 0
for _, key in ipairs(KEYS) do
  if ARGV[1] == '' then
    n = n + redis.call('DEL', key)
  else
    local l = redis.call('HGET', key, 'l')
    if l and tonumber(l) < tonumber(ARGV[1]) then n = n + redis.call('DEL', key) end
  end
end
return n
"""

# KEYS: meta keys; ARGV: their values. SET NX each (re-creates secrets after an empty restart).
LUA_SECRETS = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[i], 'NX') then n = n + 1 end
end
return n
"""


# --------------------------------------------------------------- the store


def _f(value: bytes | None) -> float:
    return float(value) if value is not None else 0.0


def _ms(now: float, expires: float) -> int:
    """Redis TTL in ms for a record expiring at ``expires`` by the caller's clock."""
    return max(1000, math.ceil((max(expires - now, 0.0) + TTL_GRACE) * 1000))


def _num(value: float) -> str:
    return repr(float(value))


def _version_base() -> int:
    return secrets.randbelow(1 << 40) * 1000


def _fields(packed: bytes) -> list[bytes | None]:
    return list(packed.split(b" ")) if packed else [None]


def _triplet(key: str, row: list[bytes | None]) -> TripletRecord | None:
    if row[0] is None:
        return None
    return TripletRecord(key, _f(row[0]), _f(row[1]), _f(row[2]), _f(row[3]))


def _client(key: str, row: list[bytes | None]) -> ClientRecord | None:
    if row[0] is None:
        return None
    return ClientRecord(key, int(row[0]), _f(row[1]), _f(row[2]), _f(row[3]), _f(row[4]))


class RedisGreylistStore(GreylistStore):
    """Greylist state in Redis, shared by every daemon that names the same URL."""

    def __init__(self, url: str, *, timeout: float = 1.0, prefix: str = "mxguard:",
                 max_connections: int = MAX_CONNECTIONS,
                 connection: RedisConnection | None = None) -> None:
        self.conn = connection if connection is not None else RedisConnection(
            url, timeout=timeout, max_connections=max_connections)
        self.url = url
        self.prefix = prefix
        self._t = f"{prefix}gl:t:"
        self._c = f"{prefix}gl:c:"
        self._wl = f"{prefix}gl:wl"
        self._wlv = f"{prefix}gl:wlv"
        self._m = f"{prefix}gl:m:"
        self.writes = 0
        self._expire_cursor = 0
        self._secrets: dict[str, bytes] = {}
        self._secrets_checked = 0.0
        sc = self.conn.script
        self._lookup = sc(LUA_LOOKUP)
        self._first_seen = sc(LUA_FIRST_SEEN)
        self._mark_passed = sc(LUA_MARK_PASSED)
        self._touch = sc(LUA_TOUCH)
        self._count_client = sc(LUA_COUNT_CLIENT)
        self._wl_add = sc(LUA_WL_ADD)
        self._wl_remove = sc(LUA_WL_REMOVE)
        self._expire = sc(LUA_EXPIRE)
        self._purge = sc(LUA_PURGE)
        self._put_secrets = sc(LUA_SECRETS)

    # -- figures
    @property
    def errors(self) -> int:
        """Operations that failed (Redis away, timed out, refused)."""
        return self.conn.errors

    @property
    def commits(self) -> int:
        """Writes done (every Redis write is its own atomic step: no group commit)."""
        return self.writes

    async def _script(self, doing: str, script: Script, keys: list[Any],
                      args: list[Any]) -> Any:
        return await self.conn.evalsha(doing, script, keys, args)

    async def _write(self, doing: str, script: Script, keys: list[Any],
                     args: list[Any]) -> Any:
        result = await self._script(doing, script, keys, args)
        self.writes += 1
        return result

    # ------------------------------------------------------------ triplets

    async def get_triplet(self, key: str) -> TripletRecord | None:
        row = await self.conn.command("read", "HMGET", self._t + key, "f", "l", "p", "e")
        return _triplet(key, row)

    async def lookup(self, triplet_key: str,
                     client_key: str) -> tuple[TripletRecord | None, ClientRecord | None]:
        packed = await self._script("lookup", self._lookup,
                                    [self._t + triplet_key, self._c + client_key], [])
        t, _, c = packed.partition(b"|")
        return _triplet(triplet_key, _fields(t)), _client(client_key, _fields(c))

    async def record_first_seen(self, key: str, now: float, expires: float) -> None:
        await self._write("write", self._first_seen, [self._t + key],
                          [_num(now), _num(expires), _ms(now, expires), FIRST_SEEN_RACE])

    async def mark_passed(self, key: str, now: float, expires: float) -> bool:
        changed = await self._write("write", self._mark_passed, [self._t + key],
                                    [_num(now), _num(expires), _ms(now, expires)])
        return bool(changed)

    async def touch_triplet(self, key: str, now: float, expires: float) -> None:
        await self._write("write", self._touch, [self._t + key],
                          [_num(now), _num(expires), _ms(now, expires)])

    # ------------------------------------------------------------ clients

    async def get_client(self, key: str) -> ClientRecord | None:
        row = await self.conn.command("read", "HMGET", self._c + key, "n", "f", "lc", "l", "e")
        return _client(key, row)

    async def count_client(self, key: str, now: float, expires: float,
                           interval: float) -> None:
        await self._write("write", self._count_client, [self._c + key],
                          [_num(now), _num(expires), _num(interval), _ms(now, expires)])

    async def touch_client(self, key: str, now: float, expires: float) -> None:
        await self._write("write", self._touch, [self._c + key],
                          [_num(now), _num(expires), _ms(now, expires)])

    # ------------------------------------------------------------ whitelist

    async def add_whitelist(self, entry: WhitelistEntry) -> bool:
        value = json.dumps([entry.kind, entry.added, entry.comment])
        return bool(await self._write("write", self._wl_add, [self._wl, self._wlv],
                                      [entry.entry, value, _version_base()]))

    async def remove_whitelist(self, entry: str) -> bool:
        return bool(await self._write("write", self._wl_remove, [self._wl, self._wlv],
                                      [entry, _version_base()]))

    async def list_whitelist(self) -> list[WhitelistEntry]:
        raw: dict[bytes, bytes] = await self.conn.run(
            "read", lambda: self.conn.client.hgetall(self._wl))
        out = []
        for name, value in raw.items():
            kind, added, comment = json.loads(value)
            out.append(WhitelistEntry(name.decode(), str(kind), float(added), str(comment)))
        out.sort(key=lambda e: (e.kind, e.entry))
        return out

    async def whitelist_version(self) -> int:
        value = await self.conn.command("read", "GET", self._wlv)
        mono = time.monotonic()
        if self._secrets and mono - self._secrets_checked >= SECRET_CHECK:
            self._secrets_checked = mono
            await self._reassert_secrets()
        return int(value) if value is not None else 0

    # ------------------------------------------------------------ maintenance

    async def expire_batch(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` records whose ``expires`` < ``now``. Redis TTLs do the
        real work; this honours the caller's clock, a few bounded SCAN steps per call."""
        deleted = 0
        match = glob_escape(f"{self.prefix}gl:") + "[tc]:*"
        for _ in range(EXPIRE_SCAN_STEPS):
            start = self._expire_cursor
            cursor, keys = await self.conn.run("scan", functools.partial(
                self.conn.client.scan, start, match=match, count=SCAN_COUNT))
            if keys:
                n, examined = await self._write("expire", self._expire, list(keys),
                                                [_num(now), limit - deleted])
                deleted += int(n)
                if int(examined) < len(keys):  # stopped at the cap: look here again
                    return deleted
            self._expire_cursor = int(cursor)
            if deleted >= limit or self._expire_cursor == 0:
                return deleted
        return deleted

    async def _rows(self, prefix: str, fields: list[str]
                    ) -> AsyncIterator[list[tuple[str, list[bytes | None]]]]:
        """Batches of (key without prefix, field values) of every record under ``prefix``."""
        cut = len(prefix)
        async for keys in self.conn.scan(glob_escape(prefix) + "*"):
            def fetch(ks: list[bytes] = keys) -> Awaitable[list[Any]]:
                pipe = self.conn.client.pipeline(transaction=False)
                for k in ks:
                    pipe.hmget(k, fields)
                result: Awaitable[list[Any]] = pipe.execute()
                return result

            rows = await self.conn.run("read", fetch)
            yield [(k.decode()[cut:], r) for k, r in zip(keys, rows, strict=True)
                   if r[0] is not None]

    async def scan_triplets(self) -> AsyncIterator[list[TripletRecord]]:
        """Every triplet, in batches (for migration)."""
        async for batch in self._rows(self._t, ["f", "l", "p", "e"]):
            yield [rec for k, r in batch if (rec := _triplet(k, r)) is not None]

    async def scan_clients(self) -> AsyncIterator[list[ClientRecord]]:
        """Every auto-whitelist client, in batches (for migration)."""
        async for batch in self._rows(self._c, ["n", "f", "lc", "l", "e"]):
            yield [rec for k, r in batch if (rec := _client(k, r)) is not None]

    async def put_records(self, triplets: list[TripletRecord], clients: list[ClientRecord],
                          now: float) -> int:
        """Write records as they are (migration), replacing any present; one round trip.
        Records already expired at ``now`` are skipped; returns how many were written."""
        def fetch() -> Awaitable[list[Any]]:
            pipe = self.conn.client.pipeline(transaction=False)
            for t in triplets:
                if t.expires >= now:
                    pipe.delete(self._t + t.key)
                    pipe.hset(self._t + t.key, mapping={
                        "f": _num(t.first_seen), "l": _num(t.last_seen),
                        "p": _num(t.passed_at), "e": _num(t.expires)})
                    pipe.pexpire(self._t + t.key, _ms(now, t.expires))
            for c in clients:
                if c.expires >= now:
                    pipe.delete(self._c + c.key)
                    pipe.hset(self._c + c.key, mapping={
                        "n": c.count, "f": _num(c.first_seen), "lc": _num(c.last_counted),
                        "l": _num(c.last_seen), "e": _num(c.expires)})
                    pipe.pexpire(self._c + c.key, _ms(now, c.expires))
            result: Awaitable[list[Any]] = pipe.execute()
            return result

        n = sum(1 for t in triplets if t.expires >= now) + \
            sum(1 for c in clients if c.expires >= now)
        if n:
            await self.conn.run("write", fetch)
            self.writes += 1
        return n

    async def list_triplets(self, limit: int) -> list[TripletRecord]:
        best: list[tuple[float, str, TripletRecord]] = []
        async for batch in self.scan_triplets():
            for rec in batch:
                item = (rec.last_seen, rec.key, rec)
                if len(best) < limit:
                    heapq.heappush(best, item)
                elif item[:2] > best[0][:2]:
                    heapq.heapreplace(best, item)
        return [rec for _, _, rec in sorted(best, key=lambda i: i[:2], reverse=True)]

    async def stats(self) -> StoreStats:
        total = passed = clients = 0
        oldest = math.inf
        async for batch in self._rows(self._t, ["f", "p"]):
            for _, (first, passed_at) in batch:
                total += 1
                passed += _f(passed_at) > 0
                oldest = min(oldest, _f(first))
        async for ckeys in self.conn.scan(glob_escape(self._c) + "*"):
            clients += len(ckeys)
        wl = await self.conn.run("read", lambda: self.conn.client.hlen(self._wl))
        return StoreStats(triplets=total, passed=passed, pending=total - passed,
                          clients=clients, whitelist=int(wl),
                          oldest_seen=0.0 if oldest == math.inf else oldest,
                          commits=self.commits)

    async def purge(self, older_than: float | None) -> int:
        """Delete triplets and clients (not the whitelist), one script per SCAN step."""
        n = 0
        arg = "" if older_than is None else _num(older_than)
        for prefix in (self._t, self._c):
            async for keys in self.conn.scan(glob_escape(prefix) + "*"):
                n += int(await self._write("purge", self._purge, list(keys), [arg]))
        return n

    async def delete_triplet(self, key: str) -> bool:
        n = await self.conn.run("write", lambda: self.conn.client.delete(self._t + key))
        self.writes += 1
        return bool(n)

    async def secret(self, name: str, size: int = 32) -> bytes:
        key = self._m + name
        value = await self.conn.run("read", lambda: self.conn.client.get(key))
        if not (isinstance(value, bytes) and len(value) >= size):
            fresh = secrets.token_bytes(size)
            await self.conn.run("write", lambda: self.conn.client.set(key, fresh, nx=True))
            value = await self.conn.run("read", lambda: self.conn.client.get(key))
        if not isinstance(value, bytes) or len(value) < size:
            raise StoreError(f"{self.conn.where}: {key} is not a {size}-byte key")
        self._secrets[name] = value
        return value

    async def stored_secrets(self) -> dict[str, bytes]:
        """Every secret kept in the store, by name (migration); creates none."""
        out: dict[str, bytes] = {}
        async for keys in self.conn.scan(glob_escape(self._m) + "*"):
            values = await self.conn.run("read", functools.partial(self.conn.client.mget, keys))
            for key, value in zip(keys, values, strict=True):
                if isinstance(value, bytes):
                    out[key.decode()[len(self._m):]] = value
        return out

    async def set_secret(self, name: str, value: bytes) -> None:
        """Store a secret as given, replacing any (migration)."""
        await self.conn.run("write", lambda: self.conn.client.set(self._m + name, value))
        self._secrets[name] = value

    async def _reassert_secrets(self) -> None:
        """Put the secrets this daemon uses back if Redis lost them (restarted empty), so
        a host started later derives the same privacy keys."""
        names = sorted(self._secrets)
        await self._script("write", self._put_secrets, [self._m + n for n in names],
                           [self._secrets[n] for n in names])

    async def close(self) -> None:
        await self.conn.close()


__all__ = ["RedisGreylistStore"]
