"""Received aggregate reports in Redis, shared by every MX host of a fleet.

The same :class:`~mxguard.store.received_reports.ReceivedReportsStore`
interface as the SQLite store:

    mxguard:dmarc:rcv:r:<id>     the report's JSON; expires max_age_days after its end
    mxguard:dmarc:rcv:idx        sorted set "<domain> <id>" scored by the report's end

``<id>`` is the SHA-256 of (org_name, report_id), so two hosts ingesting the
same report at once store it once: one Lua script sets the report only if
absent (``SET NX``) and indexes it, atomically. Index entries whose report
expired are dropped when read or purged.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from mxguard.auth.dmarc_ingest import AggregateReport
from mxguard.store.base import StoreError
from mxguard.store.received_reports import ADDED, DAY, DUPLICATE, EXPIRED, ReceivedReportsStore
from mxguard.store.redis_conn import describe_url, sync_redis_client

# KEYS: report key, index; ARGV: json, ttl seconds, end, member. 1 added, 0 duplicate.
LUA_ADD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

_BATCH = 500


def report_key_id(org_name: str, report_id: str) -> str:
    return hashlib.sha256(f"{org_name}\x00{report_id}".encode()).hexdigest()[:32]


class RedisReceivedReports(ReceivedReportsStore):
    """Received reports in Redis (``url``: a storage URL, see :mod:`mxguard.store.redis_conn`)."""

    def __init__(self, url: str, *, max_age_days: float = 400, timeout: float = 1.0,
                 prefix: str = "mxguard:") -> None:
        self.url = url
        self.where = f"redis {describe_url(url)}"
        self.max_age_days = max_age_days
        self._p = f"{prefix}dmarc:rcv:"
        self._client: Any = sync_redis_client(url, timeout)
        self._add = self._client.register_script(LUA_ADD)
        self._closed = False

    def _call(self, doing: str, fn: Callable[[], Any]) -> Any:
        if self._closed:
            raise StoreError(f"{self.where}: received reports store is closed")
        try:
            return fn()
        except (RedisError, OSError) as exc:
            raise StoreError(f"{self.where}: {doing} failed: {exc or type(exc).__name__}") \
                from None

    def add(self, report: AggregateReport, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.expired(report, now):
            return EXPIRED
        rid = report_key_id(report.org_name, report.report_id)
        ttl = max(1, int(report.end + self.max_age_days * DAY - now))
        added = self._call("storing a report", lambda: self._add(
            keys=[f"{self._p}r:{rid}", f"{self._p}idx"],
            args=[report.to_json(), ttl, report.end, f"{report.domain} {rid}"]))
        return ADDED if int(added) == 1 else DUPLICATE

    def reports(self, since: float | None = None,
                domain: str | None = None) -> list[AggregateReport]:
        low = "-inf" if since is None else repr(float(since))
        members = [m.decode() for m in self._call("read", lambda: self._client.zrangebyscore(
            f"{self._p}idx", low, "+inf"))]
        if domain is not None:
            want = domain.lower().rstrip(".")
            members = [m for m in members if m.split(" ", 1)[0] == want]
        out: list[AggregateReport] = []
        gone: list[str] = []
        for i in range(0, len(members), _BATCH):
            chunk = members[i:i + _BATCH]
            keys = [f"{self._p}r:{m.split(' ', 1)[1]}" for m in chunk]
            bodies = self._call("read", functools.partial(self._client.mget, keys))
            for member, body in zip(chunk, bodies, strict=True):
                if body is None:
                    gone.append(member)
                else:
                    out.append(AggregateReport.from_json(body))
        if gone:
            self._call("cleanup", lambda: self._client.zrem(f"{self._p}idx", *gone))
        out.sort(key=lambda r: (r.end, r.org_name, r.report_id))
        return out

    def count(self) -> int:
        return int(self._call("read", lambda: self._client.zcard(f"{self._p}idx")))

    def purge(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.max_age_days * DAY
        members = [m.decode() for m in self._call("read", lambda: self._client.zrangebyscore(
            f"{self._p}idx", "-inf", f"({cutoff!r}"))]
        if not members:
            return 0

        def go() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(*[f"{self._p}r:{m.split(' ', 1)[1]}" for m in members])
            pipe.zrem(f"{self._p}idx", *members)
            return pipe.execute()

        self._call("purge", go)
        return len(members)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RedisError, OSError):
            self._client.close()


__all__ = ["RedisReceivedReports", "report_key_id"]
