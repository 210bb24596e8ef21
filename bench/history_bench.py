#!/usr/bin/env python3
"""History recorder cost per message, in one process, CPU time (all threads).

Drives :class:`mxguard.core.history.HistoryRecorder` as the milter door does:
``--messages`` decisions (a 10-header message, 3 symbols, 4 timings, one
Authentication-Results edit) go through the observer, then the writer flushes
them in batches as the daemon's background task does, to a SQLite file and, when
``redis-server`` is installed, to a private Redis. Runs alternate "observer +
writer" with an empty loop of the same length (the baseline, subtracted);
printed: median of ``--runs`` runs of CPU microseconds per message, observer
(the part on the request's path) and writer separately. Compare with the milter
CPU per message that ``bench/milter_bench.py`` prints (its ``--history-ab`` runs
the daemon with history on and off, alternating). Never fails on time.

    python bench/history_bench.py [--messages 20000] [--runs 3] [--no-redis]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from mxguard.config import Config, HistoryConfig  # noqa: E402
from mxguard.core.history import HistoryRecorder  # noqa: E402
from mxguard.core.transaction import (  # noqa: E402
    HeaderChange,
    Message,
    Symbol,
    Transaction,
    Verdict,
)
from mxguard.store.history import HistoryStore, SqliteHistoryStore  # noqa: E402


def decision() -> tuple[Transaction, Verdict]:
    headers = [("Received", " from a.example by mx.example; Tue, 1 Dec 2026 10:00:00 +0000")] * 4
    headers += [("From", " Alice <alice@bench.example>"), ("To", " bob@example.org"),
                ("Subject", " Quarterly report"), ("Date", " Tue, 1 Dec 2026 10:00:00 +0000"),
                ("Message-ID", " <1234@bench.example>"), ("MIME-Version", " 1.0")]
    tx = Transaction(client_address="198.51.100.7", client_name="mail.bench.example",
                     helo="mail.bench.example", sender="alice@bench.example",
                     recipients=["bob@example.org"], queue_id="4F2A1C9B",
                     message=Message(headers, io.BytesIO, 2048))
    v = Verdict(symbols=[Symbol("SPF_PASS", -0.5, "bench.example from 198.51.100.7 (matched "
                                "ip4:198.51.100.0/24)"),
                         Symbol("DKIM_VALID", -0.1, "bench.example"),
                         Symbol("DMARC_PASS", -0.1, "bench.example p=reject aligned=SPF,DKIM")],
                timings={"spf": 0.05, "dkim_verify": 0.9, "dmarc": 0.2, "authresults": 0.1},
                headers=[HeaderChange.insert(0, "Authentication-Results", "mx.example; "
                                             "spf=pass smtp.mailfrom=alice@bench.example; "
                                             "dkim=pass header.d=bench.example")])
    return tx, v


async def one_run(store: HistoryStore, n: int) -> tuple[float, float]:
    """(observer, writer) CPU microseconds per message."""
    cfg = dataclasses.replace(Config(), history=dataclasses.replace(HistoryConfig(),
                                                                    queue_size=10**7))
    rec = HistoryRecorder(cfg, store, host="bench")
    tx, v = decision()
    clock = time.process_time
    t0 = clock()
    for _ in range(n):
        pass
    empty = clock() - t0
    t0 = clock()
    for _ in range(n):
        rec("milter", tx, v, "continue")
    observe = clock() - t0 - empty
    t0 = clock()
    while rec.queued:  # the background task's flushes, a second's worth at a time
        await rec.flush()
    write = clock() - t0
    assert rec.written == n, (rec.written, n)
    return observe / n * 1e6, write / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mxghb-"))
    backends: list[tuple[str, object]] = [("sqlite", None)]
    server = None
    if not args.no_redis and shutil.which("redis-server"):
        from tests.support.redis import RedisServer

        server = RedisServer(tmp).start()
        backends.append(("redis", server))
    print(f"history recorder: {args.messages} milter decisions per run, {args.runs} runs, "
          "CPU time of all threads")
    try:
        for name, srv in backends:
            observe: list[float] = []
            write: list[float] = []
            for i in range(args.runs):
                if srv is None:
                    store: HistoryStore = SqliteHistoryStore(str(tmp / f"h{i}.db"))
                else:
                    from mxguard.store.redis_history import RedisHistoryStore

                    server.flush()  # type: ignore[union-attr]
                    store = RedisHistoryStore(server.url())  # type: ignore[union-attr]
                o, w = await one_run(store, args.messages)
                await store.close()
                observe.append(o)
                write.append(w)
            print(f"  {name:6s}: observer {statistics.median(observe):5.1f} us/msg (runs "
                  f"{', '.join(f'{x:.1f}' for x in observe)}), writer "
                  f"{statistics.median(write):5.1f} us/msg (runs "
                  f"{', '.join(f'{x:.1f}' for x in write)}), total "
                  f"{statistics.median(observe) + statistics.median(write):5.1f} us/msg")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
