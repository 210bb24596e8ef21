#!/usr/bin/env python3
"""Soak: one ``mxguard serve`` under a long policy and milter load, RSS sampled.

    python bench/soak.py [--policy 1000000] [--milter 50000] [--conns 10] [--quick]

Starts ``mxguard serve`` (``workers = 1``, a temporary config, SQLite storage in
a temporary directory, a loopback test DNS server for every lookup it makes:
nothing leaves 127.0.0.1), then:

1. ``--policy`` policy requests over ``--conns`` connections, one request in
   flight per connection as Postfix does: a mix of new triplets (50 %), known
   triplets (a fixed set passed before the run: 40 %) and HELO variants (10 %:
   IP literal, bare name, localhost, unresolvable and resolvable names), at
   RCPT; HELO checks and greylisting on, SPF off at the policy door (the
   milter does SPF for the verify half).
2. ``--milter`` milter messages of 2 KB over ``--conns`` connections
   (bench/milter_client.py, a new milter session every 20 messages), sign
   (internal client) and verify (signed incoming mail: DKIM, SPF, DMARC)
   alternating.

The daemon's VmRSS is sampled every ~2 s. Printed: RSS at every 10 % of each
phase, min/median/max, the slopes (MB per 100k requests, per 10k messages;
least-squares fits over each phase after its first 10 % and over its second
half, when the bounded caches are full) and a verdict line from the second half
("RSS flat" or "RSS grows by X MB"). Never fails on memory; exits 1 on wrong
answers (no DKIM-Signature, no dkim=pass, a policy action missing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src"), str(ROOT / "bench")]

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from milter_bench import (  # noqa: E402
    DOMAIN,
    SELECTOR,
    check_signed,
    check_verified,
    make_corpus,
)
from milter_client import Client, MilterClient  # noqa: E402
from policy_bench import request, status_mb  # noqa: E402
from tests.support.daemon import MxguardProcess  # noqa: E402

from mxguard.auth.dkim_keys import SigningKey, public_key_record  # noqa: E402

KNOWN = 1000  # known triplets per connection pool (policy_bench's "known" set)
HELOS = ("[198.51.100.9]", "localhost", "mailhost", "mx.nowhere.invalid",
         f"mail.{DOMAIN}", "198.51.100.9", "MAIL.BENCH.EXAMPLE", "smtp.unknown.test")


def vmrss_mb(pid: int) -> float:
    return status_mb(pid, "VmRSS")


class Progress:
    def __init__(self) -> None:
        self.phase = "start"
        self.done = 0


class Sampler(threading.Thread):
    def __init__(self, pid: int, progress: Progress, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.progress, self.every = pid, progress, every
        self.samples: list[tuple[float, str, int, float]] = []  # t, phase, done, MB
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        self.samples.append((time.monotonic() - self.t0, self.progress.phase,
                             self.progress.done, vmrss_mb(self.pid)))

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.sample()


# ------------------------------------------------------------------ policy

def policy_req(i: int, conn: int) -> tuple[bytes, bool]:
    """(request, is_known). i is the request's global number on this connection."""
    r = i % 10
    if r < 5:
        return request(i, conn, "new"), False
    if r < 9:
        return request(i, conn, "known"), True
    raw = request(i, conn, "new").replace(
        f"helo_name=mail{conn}.bench.test".encode(),
        f"helo_name={HELOS[(i // 10) % len(HELOS)]}".encode())
    return raw, False


async def policy_conn(port: int, conn: int, count: int, progress: Progress,
                      replies: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(count):
            raw, _ = policy_req(i, conn)
            writer.write(raw)
            line = await reader.readuntil(b"\n\n")
            action = line.split(b"=", 1)[1].split(b" ", 1)[0].strip().decode()
            replies[action] = replies.get(action, 0) + 1
            progress.done += 1
    finally:
        writer.close()


async def policy_warm(port: int, conns: int) -> None:
    """Pass the known set: first sight (deferred), then the retry after the delay."""
    async def one(conn: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for n in range(KNOWN):
            writer.write(request(n, conn, "known"))
            await reader.readuntil(b"\n\n")
        writer.close()
    for _ in range(2):
        await asyncio.gather(*(one(c) for c in range(conns)))
        await asyncio.sleep(1.5)


# ------------------------------------------------------------------ milter

async def milter_conn(target: str, corpus, conn: int, count: int, per_session: int,
                      progress: Progress, tally) -> None:
    plain, signed = corpus.plain["2KB"], corpus.signed["2KB"]
    sent = 0
    while sent < count:
        verify = (sent // per_session + conn) % 2 == 1
        client = (Client(f"198.51.100.{conn + 1}", 40000 + conn, "", f"mail.{DOMAIN}")
                  if verify else Client("127.0.0.1", 40000 + conn, "", f"ws{conn}.{DOMAIN}"))
        mc = MilterClient(target, queue_prefix=f"{conn:X}S")
        try:
            if await mc.open(client) is not None:
                tally.bad("connection refused")
                return
            for _ in range(min(per_session, count - sent)):
                k = (sent * 7 + conn) % len(plain)
                if verify:
                    check_verified(await mc.message(signed[k]), tally)
                else:
                    check_signed(await mc.message(plain[k]), tally)
                sent += 1
                progress.done += 1
        finally:
            await mc.close()


# ------------------------------------------------------------------ report

def fit(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of MB over units."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def report(samples: list[tuple[float, str, int, float]], totals: dict[str, int],
           units: dict[str, tuple[int, str]]) -> None:
    print(f"{'phase':<8}{'progress':>9}{'done':>10}{'elapsed s':>11}{'VmRSS MB':>10}")
    growth = 0.0
    slopes = []
    for phase, total in totals.items():
        ps = [s for s in samples if s[1] == phase]
        if not ps or not total:
            continue
        for tenth in range(0, 11):
            want = total * tenth / 10
            t, _, done, mb = min(ps, key=lambda s, w=want: abs(s[2] - w))
            print(f"{phase:<8}{tenth * 10:>8}%{done:>10,}{t:>11.0f}{mb:>10.1f}")
        per, label = units[phase]
        warm = [(s[2], s[3]) for s in ps if s[2] >= total * 0.1]
        # bounded caches (DNS, header memory, SQLite pages, tokenizer) fill up
        # during the first half: the verdict looks at the second half only
        steady = [(s[2], s[3]) for s in ps if s[2] >= total * 0.5]
        slope = fit(steady)
        span = (max(p[0] for p in steady) - min(p[0] for p in steady)) if steady else 0
        growth += max(0.0, slope * span)
        slopes.append(f"{phase} {fit(warm) * per:+.2f} after 10 %, {slope * per:+.2f} "
                      f"over the second half, MB per {label}")
        mbs = [s[3] for s in ps]
        print(f"{phase:<8} min {min(mbs):.1f}  median {statistics.median(mbs):.1f}  "
              f"max {max(mbs):.1f} MB  ({len(ps)} samples)")
    allmb = [s[3] for s in samples]
    print(f"overall  min {min(allmb):.1f}  median {statistics.median(allmb):.1f}  "
          f"max {max(allmb):.1f} MB; slopes: " + "; ".join(slopes))
    limit = max(3.0, 0.03 * statistics.median(allmb))
    print("verdict: RSS flat" if growth <= limit
          else f"verdict: RSS grows by {growth:.1f} MB over the second half of the phases")


# ------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=int, default=1_000_000)
    ap.add_argument("--milter", type=int, default=50_000)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--per-session", type=int, default=20)
    ap.add_argument("--every", type=float, default=2.0, help="RSS sampling period, s")
    ap.add_argument("--quick", action="store_true", help="100k policy requests, 5k messages")
    args = ap.parse_args()
    if args.quick:
        args.policy, args.milter = 100_000, 5_000
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    from mxguard.testing.dns import DNSServer

    started = time.monotonic()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    corpus = make_corpus(SigningKey(DOMAIN, SELECTOR, key), {"2KB": 2 * 1024})
    zone = {
        f"{SELECTOR}._domainkey.{DOMAIN}": [("TXT", public_key_record(key))],
        DOMAIN: [("TXT", "v=spf1 ip4:198.51.100.0/24 ip4:127.0.0.0/8 -all")],
        f"_dmarc.{DOMAIN}": [("TXT", "v=DMARC1; p=reject")],
        f"mail.{DOMAIN}": [("A", "198.51.100.9")],
        "bench.test": [("TXT", "v=spf1 -all")],
        "*.bench.test": [("A", "198.51.100.9")],
    }
    tmp = Path(tempfile.mkdtemp(prefix="mxgsoak-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    keyfile = tmp / "dkim.key"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(keyfile, 0o600)
    dns = DNSServer(zone, ttl=3600).start()
    mx = MxguardProcess(tmp, (
        "[server]\nworkers = 1\n"
        f'[dns]\nnameservers = ["{dns.address}"]\n'
        '[log]\nlevel = "warning"\n'
        "[greylist]\ndelay = 1\nauto_whitelist_clients = 0\n"
        '[spf]\nmode = "off"\n'
        f'[dkim]\nkeys = ["{DOMAIN}:{SELECTOR}:{keyfile}"]\ninternal_hosts = ["127.0.0.1/32"]\n'))
    mx.config.write_text(mx.config.read_text().replace(
        "[milter]\n", '[milter]\nauthserv_id = "mx.bench.example"\n'))
    errors: list[str] = []
    try:
        mx.start()
        assert mx.proc is not None
        pid = mx.proc.pid
        print(f"soak: mxguard serve pid {pid} (workers = 1), {args.conns} connections, "
              f"{args.policy:,} policy requests then {args.milter:,} milter messages "
              f"(2 KB, sign/verify), VmRSS every {args.every:g} s; DNS {dns.address}",
              flush=True)
        asyncio.run(policy_warm(mx.port, args.conns))
        progress = Progress()
        sampler = Sampler(pid, progress, args.every)
        sampler.sample()
        sampler.start()
        progress.phase = "policy"
        replies: dict[str, int] = {}
        per = -(-args.policy // args.conns)
        t0 = time.monotonic()

        async def run_policy() -> None:
            await asyncio.gather(*(policy_conn(mx.port, c, per, progress, replies)
                                   for c in range(args.conns)))
        asyncio.run(run_policy())
        dt_p = time.monotonic() - t0
        sampler.sample()
        print(f"policy: {progress.done:,} requests in {dt_p:.0f} s = "
              f"{progress.done / dt_p:,.0f} req/s; actions {dict(sorted(replies.items()))}",
              flush=True)
        if sum(replies.values()) != progress.done:
            errors.append("policy: replies missing")
        from milter_bench import Tally
        tally = Tally()
        progress.phase, progress.done = "milter", 0
        sampler.sample()
        per = -(-args.milter // args.conns)
        t0 = time.monotonic()

        async def run_milter() -> None:
            await asyncio.gather(*(milter_conn(f"inet:127.0.0.1:{mx.milter_port}", corpus, c,
                                               per, args.per_session, progress, tally)
                                   for c in range(args.conns)))
        asyncio.run(run_milter())
        dt_m = time.monotonic() - t0
        sampler.stop()
        print(f"milter: {tally.messages:,} messages in {dt_m:.0f} s = "
              f"{tally.messages / dt_m:,.0f} msgs/s; signed {tally.signed:,}, "
              f"dkim=pass {tally.passed:,}, wrong {len(tally.wrong)}", flush=True)
        if tally.wrong:
            errors.append(f"milter: {len(tally.wrong)} wrong; first: "
                          f"{next((w for w in tally.wrong if w), '')[:300]}")
        report(sampler.samples, {"policy": progress_total(sampler, "policy"),
                                 "milter": progress_total(sampler, "milter")},
               {"policy": (100_000, "100k requests"), "milter": (10_000, "10k messages")})
        print(f"daemon peak RSS (VmHWM) {peak_mb(pid):.1f} MB; "
              f"total time {time.monotonic() - started:.0f} s", flush=True)
    finally:
        mx.stop()
        dns.stop()
        if errors:
            print(mx.log_text()[-2000:], file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        print("WRONG RESULTS:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


def progress_total(sampler: Sampler, phase: str) -> int:
    return max((s[2] for s in sampler.samples if s[1] == phase), default=0)


def peak_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
