"""Message history in Redis: one store for a fleet of MX hosts, so one dashboard
sees every host's mail (each record names its ``host``).

The same :class:`~mxguard.store.history.HistoryStore` interface as the SQLite
store. Keys (prefix ``mxguard:history:``)::

    rec:<id>                  the record's JSON
    time                      sorted set id -> time (every record)
    ix:<kind>:<value>         sorted set id -> time per queue id (q), sender (s),
                              recipient (r), client address and name (c), action (a),
                              symbol (y): what a filtered query walks
    tl:<minute>               hash action -> count (the dashboard's chart)
    top:<field>[:<action>]:<hour>   hash value -> count (top symbols, senders ...)
    raw:<id>, raw             a kept message's bytes; list of kept ids (newest first)
    key                       the privacy key (made on first use)

Indexes and counters expire ``max_age`` after their last write; :meth:`prune`
deletes records and their index entries in small steps. A query walks the most
selective index newest first and filters the rest in Python, reading at most
:data:`MAX_SCAN` records. Top lists count per hour: ``since`` is rounded down
to the hour. Calls run in a thread with the blocking client (the daemon's loop
never waits for Redis).
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from mxguard.store.history import (
    DEFAULT_RAW_MAX,
    SECRET_SIZE,
    HistoryRecord,
    HistoryStore,
    Query,
    dumps,
    loads,
)
from mxguard.store.redis_conn import describe_url, sync_redis_client

MAX_SCAN = 50000  # records a filtered query reads at most
PAGE = 500
DAY = 86400.0

# KEYS: raw:<id>, raw list; ARGV: data, id, ttl, keep, prefix of raw keys
LUA_KEEP = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('LREM', KEYS[2], 0, ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local keep = tonumber(ARGV[4])
while redis.call('LLEN', KEYS[2]) > keep do
  local old = redis.call('RPOP', KEYS[2])
  redis.call('DEL', ARGV[5] .. old)
end
return 1
"""


# ARGV: prefix, ttl, JSON list of {id, t, a, j, ix: [index key suffixes], top: [[field, value]]}
LUA_ADD = """
local p, ttl = ARGV[1], tonumber(ARGV[2])
for _, r in ipairs(cjson.decode(ARGV[3])) do
  local t = tonumber(r.t)
  redis.call('SET', p .. 'rec:' .. r.id, r.j, 'EX', ttl)
  redis.call('ZADD', p .. 'time', r.t, r.id)
  for _, k in ipairs(r.ix) do
    redis.call('ZADD', p .. 'ix:' .. k, r.t, r.id)
    redis.call('EXPIRE', p .. 'ix:' .. k, ttl)
  end
  local m = p .. 'tl:' .. math.floor(t / 60)
  redis.call('HINCRBY', m, r.a, 1)
  redis.call('EXPIRE', m, ttl)
  local h = math.floor(t / 3600)
  for _, fv in ipairs(r.top) do
    local k1 = p .. 'top:' .. fv[1] .. ':' .. h
    local k2 = p .. 'top:' .. fv[1] .. ':' .. r.a .. ':' .. h
    redis.call('HINCRBY', k1, fv[2], 1)
    redis.call('EXPIRE', k1, ttl)
    redis.call('HINCRBY', k2, fv[2], 1)
    redis.call('EXPIRE', k2, ttl)
  end
end
return 1
"""
CHUNK = 200  # records per script call: Redis stays responsive for the other hosts


def _id_time(record_id: str) -> float | None:
    try:
        return int(record_id[:14], 16) / 1_000_000
    except ValueError:
        return None


class RedisHistoryStore(HistoryStore):
    """The history in Redis (``url``: a storage URL, see :mod:`mxguard.store.redis_conn`)."""

    def __init__(self, url: str, *, privacy: bool = False, timeout: float = 1.0,
                 max_age: float = 30 * DAY, keep_messages: int = 0,
                 raw_max_size: int = DEFAULT_RAW_MAX, prefix: str = "mxguard:history:",
                 readonly: bool = False) -> None:
        super().__init__()
        self.url = url
        self.where = f"redis {describe_url(url)}"
        self.privacy = privacy
        self.keep_messages = keep_messages
        self.raw_max_size = raw_max_size
        self.readonly = readonly
        self.ttl = int(max_age + DAY)
        self._p = prefix
        self._client: Any = sync_redis_client(url, max(timeout, 2.0))
        self._keep = self._client.register_script(LUA_KEEP)
        self._add = self._client.register_script(LUA_ADD)

    def _backend_error(self, exc: BaseException) -> bool:
        return isinstance(exc, RedisError | OSError)

    def _load_secret(self, *, create: bool) -> bytes | None:
        key = self._p + "key"
        if create:
            self._client.set(key, secrets.token_bytes(SECRET_SIZE), nx=True)
        value = self._client.get(key)
        return bytes(value) if value is not None else None

    def _indexes(self, rec: HistoryRecord) -> set[str]:
        p = self._p + "ix:"
        keys = {p + "a:" + rec.action}
        if rec.queue_id:
            keys.add(p + "q:" + rec.queue_id)
        if rec.sender:
            keys.add(p + "s:" + rec.sender.strip().lower())
        for value in (rec.client_address, rec.client_name):
            if value:
                keys.add(p + "c:" + value.strip().lower())
        keys.update(p + "r:" + r.strip().lower() for r in rec.recipients if r)
        keys.update(p + "y:" + n for n in rec.symbol_names() if n)
        return keys

    def _add_many(self, records: list[tuple[HistoryRecord, str]], *,
                  on_loop: bool = False) -> None:
        """One script call per :data:`CHUNK` records (Redis does the index work; a
        pipeline of ~40 commands a record cost ~0.5 ms of Python per record)."""
        ix = len(self._p) + 3  # the index keys go in without "<prefix>ix:"
        entries = []
        for rec, domain in records:
            top = [["symbol", n] for n in set(rec.symbol_names()) if n]
            for name, value in (("sender", rec.sender.lower()),
                                ("client", rec.client_address.lower()),
                                ("sender_domain", domain)):
                if value:
                    top.append([name, value])
            entries.append({"id": rec.id, "t": repr(rec.time), "a": rec.action,
                            "j": dumps(rec), "ix": [k[ix:] for k in self._indexes(rec)],
                            "top": top})
        pipe = self._client.pipeline(transaction=False)
        for i in range(0, len(entries), CHUNK):
            self._add(keys=[], args=[self._p, self.ttl,
                                     json.dumps(entries[i:i + CHUNK], ensure_ascii=False)],
                      client=pipe)
        pipe.execute()

    def _get(self, key: str) -> HistoryRecord | None:
        data = self._client.get(self._p + "rec:" + key)
        if data is not None:
            return loads(data)
        for rid in self._client.zrevrange(self._p + "ix:q:" + key, 0, 20):
            data = self._client.get(self._p + "rec:" + rid.decode())
            if data is not None:
                return loads(data)
        return None

    def _query(self, q: Query) -> list[HistoryRecord]:
        p = self._p + "ix:"
        index = self._p + "time"
        for kind, value in (("q", q.queue_id), ("r", q.recipient), ("s", q.sender),
                            ("c", q.client), ("y", q.symbol), ("a", q.action)):
            if value is not None:
                index = p + kind + ":" + value
                break
        high: Any = "+inf" if q.until is None else q.until
        if q.before_id is not None:
            t = _id_time(q.before_id)
            if t is not None:
                high = t if high == "+inf" else min(float(high), t)
        low: Any = "-inf" if q.since is None else q.since
        out: list[HistoryRecord] = []
        offset = 0
        while len(out) < q.limit and offset < MAX_SCAN:
            ids = self._client.zrevrangebyscore(index, high, low, start=offset, num=PAGE)
            if not ids:
                break
            offset += len(ids)
            datas = self._client.mget([self._p + "rec:" + i.decode() for i in ids])
            for data in datas:
                if data is None:
                    continue
                rec = loads(data)
                if q.matches(rec):
                    out.append(rec)
                    if len(out) >= q.limit:
                        break
        out.sort(key=lambda r: (r.time, r.id), reverse=True)
        return out[:q.limit]

    def _hashes(self, keys: list[str]) -> list[dict[bytes, bytes]]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        result: list[dict[bytes, bytes]] = pipe.execute()
        return result

    def _timeline(self, since: float, bucket: int) -> list[tuple[float, str, int]]:
        import time

        first, last = int(since // 60), int(time.time() // 60)
        first = max(first, last - int(self.ttl // 60))
        minutes = list(range(first, last + 1))
        counts: Counter[tuple[float, str]] = Counter()
        for minute, found in zip(minutes, self._hashes([self._p + f"tl:{m}" for m in minutes]),
                                 strict=True):
            start = float(minute * 60 // bucket * bucket)
            for action, n in found.items():
                counts[(start, action.decode())] += int(n)
        return [(b, a, n) for (b, a), n in sorted(counts.items())]

    def _top(self, field_name: str, since: float, limit: int,
             action: str | None) -> list[tuple[str, int]]:
        import time

        first, last = int(since // 3600), int(time.time() // 3600)
        first = max(first, last - int(self.ttl // 3600))
        middle = f"{action}:" if action else ""
        keys = [self._p + f"top:{field_name}:{middle}{h}" for h in range(first, last + 1)]
        counts: Counter[str] = Counter()
        for found in self._hashes(keys):
            for value, n in found.items():
                counts[value.decode()] += int(n)
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]

    def _prune(self, cutoff: float, max_records: int, batch: int) -> int:
        c, p = self._client, self._p
        ids = list(c.zrangebyscore(p + "time", "-inf", f"({cutoff}", start=0, num=batch))
        if len(ids) < batch:
            over = min(batch - len(ids), max(0, int(c.zcard(p + "time")) - len(ids)
                                                - max_records))
            if over:
                ids += [i for i in c.zrange(p + "time", len(ids), len(ids) + over - 1)]
        if not ids:
            return 0
        names = [i.decode() for i in ids]
        datas = c.mget([p + "rec:" + n for n in names])
        pipe = c.pipeline(transaction=False)
        for name, data in zip(names, datas, strict=True):
            if data is not None:
                for key in self._indexes(loads(data)):
                    pipe.zrem(key, name)
            pipe.delete(p + "rec:" + name, p + "raw:" + name)
        pipe.zrem(p + "time", *names)
        pipe.execute()
        return len(names)

    def _count(self) -> int:
        return int(self._client.zcard(self._p + "time"))

    def _keep_raw(self, record_id: str, data: bytes) -> None:
        self._keep(keys=[self._p + "raw:" + record_id, self._p + "raw"],
                   args=[data, record_id, self.ttl, self.keep_messages, self._p + "raw:"])

    def _get_raw(self, record_id: str) -> bytes | None:
        data = self._client.get(self._p + "raw:" + record_id)
        return bytes(data) if data is not None else None

    def _close(self) -> None:
        close: Callable[[], None] = self._client.close
        close()


__all__ = ["RedisHistoryStore"]
