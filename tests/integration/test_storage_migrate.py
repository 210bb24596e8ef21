"""``mxguard storage migrate``: SQLite -> Redis -> SQLite with every kind of state,
against a real redis-server on loopback (tests/support/redis.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import inspect
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tests.support.redis import RedisServer, redis_server, redis_url  # noqa: F401

from mxguard.checks.greylist import open_greylister
from mxguard.cli.storage import storage
from mxguard.config import Config, GreylistConfig, ServerConfig, StorageConfig
from mxguard.core.transaction import Stage, Transaction
from mxguard.store.base import ClientRecord, TripletRecord, WhitelistEntry
from mxguard.store.bayes_store import (
    FORGOTTEN,
    KNOWN,
    BayesStore,
    LearnItem,
    SqliteBayesStore,
    bayes_sqlite_path,
)
from mxguard.store.redis import RedisGreylistStore
from mxguard.store.redis_results import RedisResultsStore
from mxguard.store.results import ResultRecord, SqliteResultsStore, results_path
from mxguard.store.sqlite import SqliteGreylistStore

_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
                              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
                              else {})
NOW = time.time()
DAY0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner(**_RUNNER_KW).invoke(storage, list(args))
    return result.exit_code, result.stdout, result.stderr


def result(ts: float, **kw: Any) -> ResultRecord:
    base = ResultRecord(ts=ts, source_ip="192.0.2.1", header_from="example.com",
                        envelope_from="example.com", dkim=(("example.com", "s", "pass"),),
                        policy_domain="example.com", p="reject", rua=("mailto:a@example.com",),
                        dmarc_result="pass", dkim_aligned=True)
    return dataclasses.replace(base, **kw)


TRIPLETS = [
    TripletRecord(f"192.0.2.0/24\tsender{i}@a.example\trcpt@b.example", NOW - 100 - i,
                  NOW - 50, (NOW - 40) if i % 2 else 0.0, NOW + 3600 + i)
    for i in range(7)
]
EXPIRED = TripletRecord("198.51.100.0/24\told@a.example\trcpt@b.example", NOW - 9000,
                        NOW - 9000, 0.0, NOW - 10)
CLIENTS = [ClientRecord(f"203.0.113.{i}", i + 1, NOW - 500, NOW - 300, NOW - 200, NOW + 7200)
           for i in range(3)]
WHITELIST = [WhitelistEntry("192.0.2.77", "client", NOW - 5, "partner"),
             WhitelistEntry("postmaster@", "recipient", NOW - 6, "")]
RESULTS = [result(DAY0 + 10), result(DAY0 + 20), result(DAY0 + 30, dmarc_result="fail"),
           result(DAY0 + 86400 + 5, policy_domain="other.example", header_from="other.example")]


def seed_sqlite(db: Path) -> bytes:
    """Fill a SQLite greylist file and its results file; return the privacy key."""
    async def go() -> bytes:
        store = SqliteGreylistStore(str(db))
        for t in [*TRIPLETS, EXPIRED]:
            await store.record_first_seen(t.key, t.first_seen, t.expires)
            if t.passed:
                await store.mark_passed(t.key, t.passed_at, t.expires)
            await store.touch_triplet(t.key, t.last_seen, t.expires)
        for c in CLIENTS:
            for n in range(c.count):
                await store.count_client(c.key, c.last_counted - 10000 * (c.count - 1 - n),
                                         c.expires, 3600)
        for e in WHITELIST:
            await store.add_whitelist(e)
        key = await store.secret("privacy_key")
        await store.close()
        return key

    key = asyncio.run(go())
    results = SqliteResultsStore(results_path(f"sqlite:///{db}"))
    for r in RESULTS:
        results.add(r)
    results.close()
    return key


async def read_all(store: SqliteGreylistStore | RedisGreylistStore
                   ) -> tuple[dict[str, TripletRecord], dict[str, ClientRecord], list[Any]]:
    triplets = {t.key: t for t in await store.list_triplets(1000)}
    clients = {}
    for c in CLIENTS:
        rec = await store.get_client(c.key)
        if rec is not None:
            clients[c.key] = rec
    wl = [(e.entry, e.kind, e.added, e.comment) for e in await store.list_whitelist()]
    return triplets, clients, wl


def all_results(store: Any) -> list[ResultRecord]:
    return [r for day in ("2026-03-01", "2026-03-02") for r in store.query(day)]


def test_sqlite_to_redis_and_back(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    src = tmp_path / "src.db"
    key = seed_sqlite(src)
    code, out, err = run("migrate", "--from", f"sqlite:///{src}", "--to", redis_url,
                         "--batch", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"migrating sqlite:///{src} -> {redis_url}"
    # progress as it goes: a line per 3 records, then the total
    assert "  greylist triplets: 3" in lines and "  greylist triplets: 6" in lines
    assert "  greylist triplets: 7 copied (1 expired, skipped)" in lines
    assert "  auto-whitelist clients: 3 copied" in lines
    assert "  dynamic whitelist: 2 entries copied" in lines
    assert "  secrets: 1 copied" in lines
    assert "  dmarc results: 2026-03-01: 2 groups, 3 messages" in lines
    assert "  dmarc results: 3 groups, 4 messages copied (2 days)" in lines
    assert lines[-1].startswith("done in ")

    async def check_redis() -> None:
        source = SqliteGreylistStore(str(src))
        want_t, want_c, want_wl = await read_all(source)
        await source.close()
        assert EXPIRED.key in want_t and len(want_c) == 3 and len(want_wl) == 2
        del want_t[EXPIRED.key]
        store = RedisGreylistStore(redis_url, timeout=5)
        triplets, clients, wl = await read_all(store)
        assert triplets == want_t == {t.key: t for t in TRIPLETS}  # every field
        assert clients == want_c and [c.count for c in clients.values()] == [1, 2, 3]
        assert wl == want_wl
        assert await store.secret("privacy_key") == key
        assert await store.whitelist_version() > 0
        await store.close()

    asyncio.run(check_redis())
    redis_results = RedisResultsStore(redis_url, timeout=5)
    sqlite_results = SqliteResultsStore(results_path(f"sqlite:///{src}"))
    assert all_results(redis_results) == all_results(sqlite_results)
    assert [r.count for r in all_results(redis_results)] == [2, 1, 1]
    redis_results.close()

    # ... and back to a new SQLite file
    back = tmp_path / "back.db"
    code, out, err = run("migrate", "--from", redis_url, "--to", f"sqlite:///{back}")
    assert code == 0, err
    assert "  greylist triplets: 7 copied" in out.splitlines()

    async def check_back() -> None:
        a, b = SqliteGreylistStore(str(src)), SqliteGreylistStore(str(back))
        ta, ca, wa = await read_all(a)
        tb, cb, wb = await read_all(b)
        del ta[EXPIRED.key]
        assert (ta, ca, wa) == (tb, cb, wb)
        assert await b.secret("privacy_key") == key
        await a.close()
        await b.close()

    asyncio.run(check_back())
    back_results = SqliteResultsStore(results_path(f"sqlite:///{back}"))
    assert all_results(back_results) == all_results(sqlite_results)
    back_results.close()
    sqlite_results.close()


def test_greylisting_continues_on_redis_after_migration(tmp_path: Path,
                                                        redis_url: str) -> None:  # noqa: F811
    """Privacy mode: a triplet first seen on the SQLite host passes on Redis after the
    delay, because the privacy key moved with the hashed triplets."""
    db = tmp_path / "mxguard.db"

    def config(url: str) -> Config:
        return Config(server=ServerConfig(state_dir=str(tmp_path)),
                      storage=StorageConfig(url=url),
                      greylist=dataclasses.replace(GreylistConfig(), privacy=True))

    request = Transaction(stage=Stage.RCPT, client_address="192.0.2.10",
                          sender="alice@sender.example", recipients=["bob@rcpt.example"])
    t0 = time.time()

    async def first_sight() -> None:
        gl = await open_greylister(config(f"sqlite:///{db}"), clock=lambda: t0)
        outcome = await gl.decide(request, t0)
        assert outcome is not None and outcome.reason == "new"
        await gl.close()

    asyncio.run(first_sight())
    code, _, err = run("migrate", "--from", f"sqlite:///{db}", "--to", redis_url)
    assert code == 0, err

    async def retry() -> None:
        gl = await open_greylister(config(redis_url), clock=lambda: t0 + 301)
        outcome = await gl.decide(request, t0 + 301)
        assert outcome is not None and outcome.reason == "passed"
        # control: a triplet never seen is greylisted
        other = Transaction(stage=Stage.RCPT, client_address="192.0.2.10",
                            sender="carol@sender.example", recipients=["bob@rcpt.example"])
        outcome = await gl.decide(other, t0 + 301)
        assert outcome is not None and outcome.reason == "new"
        await gl.close()

    asyncio.run(retry())


def test_results_counts_are_added_and_overlap_reported(tmp_path: Path,
                                                       redis_url: str) -> None:  # noqa: F811
    src = tmp_path / "src.db"
    seed_sqlite(src)
    assert run("migrate", "--from", f"sqlite:///{src}", "--to", redis_url)[0] == 0
    code, out, _ = run("migrate", "--from", f"sqlite:///{src}", "--to", redis_url,
                       "--batch", "100")
    assert code == 0
    assert "the target already had results for 2 of these days: counts were added" in out
    store = RedisResultsStore(redis_url, timeout=5)
    assert [r.count for r in all_results(store)] == [4, 2, 2]
    store.close()
    # --no-results leaves them alone (control)
    code, out, _ = run("migrate", "--from", f"sqlite:///{src}", "--to", redis_url,
                       "--no-results")
    assert code == 0 and "dmarc results" not in out


BAYES_ITEMS = [LearnItem("spam1", [1, 2, 3, 4], True), LearnItem("spam2", [3, 4, 5], True),
               LearnItem("ham1", [4, 5, 6, 7, 8], False)]
BAYES_TOKENS = list(range(1, 10))


def seed_bayes(db: Path) -> None:
    async def go() -> None:
        store = SqliteBayesStore(bayes_sqlite_path(str(db)))
        for i, it in enumerate(BAYES_ITEMS):
            await store.learn([it], int(NOW) - 3600 * (3 - i))
        await store.close()

    asyncio.run(go())


async def bayes_state(store: BayesStore) -> tuple[Any, ...]:
    tc = await store.lookup(BAYES_TOKENS)
    seen = [await store.seen(it.key) for it in BAYES_ITEMS]
    return tc, seen, await store.stats()


def test_bayes_sqlite_to_redis_and_back(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    from mxguard.store.redis_bayes import RedisBayesStore

    src = tmp_path / "src.db"
    seed_sqlite(src)
    seed_bayes(src)
    code, out, err = run("migrate", "--from", f"sqlite:///{src}", "--to", redis_url,
                         "--batch", "3")
    assert code == 0, err
    lines = out.splitlines()
    # progress as it goes: a line per 3 records, then the total
    assert "  bayes tokens: 3" in lines and "  bayes tokens: 6" in lines
    assert "  bayes tokens: 8 copied" in lines
    assert "  bayes learned messages: 3 copied" in lines
    assert "  bayes totals: 2 spam, 1 ham" in lines
    assert lines[-1].startswith("done in ")

    async def check_redis() -> None:
        source = SqliteBayesStore(bayes_sqlite_path(str(src)))
        want = await bayes_state(source)
        await source.close()
        tc, seen, stats = want
        assert (tc.nspam, tc.nham, len(tc.counts)) == (2, 1, 8) and seen == [True, True, False]
        assert (stats.tokens, stats.seen) == (8, 3)
        store = RedisBayesStore(redis_url, timeout=5)
        assert await bayes_state(store) == want  # counts, atimes, records, totals
        # the records moved too: learning a message again counts nothing
        assert await store.learn([BAYES_ITEMS[0]], int(NOW)) == [KNOWN]
        await store.close()

    asyncio.run(check_redis())

    # ... and back to a new SQLite file; a forget there subtracts exactly
    back = tmp_path / "back.db"
    code, out, err = run("migrate", "--from", redis_url, "--to", f"sqlite:///{back}")
    assert code == 0, err
    assert "  bayes tokens: 8 copied" in out.splitlines()

    async def check_back() -> None:
        a = SqliteBayesStore(bayes_sqlite_path(str(src)))
        b = SqliteBayesStore(bayes_sqlite_path(str(back)))
        assert await bayes_state(b) == await bayes_state(a)
        assert await b.forget([BAYES_ITEMS[2]], int(NOW)) == [FORGOTTEN]
        tc = await b.lookup(BAYES_TOKENS)
        assert tc.nham == 0 and sorted(tc.counts) == [1, 2, 3, 4, 5]
        assert (await b.stats()).tokens == 5  # the kept token count was recounted
        await a.close()
        await b.close()

    asyncio.run(check_back())


def test_bayes_missing_in_the_source_is_said(tmp_path: Path,
                                             redis_url: str) -> None:  # noqa: F811
    src = tmp_path / "src.db"
    seed_sqlite(src)
    code, out, err = run("migrate", "--from", f"sqlite:///{src}", "--to", redis_url)
    assert code == 0, err
    assert "  bayes: none in the source" in out.splitlines()


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--from", "sqlite:///x.db", "--to", "sqlite:///x.db"], 2, "the same store"),
    (["--from", "mysql://h/db", "--to", "sqlite:///x.db"], 2, "is not a storage URL"),
    (["--from", "sqlite:///{tmp}/missing.db", "--to", "sqlite:///{tmp}/t.db"], 1,
     "no such database"),
    (["--from", "redis://127.0.0.1:1/0", "--to", "sqlite:///{tmp}/t.db", "--timeout", "1"], 1,
     "127.0.0.1:1/0"),
])
def test_errors_are_one_line(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    got, _, err = run("migrate", *[a.format(tmp=tmp_path) for a in args])
    assert got == code
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_password_is_not_printed(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret").start()
    try:
        src = tmp_path / "src.db"
        seed_sqlite(src)
        code, out, err = run("migrate", "--from", f"sqlite:///{src}", "--to", server.url(0))
        assert code == 0, err
        assert "s3cret" not in out and ":***@127.0.0.1" in out
        c = server.client()
        assert len(list(c.scan_iter(match="mxguard:gl:t:*"))) == len(TRIPLETS)
        c.close()
    finally:
        server.stop()
