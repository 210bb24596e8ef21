#!/usr/bin/env python3
"""Greylist storage benchmark: the policy door on SQLite vs Redis, same run.

Starts ``mxguard serve`` twice on loopback -- once on a SQLite file, once on a
private ``redis-server`` (no persistence) -- and drives each with the workload
of bench/policy_bench.py (its functions are reused): new triplets (a first
sight: lookup + write) and known, passed triplets (lookup only), ``--conns``
connections with one request in flight each, as Postfix does. Prints for each
store: median req/s of ``--runs`` runs, server CPU per request (mxguard, and
redis-server's own for Redis), and the round trip of single requests on one
idle connection (p50/p99), then what Redis adds per request. Never fails on
time.

    python bench/storage_bench.py [--runs 3] [--seconds 3] [--conns 10] [--latency 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_bench import (  # bench/ is on sys.path (above)
    cpu_seconds,
    drive,
    free_port,
    request,
    stop,
    wait_port,
)

COMMON = ('[helo]\nmode = "off"\n[spf]\nmode = "off"\n[milter]\nenabled = false\n'
          "[greylist]\ndelay = 1\nauto_whitelist_clients = 0\n")


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(exe):
        sys.exit("redis-server not found (scripts/install-test-deps.sh installs it)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--daemonize", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "redis-server")
    return proc, port


def start_mxguard(tmp: Path, name: str, url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'[policy]\nlisten = "127.0.0.1:{port}"\n'
                   f'[server]\nstate_dir = "{tmp}"\n'
                   f'[storage]\nurl = "{url}"\n' + COMMON)
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, "-m", "mxguard", "serve", "--config", str(cfg)],
                            stdout=log, stderr=log)
    wait_port(port, proc, f"mxguard ({name})")
    return proc, port


async def round_trips(port: int, kind: str, n: int, offset: int) -> list[float]:
    """Seconds per request, one connection, one request at a time (no queueing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for i in range(offset, offset + n):
            data = request(i, 0, kind)
            t = time.perf_counter()
            writer.write(data)
            await reader.readuntil(b"\n\n")
            out.append(time.perf_counter() - t)
    finally:
        writer.close()
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def measure(name: str, port: int, pid: int, redis_pid: int | None,
            args: argparse.Namespace) -> dict[str, float]:
    for _ in range(2):  # first sight, then the retry that passes the known set
        asyncio.run(drive(port, "known", 60, args.conns, 0, limit=1000))
        time.sleep(1.5)
    out: dict[str, float] = {}
    for kind in ("new", "known"):
        rates, cpus, rcpus = [], [], []
        replies: dict[str, int] = {}
        for run in range(args.runs):
            cpu0 = cpu_seconds(pid)
            r0 = cpu_seconds(redis_pid) if redis_pid else 0.0
            rate, replies = asyncio.run(drive(port, kind, args.seconds, args.conns,
                                              offset=(run + 1) * 10_000_000))
            total = max(sum(replies.values()), 1)
            rates.append(rate)
            cpus.append((cpu_seconds(pid) - cpu0) / total * 1e6)
            if redis_pid:
                rcpus.append((cpu_seconds(redis_pid) - r0) / total * 1e6)
        rtt = asyncio.run(round_trips(port, kind, args.latency, 50_000_000))
        out[kind] = statistics.median(rates)
        out[kind + "_cpu"] = statistics.median(cpus)
        out[kind + "_rcpu"] = statistics.median(rcpus) if rcpus else 0.0
        out[kind + "_p50"] = pct(rtt, 50) * 1e6
        out[kind + "_p99"] = pct(rtt, 99) * 1e6
        redis_cpu = f" + redis-server {out[kind + '_rcpu']:.0f}" if redis_pid else ""
        print(f"  {name:6s} {kind:5s} triplets: median {out[kind]:8.0f} req/s "
              f"(runs: {', '.join(f'{r:.0f}' for r in rates)}); server CPU "
              f"{out[kind + '_cpu']:.0f}{redis_cpu} us/req; 1-conn round trip "
              f"p50 {out[kind + '_p50']:.0f} us, p99 {out[kind + '_p99']:.0f} us; "
              f"replies {replies}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--latency", type=int, default=2000,
                    help="requests of the one-connection round-trip measurement")
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(f"storage benchmark: greylist policy requests, {args.conns} connections, "
          f"{args.runs} runs x {args.seconds:g} s, {os.cpu_count()} cores (load generator, "
          "mxguard and redis-server share the machine)", flush=True)
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mxguard-storage-bench-") as d:
        tmp = Path(d)
        proc, port = start_mxguard(tmp, "sqlite", f"sqlite:///{tmp}/mxguard.db")
        try:
            res["sqlite"] = measure("sqlite", port, proc.pid, None, args)
        finally:
            stop(proc)
        redis, rport = start_redis(tmp)
        try:
            proc, port = start_mxguard(tmp, "redis", f"redis://127.0.0.1:{rport}/0")
            try:
                res["redis"] = measure("redis", port, proc.pid, redis.pid, args)
            finally:
                stop(proc)
        finally:
            stop(redis)
    s, r = res["sqlite"], res["redis"]
    for kind in ("new", "known"):
        print(f"  redis vs sqlite, {kind:5s} triplets: {r[kind] / s[kind]:.2f} x req/s; "
              f"added per request: p50 round trip {r[kind + '_p50'] - s[kind + '_p50']:+.0f} us, "
              f"mxguard CPU {r[kind + '_cpu'] - s[kind + '_cpu']:+.0f} us "
              f"(+ {r[kind + '_rcpu']:.0f} us in redis-server)")


if __name__ == "__main__":
    main()
