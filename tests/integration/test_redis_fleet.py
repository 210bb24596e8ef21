"""Several MX hosts on one Redis: shared greylist, atomic decisions, faults.

Real parts only: redis-server processes on loopback ports (tests/support/redis.py)
and, for the fleet tests, two real ``mxguard serve`` processes
(tests/support/daemon.py) that share one Redis database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.daemon import MxguardProcess, PolicyClient
from tests.support.redis import (  # noqa: F401
    RedisSentinel,
    RedisServer,
    redis_server,
    redis_url,
)

from mxguard.checks import evaluate
from mxguard.checks.greylist import open_greylister
from mxguard.config import Config, GreylistConfig, Mode, ServerConfig, StorageConfig
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Stage, Transaction
from mxguard.store.backends import open_store
from mxguard.store.base import StoreError
from mxguard.store.redis import TTL_GRACE, RedisGreylistStore
from mxguard.store.redis_conn import RETRY_AFTER, describe_url, parse_sentinel_url
from mxguard.testing.ports import free_port

DELAY = 2  # greylist delay of the fleet daemons (seconds)
REDIS_TIMEOUT = 0.5  # [storage] redis_timeout of the fleet daemons
T0 = 1_795_000_000.0


# ---------------------------------------------------------------- two daemons, one Redis


def fleet_daemon(tmp: Path, name: str, url: str) -> MxguardProcess:
    workdir = tmp / name
    workdir.mkdir()
    proc = MxguardProcess(workdir)
    proc.config.write_text(
        f'[server]\nstate_dir = "{workdir}"\n'
        f'[policy]\nlisten = "127.0.0.1:{proc.port}"\n'
        "[milter]\nenabled = false\n"
        # no check here resolves anything; a closed loopback port keeps DNS on-box anyway
        f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 1\n'
        f'[storage]\nurl = "{url}"\nredis_timeout = {REDIS_TIMEOUT}\n'
        "fail_open_log_interval = 60\n"
        '[helo]\nmode = "off"\n[spf]\nmode = "off"\n'
        f"[greylist]\ndelay = {DELAY}\nauto_whitelist_clients = 0\n")
    return proc.start()


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer  # noqa: F811
          ) -> Iterator[tuple[RedisServer, MxguardProcess, MxguardProcess]]:
    a = fleet_daemon(tmp_path, "mx1", redis_server.url(0))
    try:
        b = fleet_daemon(tmp_path, "mx2", redis_server.url(0))
    except BaseException:
        a.stop()
        raise
    yield redis_server, a, b
    for d in (a, b):
        d.stop()


def ask(client: PolicyClient, n: int | str, tag: str = "t", instance: str = "") -> str:
    return client.ask(client_address="198.51.100.7", sender=f"{tag}{n}@sender.test",
                      recipient="user@dest.test", instance=instance or f"{tag}.{n}")


def deferred(reply: str) -> bool:
    return reply.startswith("DEFER_IF_PERMIT 4.2.0")


def test_triplet_first_seen_by_one_host_passes_on_the_other(
        fleet: tuple[RedisServer, MxguardProcess, MxguardProcess]) -> None:
    _, a, b = fleet
    ca, cb = a.client(), b.client()
    assert deferred(ask(ca, "x"))             # mx1 sees it first
    assert deferred(ask(cb, "x"))             # mx2: early retry, still deferred
    time.sleep(DELAY + 0.3)
    reply = ask(cb, "x")                      # the retry lands on mx2
    assert not deferred(reply) and reply.startswith("PREPEND X-Greylist: delayed 2 ")
    assert ask(ca, "x") == "DUNNO"            # and mx1 knows it passed (no second header)
    assert deferred(ask(cb, "never-seen"))    # control: a new triplet is greylisted
    ca.close()
    cb.close()


def test_two_hosts_deciding_at_once_agree(
        fleet: tuple[RedisServer, MxguardProcess, MxguardProcess]) -> None:
    """The same retry arriving at both hosts at once passes once with one header."""
    _, a, b = fleet
    clients = [d.client() for d in (a, b) for _ in range(5)]
    assert all(deferred(ask(c, "same")) for c in clients)
    time.sleep(DELAY + 0.3)
    replies: list[str] = []
    barrier = threading.Barrier(len(clients))

    def retry(c: PolicyClient) -> None:
        barrier.wait(5)
        replies.append(ask(c, "same", instance=f"i{id(c)}"))

    threads = [threading.Thread(target=retry, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(replies) == 10 and not any(deferred(r) for r in replies)
    assert sum(r.startswith("PREPEND X-Greylist") for r in replies) == 1, replies
    for c in clients:
        c.close()


def error_lines(d: MxguardProcess) -> int:
    return sum(" ERROR check=greylist error=StoreError" in ln
               for ln in d.log_text().splitlines())


def timed(client: PolicyClient, n: int | str, tag: str) -> tuple[str, float]:
    t = time.monotonic()
    reply = ask(client, n, tag)
    return reply, time.monotonic() - t


def test_redis_stopped_hung_and_restarted_empty(
        fleet: tuple[RedisServer, MxguardProcess, MxguardProcess]) -> None:
    server, a, b = fleet
    conns = {d: PolicyClient(d.port, timeout=REDIS_TIMEOUT + 5) for d in (a, b)}
    for c in conns.values():
        assert deferred(ask(c, "before"))
    time.sleep(DELAY + 0.3)
    assert not deferred(ask(conns[a], "before"))  # passed before the outage

    # 1. Redis stopped: every answer is DUNNO (fail_action), promptly; one log line
    server.stop()
    worst = 0.0
    for d, c in conns.items():
        for i in range(20):
            reply, took = timed(c, i, f"down-{d.port}-")
            assert reply == "DUNNO"
            worst = max(worst, took)
    assert worst < REDIS_TIMEOUT + 2.0, worst
    print(f"redis stopped: slowest of 40 answers {worst * 1000:.0f} ms")

    # 2. Redis hung (SIGSTOP): commands time out after redis_timeout, still DUNNO
    server.start()
    assert server.proc is not None
    time.sleep(RETRY_AFTER + 0.1)
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        worst = 0.0
        for d, c in conns.items():
            for i in range(5):
                reply, took = timed(c, i, f"hung-{d.port}-")
                assert reply == "DUNNO"
                worst = max(worst, took)
        assert worst < REDIS_TIMEOUT + 2.0, worst
        print(f"redis hung: slowest of 10 answers {worst * 1000:.0f} ms")
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    for d in (a, b):
        assert d.proc is not None and d.proc.poll() is None  # no crash
        assert error_lines(d) == 1, d.log_text()[-3000:]  # once per fail_open_log_interval

    # 3. Redis restarted empty: greylisting starts over on the same connections
    server.restart()
    for d, c in conns.items():
        deadline = time.monotonic() + 10
        i = 0
        while not deferred(ask(c, i, f"after-{d.port}-")):
            assert time.monotonic() < deadline, "greylisting did not resume"
            i += 1
            time.sleep(0.1)
        assert deferred(ask(c, "before"))  # the state was lost: greylisted again
        d.wait_log("greylist: store available again")
    assert all(error_lines(d) == 1 for d in (a, b))
    for c in conns.values():
        c.close()


# ---------------------------------------------------------------- Bayes shared by the fleet

SPAMMY = ("Cheap pills online pharmacy discount viagra cialis casino jackpot winner "
          "claim your prize now limited offer click here unsubscribe\r\n") * 5
HAMMY = ("Hi Bob, the meeting notes from Tuesday are attached; the release branch "
         "builds again and the test suite passes. See you at standup tomorrow.\r\n") * 5


def _milter_client_module() -> Any:
    """bench/milter_client.py: the MTA side of the milter protocol, as Postfix speaks it."""
    path = Path(__file__).resolve().parents[2] / "bench" / "milter_client.py"
    name = "mxguard_bench_milter_client"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def bayes_daemon(tmp: Path, name: str, url: str) -> MxguardProcess:
    """A fleet host with its milter door on: content scoring and Bayes, nothing that
    needs DNS (a closed loopback port as nameserver keeps it on-box anyway)."""
    workdir = tmp / name
    workdir.mkdir()
    proc = MxguardProcess(workdir)
    proc.config.write_text(
        f'[server]\nstate_dir = "{workdir}"\n'
        f'[policy]\nlisten = "127.0.0.1:{proc.port}"\n'
        f'[milter]\nlisten = "127.0.0.1:{proc.milter_port}"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 1\n'
        f'[storage]\nurl = "{url}"\nredis_timeout = 2\n'
        '[helo]\nmode = "off"\n[spf]\nmode = "off"\n[greylist]\nmode = "off"\n'
        '[dkim]\nmode = "off"\ninternal_hosts = []\n[dmarc]\nmode = "off"\n'
        "[bayes]\nmin_spam = 1\nmin_ham = 1\nautolearn = false\n")
    return proc.start()


def eml(kind: str, i: int, body: str) -> bytes:
    return (f"From: x{i}@{kind}.example\r\nTo: bob@example.test\r\nSubject: test {i}\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{kind}{i}@learn.test>\r\n"
            f"\r\n{body}").encode()


async def spam_status(port: int, raw: bytes) -> str:
    mc = _milter_client_module()
    deadline = time.monotonic() + 10
    while True:  # the milter door opens next to the policy door, a moment later at most
        client = mc.MilterClient(f"inet:127.0.0.1:{port}", timeout=20)
        try:
            assert await client.open(mc.Client(address="198.51.100.7")) is None
            break
        except OSError:
            await client.close()
            assert time.monotonic() < deadline, "milter door did not open"
            await asyncio.sleep(0.1)
    try:
        outcome = await client.message(mc.Message.parse(raw, "alice@sender.test",
                                                        ["bob@example.test"]))
    finally:
        await client.close()
    assert outcome.delivered, outcome
    (status,) = outcome.added("X-Spam-Status")
    return " ".join(status.split())


def test_bayes_learned_through_one_host_is_used_by_the_other(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    from click.testing import CliRunner

    from mxguard.cli.learn import learn

    a = bayes_daemon(tmp_path, "mx1", redis_server.url(0))
    try:
        b = bayes_daemon(tmp_path, "mx2", redis_server.url(0))
    except BaseException:
        a.stop()
        raise
    try:
        before = asyncio.run(spam_status(b.milter_port, eml("spam", 9, SPAMMY)))
        assert "BAYES" not in before  # nothing learned yet: Bayes does not score
        # learned with host A's configuration (its [storage] url), while both run
        for kind, text in (("spam", SPAMMY), ("ham", HAMMY)):
            files = []
            for i in range(3):
                f = tmp_path / f"{kind}{i}.eml"
                f.write_bytes(eml(kind, i, text))
                files.append(str(f))
            out = CliRunner().invoke(learn, [f"--{kind}", "--no-progress", "-c", str(a.config),
                                             *files])
            assert out.exit_code == 0, out.output
        c = redis_server.client()
        try:
            assert c.hmget("mxguard:bayes:totals", "nspam", "nham") == [b"3", b"3"]
        finally:
            c.close()
        # host B scores with what host A learned
        spam = asyncio.run(spam_status(b.milter_port, eml("new", 1, SPAMMY)))
        ham = asyncio.run(spam_status(b.milter_port, eml("new", 2, HAMMY)))  # control
        assert re.search(r"\bBAYES_9\d+\b", spam), spam
        assert spam.startswith("Yes,"), spam
        assert "BAYES_00" in ham and ham.startswith("No,"), ham
        for d in (a, b):
            assert "bayes: disabled" not in d.log_text()
    finally:
        for d in (a, b):
            d.stop()


# ---------------------------------------------------------------- store level: two hosts


async def test_concurrent_hosts_get_consistent_answers(redis_url: str) -> None:  # noqa: F811
    hosts = [RedisGreylistStore(redis_url, timeout=5) for _ in range(4)]
    try:
        # first sight by several hosts at (nearly) the same time: one first-seen time
        await asyncio.gather(*(h.record_first_seen("k", T0 + i * 0.01, T0 + 500)
                               for i, h in enumerate(hosts)))
        rec = await hosts[3].get_triplet("k")
        assert rec is not None and not rec.passed
        firsts = {T0 + i * 0.01 for i in range(4)}
        assert rec.first_seen in firsts
        # all hosts retry at once: exactly one makes the transition
        wins = await asyncio.gather(*(h.mark_passed("k", T0 + 400, T0 + 9000)
                                      for h in hosts for _ in range(10)))
        assert sum(wins) == 1
        # one delivery counted once per interval, whoever counts it
        await asyncio.gather(*(h.count_client("c", T0 + 400, T0 + 9000, 3600)
                               for h in hosts for _ in range(10)))
        client = await hosts[0].get_client("c")
        assert client is not None and client.count == 1
        # control: a retry window later a first sight does replace the record
        await hosts[0].record_first_seen("k2", T0, T0 + 500)
        await hosts[1].record_first_seen("k2", T0 + 3 * 86400, T0 + 3 * 86400 + 500)
        rec = await hosts[2].get_triplet("k2")
        assert rec is not None and rec.first_seen == T0 + 3 * 86400
    finally:
        for h in hosts:
            await h.close()


async def test_records_carry_redis_ttls(redis_url: str) -> None:  # noqa: F811
    store = RedisGreylistStore(redis_url, timeout=5)
    await store.record_first_seen("k", T0, T0 + 600)
    await store.count_client("c", T0, T0 + 3600, 60)
    await store.add_whitelist(_entry())
    server_client = _sync(redis_url)
    try:
        assert 600_000 < server_client.pttl("mxguard:gl:t:k") <= (600 + TTL_GRACE) * 1000
        assert 3_600_000 < server_client.pttl("mxguard:gl:c:c") <= (3600 + TTL_GRACE) * 1000
        assert server_client.pttl("mxguard:gl:wl") == -1  # control: the whitelist stays
        assert await store.mark_passed("k", T0 + 300, T0 + 86400)
        assert server_client.pttl("mxguard:gl:t:k") > 86_000_000  # refreshed on pass
    finally:
        server_client.close()
        await store.close()


def _entry():  # type: ignore[no-untyped-def]
    from mxguard.store.base import WhitelistEntry

    return WhitelistEntry("192.0.2.1", "client", T0)


def _sync(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url)


async def test_restart_empty_keeps_secret_and_whitelist_versions_apart(
        redis_url: str) -> None:  # noqa: F811
    """After Redis lost everything: a running daemon puts its privacy key back (a host
    started later derives the same hashed keys), and a new whitelist never carries a
    version number the daemon cached before."""
    store = RedisGreylistStore(redis_url, timeout=5)
    other = RedisGreylistStore(redis_url, timeout=5)
    try:
        key = await store.secret("privacy_key")
        await store.add_whitelist(_entry())
        before = await store.whitelist_version()
        client = _sync(redis_url)
        client.flushall()  # what an empty restart leaves
        client.close()
        store._secrets_checked = 0.0  # the periodic check is due
        assert await store.whitelist_version() == 0  # control: the version went with it
        assert await other.secret("privacy_key") == key  # put back by the first daemon
        await other.add_whitelist(_entry())
        assert await store.whitelist_version() not in (0, before)
    finally:
        await store.close()
        await other.close()


async def test_store_faults_fail_fast_and_recover(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    store = RedisGreylistStore(server.url(0), timeout=REDIS_TIMEOUT)
    try:
        await store.record_first_seen("k", T0, T0 + 600)
        server.stop()
        t = time.monotonic()
        with pytest.raises(StoreError, match=r"redis 127\.0\.0\.1:\d+/0: lookup failed"):
            await store.lookup("k", "c")
        with pytest.raises(StoreError, match="unavailable"):  # fails at once meanwhile
            await store.record_first_seen("k2", T0, T0 + 600)
        assert time.monotonic() - t < REDIS_TIMEOUT + 1.0
        assert store.errors == 2 and store.conn.outages == 1
        server.start()  # empty
        await asyncio.sleep(RETRY_AFTER + 0.05)
        assert await store.get_triplet("k") is None  # greylisting starts over
        await store.record_first_seen("k", T0, T0 + 600)
        assert await store.get_triplet("k") is not None
        assert store.conn.available
    finally:
        await store.close()
        server.stop()


async def test_greylister_logs_an_outage_once_per_interval(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path).start()
    cfg = Config(server=ServerConfig(state_dir=str(tmp_path)),
                 storage=StorageConfig(url=server.url(0), redis_timeout=REDIS_TIMEOUT,
                                       fail_open_log_interval=60))
    cfg = dataclasses.replace(cfg, helo=dataclasses.replace(cfg.helo, mode=Mode.OFF),
                              spf=dataclasses.replace(cfg.spf, mode=Mode.OFF),
                              greylist=dataclasses.replace(GreylistConfig(), delay=300))
    gl = await open_greylister(cfg)
    rt = Runtime(config=cfg, resolver=None, services={"greylist": gl})  # type: ignore[arg-type]

    def tx(i: int) -> Transaction:
        return Transaction(stage=Stage.RCPT, client_address="192.0.2.1",
                           sender=f"s{i}@a.example", recipients=["r@b.example"])

    logger = logging.getLogger("mxguard")
    own_handler = not logger.propagate  # logs.setup() ran in this process: caplog misses it
    if own_handler:
        logger.addHandler(caplog.handler)
    try:
        assert (await evaluate(tx(0), rt, Stage.RCPT)).decision is not None  # greylisted
        server.stop()
        verdicts = [await evaluate(tx(i), rt, Stage.RCPT) for i in range(1, 51)]
        assert all(v.decision is None and v.reasons == ["greylist:error:StoreError"]
                   for v in verdicts)  # fail_action DUNNO: accepted, not greylisted
        errors = [r for r in caplog.records if "check=greylist error=StoreError" in r.message]
        assert len(errors) == 1 and gl.store_errors == 50
        server.start()
        await asyncio.sleep(RETRY_AFTER + 0.05)
        assert (await evaluate(tx(99), rt, Stage.RCPT)).decision is not None  # resumed
        back = [r for r in caplog.records if "store available again" in r.message]
        assert len(back) == 1 and "50 requests" in back[0].message
    finally:
        if own_handler:
            logger.removeHandler(caplog.handler)
        await gl.close()
        server.stop()


# ---------------------------------------------------------------- URLs, TLS, Sentinel


@pytest.mark.parametrize(("url", "sentinels", "master", "db", "password"), [
    ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster/2",
     [("10.0.0.1", 26379), ("10.0.0.2", 26380)], "mymaster", 2, None),
    ("redis+sentinel://:pw@s1/mx", [("s1", 26379)], "mx", 0, "pw"),
    ("redis+sentinel://[::1]:5000/m/1", [("::1", 5000)], "m", 1, None),
])
def test_sentinel_urls(url: str, sentinels: list[tuple[str, int]], master: str, db: int,
                       password: str | None) -> None:
    s = parse_sentinel_url(url)
    assert (s.sentinels, s.master, s.db, s.password) == (sentinels, master, db, password)


@pytest.mark.parametrize("url", ["redis+sentinel://h:1", "redis+sentinel:///m/0",
                                 "redis+sentinel://h:x/m", "redis+sentinel://h/m/x"])
def test_bad_sentinel_urls(url: str) -> None:
    with pytest.raises(StoreError, match=r"storage\.url"):
        parse_sentinel_url(url)


@pytest.mark.parametrize(("url", "where"), [
    ("redis://:secret@10.1.1.1:6380/3", "10.1.1.1:6380/3"),
    ("rediss://cache.example/0", "cache.example:6379/0"),
    ("redis+sentinel://a:1,b:2/mx/4", "sentinel mx/4"),
])
async def test_open_store_picks_redis(url: str, where: str) -> None:
    store = open_store(Config(storage=StorageConfig(url=url, redis_timeout=0.3)))
    assert isinstance(store, RedisGreylistStore)
    assert describe_url(url) == where and "secret" not in store.conn.where
    await store.close()


async def test_password_in_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="pa:ss").start()
    try:
        good = RedisGreylistStore(f"redis://:pa%3Ass@127.0.0.1:{server.port}/1", timeout=5)
        await good.record_first_seen("k", T0, T0 + 60)
        assert await good.get_triplet("k") is not None
        await good.close()
        bad = RedisGreylistStore(f"redis://:wrong@127.0.0.1:{server.port}/1", timeout=5)
        with pytest.raises(StoreError, match="failed") as err:
            await bad.get_triplet("k")
        assert "wrong" not in str(err.value)
        await bad.close()
    finally:
        server.stop()


def _tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, made with `cryptography`."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mxguard test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


async def test_rediss_tls(tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    tls_port = free_port()
    server = RedisServer(tmp_path, extra=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"])
    try:
        server.start()
    except RuntimeError as exc:  # a redis-server built without TLS
        if "tls" in str(exc).lower():
            pytest.skip(f"redis-server has no TLS support: {exc}")
        raise
    try:
        store = RedisGreylistStore(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}",
                                   timeout=5)
        await store.record_first_seen("k", T0, T0 + 60)
        assert await store.get_triplet("k") is not None
        await store.close()
        c = server.client()  # the plain port sees what came in over TLS
        assert c.exists("mxguard:gl:t:k") == 1
        c.close()
        # control: without the CA the server's certificate is refused
        untrusted = RedisGreylistStore(f"rediss://127.0.0.1:{tls_port}/0", timeout=5)
        with pytest.raises(StoreError, match="failed"):
            await untrusted.get_triplet("k")
        await untrusted.close()
    finally:
        server.stop()


async def test_sentinel_finds_the_master(tmp_path: Path) -> None:
    master = RedisServer(tmp_path).start()
    sentinel = RedisSentinel(tmp_path, master)
    try:
        sentinel.start()
        store = RedisGreylistStore(sentinel.url(2), timeout=5)
        await store.record_first_seen("k", T0, T0 + 60)
        assert await store.get_triplet("k") is not None
        await store.close()
        c = master.client(db=2)
        assert c.exists("mxguard:gl:t:k") == 1  # written on the master Sentinel named
        c.close()
    finally:
        sentinel.stop()
        master.stop()
