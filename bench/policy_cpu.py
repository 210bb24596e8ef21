#!/usr/bin/env python3
"""CPU per policy request inside one process: decode, the door (every check of
the pipeline, the store, the decision line), encode. No sockets and no load
client, so the figure holds on a busy machine where req/s do not (CPU time of
this process only, ``time.process_time``).

The requests are bench/policy_bench.py's (``--checks greylist``: HELO and SPF off,
as postgrey; ``full``: HELO, SPF and greylisting, loopback DNS with TTL 300) on a
temp SQLite store. Known triplets are passed first (two rounds past the 1 s
delay), as in policy_bench. Prints the median of ``--runs`` runs of ``-n``
requests; ``--profile`` prints cProfile's top functions of one more run.

    python bench/policy_cpu.py [--checks greylist|full] [--kind known|new] [-n 20000]
                               [--runs 3] [--profile]

To compare two checkouts in one session, run it with ``PYTHONPATH=<other>/src``
alternately (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import policy_bench  # noqa: E402
import spf_bench  # noqa: E402


async def run(args: argparse.Namespace, tmp: Path) -> None:
    from mxguard import config, logs
    from mxguard.core.runtime import Runtime
    from mxguard.dns import Resolver
    from mxguard.protocols.policy import PolicyDecoder
    from mxguard.server.daemon import open_services
    from mxguard.server.policy_door import PolicyDoor
    from mxguard.testing.dns import DNSServer

    dns = DNSServer(spf_bench.bench_zone()).start()
    only = '[helo]\nmode = "off"\n[spf]\nmode = "off"\n' if args.checks == "greylist" else ""
    (tmp / "mxguard.toml").write_text(
        f'[storage]\nurl = "sqlite:///{tmp}/mxguard.db"\n'
        f'[dns]\nnameservers = ["{dns.address}"]\n{only}[milter]\nenabled = false\n'
        "[greylist]\ndelay = 1\nauto_whitelist_clients = 0\n")
    cfg = config.load(str(tmp / "mxguard.toml"))
    logs.setup(cfg.log)
    handler = logging.getLogger("mxguard").handlers[0]
    handler.stream = open(os.devnull, "w")  # type: ignore[attr-defined]  # noqa: SIM115
    rt = Runtime(config=cfg, resolver=Resolver(cfg.dns))
    rt.services = await open_services(cfg)
    door = PolicyDoor(SimpleNamespace(runtime=rt))  # type: ignore[arg-type]
    decoder = PolicyDecoder()
    make = policy_bench.REQUEST[args.checks]
    conns = 10

    async def one(i: int, kind: str) -> bytes:
        reply = b""
        for req in decoder.feed(make(i, i % conns, kind)):
            reply = await door(req)
        return reply

    for _ in range(2):  # first sight, then the retry that passes them
        for i in range(1000 * conns):
            await one(i, "known")
        await asyncio.sleep(1.2)
    for i in range(200):  # caches warm for this kind
        await one(10**8 + i, args.kind)
    figures: list[float] = []
    offset = 2 * 10**8
    for r in range(args.runs + (1 if args.profile else 0)):
        prof = cProfile.Profile() if args.profile and r == args.runs else None
        t0 = time.process_time()
        if prof is not None:
            prof.enable()
        for i in range(args.n):
            reply = await one(offset + i, args.kind)
        if prof is not None:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            continue
        offset += args.n
        figures.append((time.process_time() - t0) / args.n * 1e6)
    dns.stop()
    import mxguard
    print(f"policy_cpu: checks {args.checks}, {args.kind} triplets, {args.n} requests x "
          f"{args.runs} runs: median {statistics.median(figures):.1f} us CPU per request "
          f"(runs: {', '.join(f'{f:.1f}' for f in figures)}); mxguard from "
          f"{Path(mxguard.__file__).parent}; last reply {reply[:40]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checks", choices=("greylist", "full"), default="greylist")
    ap.add_argument("--kind", choices=("known", "new"), default="known")
    ap.add_argument("-n", type=int, default=20000, help="requests per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile one more run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mxguard-cpu-") as d:
        try:
            import uvloop
            uvloop.run(run(args, Path(d)))
        except ImportError:
            asyncio.run(run(args, Path(d)))


if __name__ == "__main__":
    main()
