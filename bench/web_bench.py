#!/usr/bin/env python3
"""Dashboard benchmark: page and API latency of a real ``mxguard serve`` with
a filled history, and the RSS the web listener adds.

The history store (SQLite, next to the greylist database) is filled with
``--records`` synthetic records (a mix of actions, senders, clients, symbols
over the last 24 hours) before the daemon starts. Then, for each endpoint,
``--requests`` sequential requests over new connections (HTTP Basic auth on,
the hash verified once and then cached) and the median / p95 in milliseconds.
Finally the idle RSS of a daemon with ``[web] enabled = false`` and ``true``,
alternated ``--rounds`` times, medians. Figures only; it never fails on time.

    .venv/bin/python bench/web_bench.py [--records 20000] [--requests 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mxguard import config
from mxguard.store.backends import open_history_store
from mxguard.store.history import HistoryRecord, new_id
from mxguard.testing.ports import free_port
from mxguard.web.auth import hash_password

PASSWORD = "bench-password-1"
ENDPOINTS = ["/", "/history", "/history?action=reject&since=6h", "/api/history?limit=50",
             "/api/history?limit=500", "/api/history?symbol=GTUBE&limit=50",
             "/api/overview?hours=24", "/message/{qid}", "/metrics"]


def write_config(tmp: Path, web_on: bool = True) -> tuple[Path, int, int]:
    policy, milter, web = free_port(), free_port(), free_port()
    path = tmp / "mxguard.toml"
    path.write_text(f'[policy]\nlisten = "127.0.0.1:{policy}"\n'
                    f'[milter]\nlisten = "127.0.0.1:{milter}"\n'
                    f'[storage]\nurl = "sqlite:///{tmp}/mx.db"\n'
                    f'[server]\nstate_dir = "{tmp}/state"\n'
                    f'[web]\nenabled = {"true" if web_on else "false"}\n'
                    f'listen = "127.0.0.1:{web}"\npassword_hash = "{hash_password(PASSWORD)}"\n')
    return path, web, milter


async def fill(cfg: config.Config, n: int) -> str:
    store = open_history_store(cfg)
    rnd = random.Random(1)
    now = time.time()
    actions = ["accept"] * 6 + ["reject", "defer_if_permit", "quarantine"]
    symbols = ["DKIM_VALID", "DMARC_PASS", "SPF_PASS", "GTUBE", "BAYES_99", "MXG_PRIZE_WON"]
    qid = ""
    batch: list[HistoryRecord] = []
    for i in range(n):
        t = now - rnd.random() * 86400
        qid = f"4B{i:010X}"
        batch.append(HistoryRecord(
            id=new_id(t), time=t, host="mx1", queue_id=qid,
            client_address=f"198.51.{rnd.randrange(256)}.{rnd.randrange(256)}",
            sender=f"user{rnd.randrange(500)}@d{rnd.randrange(50)}.test",
            recipients=["bob@example.test"], subject=f"Message {i}",
            action=rnd.choice(actions), score=rnd.uniform(-2, 20), size=2000,
            symbols=[{"name": s, "score": 1.0, "detail": ""}
                     for s in rnd.sample(symbols, 3)], timings={"rules": 0.5}))
        if len(batch) >= 1000:
            await store.add_many(batch)
            batch = []
    if batch:
        await store.add_many(batch)
    await store.close()
    return qid


def start(path: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "mxguard", "serve", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("mxguard did not start") from None
            time.sleep(0.1)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    auth = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path, web, _ = write_config(tmp)
        qid = asyncio.run(fill(config.load(str(path)), args.records))
        proc = start(path, web)
        try:
            print(f"{args.records} history records, {args.requests} requests per endpoint")
            print(f"{'endpoint':44} {'median ms':>10} {'p95 ms':>8} {'bytes':>9}")
            for ep in ENDPOINTS:
                url = f"http://127.0.0.1:{web}" + ep.format(qid=qid)
                times, size = [], 0
                for _ in range(args.requests):
                    req = urllib.request.Request(url, headers={"Authorization": auth})
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        size = len(resp.read())
                    times.append((time.perf_counter() - t0) * 1000)
                times.sort()
                p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
                print(f"{ep:44} {statistics.median(times):10.1f} {p95:8.1f} {size:9d}")
            print(f"RSS after the requests: {rss_mib(proc.pid):.1f} MiB")
        finally:
            proc.terminate()
            proc.wait(30)
    rss: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for on in (False, True):  # alternated, so drift hits both alike
            with tempfile.TemporaryDirectory() as d:
                path, web, milter = write_config(Path(d), on)
                proc = start(path, web if on else milter)
                time.sleep(2)
                rss[on].append(rss_mib(proc.pid))
                proc.terminate()
                proc.wait(30)
    for on in (False, True):
        print(f"idle RSS, [web] enabled = {str(on).lower():5}: median "
              f"{statistics.median(rss[on]):.1f} MiB {[round(x, 1) for x in rss[on]]}")


if __name__ == "__main__":
    main()
