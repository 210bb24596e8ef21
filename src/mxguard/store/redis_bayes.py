"""Redis Bayes store: one Bayes database for several MX hosts.

Chosen by the same ``[storage] url`` as the Redis greylist store (``redis://``,
``rediss://``, ``redis+sentinel://``; see :mod:`mxguard.store.redis_conn`, whose
:class:`~mxguard.store.redis_conn.RedisConnection` this store uses: pipelining of
concurrent calls, a timeout per pipeline, fail-fast after a connection
failure, scripts loaded again after ``NOSCRIPT``).

Keys (``prefix`` defaults to ``mxguard:``; ``<h>`` is the decimal token hash)::

    mxguard:bayes:t:<h>     hash s=spam count h=ham count a=atime; Redis TTL
    mxguard:bayes:atime     sorted set <h> -> atime (the expiry index)
    mxguard:bayes:totals    hash nspam, nham
    mxguard:bayes:seen      hash message key -> "<1|0> <time learned>" (1: spam)

**Atomicity.** Learning or forgetting one message is one Lua script
(``EVALSHA``) that reads the message's ``seen`` record, adds (and for a
relearn subtracts) its tokens, updates the totals and writes the record, so a
message learned at once on two hosts is counted once, and a relearn as the
other class moves it exactly. A batch of messages is sent as pipelines of such
scripts (each message atomic, the batch not: a batch cut short by a failure is
learned again safely, the messages already done answer ``known``).
:meth:`RedisBayesStore.lookup` is one read-only script per chunk of tokens
(``HMGET`` of the totals and of every token: one round trip, one snapshot).

**Expiry.** Every token learned or touched gets the Redis TTL ``token_ttl`` +
:data:`TTL_GRACE` (refreshed on learn and on :meth:`~RedisBayesStore.touch`,
which the classifier calls for scanned tokens older than a day), so Redis
itself drops tokens nobody uses even when no daemon runs expiry. The exact
rules of :meth:`~BayesStore.expire` (unseen for ``ttl`` by the caller's
clock, then least recently seen beyond ``max_tokens``) run on the
``bayes:atime`` sorted set, a bounded batch per call. **max_tokens:** Redis
cannot evict a key by "least recently used among these" cheaply on its own;
the cap is enforced only by :meth:`expire` through the index (an O(log N)
sorted set entry per token, roughly doubling the memory of a token). Between
expiry runs the count can exceed ``max_tokens``; the TTLs bound it by age in
any case. A token whose key Redis expired leaves a stale index entry until
:meth:`expire` reaches it (it is older than ``ttl`` by then); stats count it
until then.

Not supported: Redis Cluster (the scripts touch keys they compute).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from mxguard.store.bayes_store import (
    FORGOTTEN,
    KNOWN,
    LEARNED,
    RELEARNED,
    UNKNOWN,
    BayesStats,
    BayesStore,
    LearnItem,
    TokenCounts,
)
from mxguard.store.redis_conn import MAX_CONNECTIONS, RedisConnection, glob_escape

DAY = 86400
DEFAULT_TOKEN_TTL = 180 * DAY  # [bayes] token_ttl default
TTL_GRACE = 2 * DAY  # Redis keeps a token this long past token_ttl: scans touch once a day
LOOKUP_CHUNK = 4000  # tokens per lookup script
WRITE_CHUNK = 20000  # token updates per pipeline of learn / forget / touch scripts
SCAN_COUNT = 1000

# --------------------------------------------------------------- Lua scripts

# KEYS: totals, token keys...; reply: {nspam, nham, "s h a" or nil per token}
LUA_LOOKUP = """
local t = redis.call('HMGET', KEYS[1], 'nspam', 'nham')
local out = {t[1] or '0', t[2] or '0'}
for i = 2, #KEYS do
  local r = redis.call('HMGET', KEYS[i], 's', 'h', 'a')
  if r[1] then
    out[i + 1] = r[1] .. ' ' .. (r[2] or '0') .. ' ' .. (r[3] or '0')
  else
    out[i + 1] = false
  end
end
return out
"""

# Shared by learn and forget: subtract one message of class `col` from token key `k`.
_LUA_SUB = """
local function sub(k, col, zkey, cut)
  if redis.call('EXISTS', k) == 0 then return end
  if redis.call('HINCRBY', k, col, -1) < 0 then redis.call('HSET', k, col, 0) end
  local row = redis.call('HMGET', k, 's', 'h')
  if (tonumber(row[1]) or 0) <= 0 and (tonumber(row[2]) or 0) <= 0 then
    redis.call('DEL', k)
    redis.call('ZREM', zkey, string.sub(k, cut))
  end
end
local function total(tkey, field, delta)
  if redis.call('HINCRBY', tkey, field, delta) < 0 then redis.call('HSET', tkey, field, 0) end
end
"""

# KEYS: seen, totals, atime index, token keys...
# ARGV: message key, "1" spam / "0" ham, now, ttl_ms, length of the token key prefix
# Returns 0 known, 1 learned, 2 relearned.
LUA_LEARN = _LUA_SUB + """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
local spam = ARGV[2]
if prev and string.sub(prev, 1, 1) == spam then return 0 end
local now = tonumber(ARGV[3])
local cut = tonumber(ARGV[5]) + 1
if prev then
  local old = string.sub(prev, 1, 1) == '1'
  for i = 4, #KEYS do sub(KEYS[i], old and 's' or 'h', KEYS[3], cut) end
  total(KEYS[2], old and 'nspam' or 'nham', -1)
end
local col = (spam == '1') and 's' or 'h'
for i = 4, #KEYS do
  local k = KEYS[i]
  local a = tonumber(redis.call('HGET', k, 'a'))
  if not a then
    redis.call('HSET', k, 's', 0, 'h', 0, 'a', ARGV[3])
    a = now
  elseif a < now then
    redis.call('HSET', k, 'a', ARGV[3])
    a = now
  end
  redis.call('HINCRBY', k, col, 1)
  redis.call('PEXPIRE', k, ARGV[4])
  redis.call('ZADD', KEYS[3], a, string.sub(k, cut))
end
total(KEYS[2], (spam == '1') and 'nspam' or 'nham', 1)
redis.call('HSET', KEYS[1], ARGV[1], spam .. ' ' .. ARGV[3])
if prev then return 2 end
return 1
"""

# KEYS: seen, totals, atime index, token keys...; ARGV: message key, prefix length.
# Returns 1 forgotten, 0 unknown.
LUA_FORGET = _LUA_SUB + """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if not prev then return 0 end
local cut = tonumber(ARGV[2]) + 1
local old = string.sub(prev, 1, 1) == '1'
for i = 4, #KEYS do sub(KEYS[i], old and 's' or 'h', KEYS[3], cut) end
total(KEYS[2], old and 'nspam' or 'nham', -1)
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS: atime index, token keys...; ARGV: now, ttl_ms, prefix length
LUA_TOUCH = """
local now = tonumber(ARGV[1])
local cut = tonumber(ARGV[3]) + 1
for i = 2, #KEYS do
  local k = KEYS[i]
  local a = tonumber(redis.call('HGET', k, 'a'))
  if a then
    if a < now then
      redis.call('HSET', k, 'a', ARGV[1])
      redis.call('ZADD', KEYS[1], ARGV[1], string.sub(k, cut))
    end
    redis.call('PEXPIRE', k, ARGV[2])
  end
end
return 1
"""

# KEYS: atime index; ARGV: cutoff (now - ttl), max_tokens, limit, token key prefix.
# Deletes the tokens unseen since cutoff, then the least recent beyond max_tokens.
LUA_EXPIRE = """
local z = KEYS[1]
local limit = tonumber(ARGV[3])
local n = 0
local function drop(members)
  for _, m in ipairs(members) do
    redis.call('DEL', ARGV[4] .. m)
    redis.call('ZREM', z, m)
  end
  n = n + #members
end
if limit > 0 then
  drop(redis.call('ZRANGEBYSCORE', z, '-inf', '(' .. ARGV[1], 'LIMIT', 0, limit))
end
local excess = math.min(redis.call('ZCARD', z) - tonumber(ARGV[2]), limit - n)
if excess > 0 then drop(redis.call('ZRANGE', z, 0, excess - 1)) end
return n
"""

# KEYS: atime index, totals, seen
LUA_STATS = """
local lo = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local hi = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local t = redis.call('HMGET', KEYS[2], 'nspam', 'nham')
return {redis.call('ZCARD', KEYS[1]), t[1] or '0', t[2] or '0', redis.call('HLEN', KEYS[3]),
        lo[2] or '0', hi[2] or '0'}
"""


@dataclass(frozen=True, slots=True)
class TokenRow:
    """One token as stored (migration)."""

    h: int
    spam: int
    ham: int
    atime: int


@dataclass(frozen=True, slots=True)
class SeenRow:
    """One learned-message record (migration)."""

    key: str
    spam: bool
    time: int


def _int(value: Any) -> int:
    return int(float(value)) if value is not None else 0


def _chunks(items: Sequence[LearnItem], budget: int) -> list[list[LearnItem]]:
    """Items grouped so a group carries about ``budget`` token updates at most."""
    out: list[list[LearnItem]] = []
    cur: list[LearnItem] = []
    n = 0
    for item in items:
        if cur and n + len(item.tokens) > budget:
            out.append(cur)
            cur, n = [], 0
        cur.append(item)
        n += len(item.tokens)
    if cur:
        out.append(cur)
    return out


class RedisBayesStore(BayesStore):
    """Bayes tokens, totals and learned-message records in Redis, shared by a fleet."""

    def __init__(self, url: str, *, timeout: float = 1.0, prefix: str = "mxguard:",
                 token_ttl: int = DEFAULT_TOKEN_TTL, max_connections: int = MAX_CONNECTIONS,
                 connection: RedisConnection | None = None) -> None:
        self.conn = connection if connection is not None else RedisConnection(
            url, timeout=timeout, max_connections=max_connections)
        self.url = url
        self.prefix = prefix
        self.token_ttl = token_ttl
        self._t = f"{prefix}bayes:t:"
        self._atime = f"{prefix}bayes:atime"
        self._totals = f"{prefix}bayes:totals"
        self._seen = f"{prefix}bayes:seen"
        sc = self.conn.script
        self._lookup = sc(LUA_LOOKUP)
        self._learn = sc(LUA_LEARN)
        self._forget = sc(LUA_FORGET)
        self._touch = sc(LUA_TOUCH)
        self._expire = sc(LUA_EXPIRE)
        self._stats = sc(LUA_STATS)

    @property
    def ttl_ms(self) -> int:
        return (self.token_ttl + TTL_GRACE) * 1000

    @property
    def errors(self) -> int:
        return self.conn.errors

    def _keys(self, tokens: Sequence[int]) -> list[str]:
        t = self._t
        return [f"{t}{h}" for h in tokens]

    # ------------------------------------------------------------ classify

    async def lookup(self, tokens: Sequence[int]) -> TokenCounts:
        uniq = list(dict.fromkeys(tokens))
        chunks = [uniq[i:i + LOOKUP_CHUNK] for i in range(0, len(uniq), LOOKUP_CHUNK)] or [[]]
        replies = await asyncio.gather(*[
            self.conn.evalsha("bayes lookup", self._lookup, [self._totals, *self._keys(c)], [])
            for c in chunks])
        counts: dict[int, tuple[int, int, int]] = {}
        for chunk, reply in zip(chunks, replies, strict=True):
            for h, row in zip(chunk, reply[2:], strict=False):
                if row is not None:
                    s, hm, a = row.split(b" ")
                    counts[h] = (int(s), int(hm), _int(a))
        first = replies[0]
        return TokenCounts(_int(first[0]), _int(first[1]), counts)

    async def seen(self, key: str) -> bool | None:
        value = await self.conn.command("bayes seen", "HGET", self._seen, key)
        return None if value is None else value[:1] == b"1"

    # ------------------------------------------------------------ learn / forget

    async def _scripts(self, doing: str, calls: list[tuple[Any, list[Any], list[Any]]]
                       ) -> list[Any]:
        """Run scripts as one pipeline (queued in order in this loop iteration)."""
        return list(await asyncio.gather(*[self.conn.evalsha(doing, sc, keys, args)
                                           for sc, keys, args in calls]))

    def _head(self, tokens: Sequence[int]) -> list[str]:
        return [self._seen, self._totals, self._atime, *self._keys(tokens)]

    async def learn(self, items: Sequence[LearnItem], now: int) -> list[str]:
        out: list[str] = []
        names = {0: KNOWN, 1: LEARNED, 2: RELEARNED}
        plen = len(self._t)
        for group in _chunks(items, WRITE_CHUNK):
            replies = await self._scripts("bayes learn", [
                (self._learn, self._head(it.tokens),
                 [it.key, "1" if it.spam else "0", str(int(now)), self.ttl_ms, plen])
                for it in group])
            out += [names[int(r)] for r in replies]
        return out

    async def forget(self, items: Sequence[LearnItem], now: int) -> list[str]:
        out: list[str] = []
        plen = len(self._t)
        for group in _chunks(items, WRITE_CHUNK):
            replies = await self._scripts("bayes forget", [
                (self._forget, self._head(it.tokens), [it.key, plen]) for it in group])
            out += [FORGOTTEN if int(r) else UNKNOWN for r in replies]
        return out

    async def touch(self, tokens: Sequence[int], now: int) -> None:
        uniq = list(dict.fromkeys(tokens))
        step = LOOKUP_CHUNK
        args = [str(int(now)), self.ttl_ms, len(self._t)]
        for i in range(0, len(uniq), WRITE_CHUNK):
            part = uniq[i:i + WRITE_CHUNK]
            await self._scripts("bayes touch", [
                (self._touch, [self._atime, *self._keys(part[j:j + step])], args)
                for j in range(0, len(part), step)])

    # ------------------------------------------------------------ maintenance

    async def expire(self, now: int, max_tokens: int, ttl: int, limit: int) -> int:
        n = await self.conn.evalsha("bayes expire", self._expire, [self._atime],
                                    [str(int(now) - int(ttl)), max_tokens, limit, self._t])
        return int(n)

    async def stats(self) -> BayesStats:
        r = await self.conn.evalsha("bayes stats", self._stats,
                                    [self._atime, self._totals, self._seen], [])
        return BayesStats(int(r[0]), _int(r[1]), _int(r[2]), int(r[3]), _int(r[4]), _int(r[5]))

    # ------------------------------------------------------------ migration

    async def scan_tokens(self) -> AsyncIterator[list[TokenRow]]:
        """Every token, in batches (one SCAN step and one pipeline of HMGET each)."""
        cut = len(self._t)
        async for keys in self.conn.scan(glob_escape(self._t) + "*", SCAN_COUNT):
            def fetch(ks: list[bytes] = keys) -> Awaitable[list[Any]]:
                pipe = self.conn.client.pipeline(transaction=False)
                for k in ks:
                    pipe.hmget(k, ["s", "h", "a"])
                result: Awaitable[list[Any]] = pipe.execute()
                return result

            rows = await self.conn.run("bayes read", fetch)
            yield [TokenRow(int(k[cut:]), _int(r[0]), _int(r[1]), _int(r[2]))
                   for k, r in zip(keys, rows, strict=True) if r[0] is not None]

    async def scan_seen(self) -> AsyncIterator[list[SeenRow]]:
        """Every learned-message record, in batches (HSCAN)."""
        cursor = 0
        while True:
            cursor, found = await self.conn.run("bayes read", functools.partial(
                self.conn.client.hscan, self._seen, cursor, count=SCAN_COUNT))
            batch = []
            for key, value in found.items():
                flag, _, when = value.partition(b" ")
                batch.append(SeenRow(key.decode(), flag == b"1", _int(when or b"0")))
            if batch:
                yield batch
            if int(cursor) == 0:
                return

    async def totals(self) -> tuple[int, int]:
        r = await self.conn.command("bayes read", "HMGET", self._totals, "nspam", "nham")
        return _int(r[0]), _int(r[1])

    async def put_tokens(self, rows: Sequence[TokenRow]) -> int:
        """Write tokens as they are (migration), replacing any present; one round trip.
        Each gets the full Redis TTL; :meth:`expire` judges them by their atime."""
        def go() -> Awaitable[list[Any]]:
            pipe = self.conn.client.pipeline(transaction=False)
            for r in rows:
                key = f"{self._t}{r.h}"
                pipe.delete(key)
                pipe.hset(key, mapping={"s": r.spam, "h": r.ham, "a": r.atime})
                pipe.pexpire(key, self.ttl_ms)
            if rows:
                pipe.zadd(self._atime, {str(r.h): r.atime for r in rows})
            result: Awaitable[list[Any]] = pipe.execute()
            return result

        if rows:
            await self.conn.run("bayes write", go)
        return len(rows)

    async def put_seen(self, rows: Sequence[SeenRow]) -> int:
        """Write learned-message records as they are (migration), replacing any present."""
        if rows:
            mapping = {r.key: f"{int(r.spam)} {r.time}" for r in rows}
            await self.conn.run("bayes write", lambda: self.conn.client.hset(
                self._seen, mapping=mapping))
        return len(rows)

    async def set_totals(self, nspam: int, nham: int) -> None:
        await self.conn.run("bayes write", lambda: self.conn.client.hset(
            self._totals, mapping={"nspam": nspam, "nham": nham}))

    async def close(self) -> None:
        await self.conn.close()


__all__ = ["LUA_LEARN", "TTL_GRACE", "RedisBayesStore", "SeenRow", "TokenRow"]
