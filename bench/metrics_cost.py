#!/usr/bin/env python3
"""What metrics cost the policy door: this tree (metrics on) against an anchor
tree without them (default: the commit before metrics), alternating in one run.

Both servers run from the same virtualenv with the policy benchmark's workload
(bench/policy_bench.py: greylisting only, HELO and SPF off, 10 connections);
the anchor's sources are exported with ``git archive`` and put first on
PYTHONPATH. Each round starts a fresh server of each kind in turn (order
swapped every round), drives new and known triplets, and records req/s and
the server's CPU per request. Prints the medians and the differences. Never
fails on time.

    python bench/metrics_cost.py [--rounds 3] [--seconds 3] [--anchor-rev f226c74]
    python bench/metrics_cost.py --micro
    python bench/metrics_cost.py --inproc [--blocks 40] [--per-block 1000]

Instructions instead of time (this machine is shared; valgrind counts exactly):
run ``--inproc --only on|off --blocks 1 --per-block N`` under
``valgrind --tool=callgrind`` for N and 2N; the difference / N is per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from policy_bench import cpu_seconds, drive, free_port, wait_port  # noqa: E402


def export(rev: str, into: Path) -> Path:
    """The ``src/`` of ``rev`` under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"],
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def start(tmp: Path, src: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    (tmp / "state").mkdir(exist_ok=True)
    cfg = tmp / "mxguard.toml"
    cfg.write_text(
        f'[server]\nstate_dir = "{tmp}/state"\n'
        f'[policy]\nlisten = "127.0.0.1:{port}"\n'
        f'[storage]\nurl = "sqlite:///{tmp}/mxguard.db"\n'
        '[helo]\nmode = "off"\n[spf]\nmode = "off"\n[milter]\nenabled = false\n'
        "[greylist]\ndelay = 1\nauto_whitelist_clients = 0\n")
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(tmp / "mxguard.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, "-m", "mxguard", "serve", "--config", str(cfg)],
                            stdout=log, stderr=log, env=env)
    wait_port(port, proc, "mxguard")
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one(tmp: Path, src: Path | None, seconds: float, conns: int,
        offset: int) -> dict[str, float]:
    proc, port = start(tmp, src)
    try:
        for _ in range(2):  # the known set: first sight, then the retry that passes it
            asyncio.run(drive(port, "known", 60, conns, 0, limit=1000))
            time.sleep(1.5)
        out: dict[str, float] = {}
        for kind in ("new", "known"):
            cpu0 = cpu_seconds(proc.pid)
            rate, replies = asyncio.run(drive(port, kind, seconds, conns, offset))
            out[kind] = rate
            out[kind + "_cpu"] = (cpu_seconds(proc.pid) - cpu0) / max(sum(replies.values()),
                                                                       1) * 1e6
        return out
    finally:
        stop(proc)


def micro(n: int = 200_000) -> None:
    """The per-request work alone: the decision observer with a policy verdict
    (3 check times, 2 symbols, a greylist result) and a counted store call."""
    import timeit

    from mxguard import stats
    from mxguard.core.transaction import Action, CheckResult, Symbol, Transaction, Verdict
    from mxguard.web.metrics import Recorder

    rec = Recorder()
    tx = Transaction()
    tx.results["greylist"] = CheckResult("greylist", reason="known")
    v = Verdict(action=Action.ACCEPT, symbols=[Symbol("GREYLIST_PASSED", 0.0),
                                               Symbol("SPF_PASS", 0.0)],
                timings={"helo": 0.04, "spf": 0.2, "greylist": 0.09})
    t = min(timeit.repeat(lambda: rec.observe("policy", tx, v, "DUNNO"), number=n, repeat=5))
    print(f"  observer: {t / n * 1e6:.2f} us per policy decision")

    class Store:
        async def lookup(self, a: str, b: str) -> None:
            return None

    class Interface:
        async def lookup(self, a: str, b: str) -> None: ...

    raw, counted = Store(), stats.instrument(Store(), "bench", Interface)

    async def loop(store: Store) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await store.lookup("a", "b")
        return time.perf_counter() - t0

    base = min(asyncio.run(loop(raw)) for _ in range(5))
    wrapped = min(asyncio.run(loop(counted)) for _ in range(5))
    print(f"  counted store call: +{(wrapped - base) / n * 1e6:.2f} us per call")


def inproc(blocks: int, per_block: int, only: str | None = None) -> None:
    """The policy door in this process, known triplets: the same requests with the
    metrics observer and counted store calls (on) and without both (off),
    alternating blocks; CPU time (process_time) per request, medians."""
    import logging
    import shutil

    from policy_bench import request

    from mxguard import config
    from mxguard.checks.greylist import open_greylister
    from mxguard.core.runtime import Runtime
    from mxguard.dns import Resolver
    from mxguard.protocols.policy import PolicyDecoder
    from mxguard.server.daemon import open_services
    from mxguard.server.policy_door import PolicyDoor

    tmp = Path(tempfile.mkdtemp(prefix="mxguard-mcost-"))
    (tmp / "cfg.toml").write_text(
        f'[server]\nstate_dir = "{tmp}"\n[storage]\nurl = "sqlite:///{tmp}/mxguard.db"\n'
        '[helo]\nmode = "off"\n[spf]\nmode = "off"\n[milter]\nenabled = false\n'
        "[greylist]\ndelay = 0\nauto_whitelist_clients = 0\n")
    cfg = config.load(str(tmp / "cfg.toml"))
    mxlog = logging.getLogger("mxguard")
    mxlog.handlers[:] = [logging.NullHandler()]
    mxlog.propagate = False

    class Holder:
        runtime: Runtime

    async def run() -> None:
        on = Runtime(config=cfg, resolver=Resolver(cfg.dns), services=await open_services(cfg))
        off = Runtime(config=cfg, resolver=Resolver(cfg.dns),
                      services={"greylist": await open_greylister(cfg, fail_open=True)})
        holder = Holder()
        door = PolicyDoor(holder)  # type: ignore[arg-type]
        reqs = [r for i in range(1000) for r in PolicyDecoder().feed(request(i, 0, "known"))]
        for rt in (on, off, on, off):  # first sight, then passed, in both stores
            holder.runtime = rt
            for req in reqs:
                await door(req)
        times: dict[str, list[float]] = {"on": [], "off": []}
        for b in range(blocks * 2):
            name = only or ("on", "off")[(b + b // 2) % 2]  # on off off on on off ...
            holder.runtime = on if name == "on" else off
            t0 = time.process_time()
            for i in range(per_block):
                await door(reqs[i % len(reqs)])
            times[name].append((time.process_time() - t0) / per_block * 1e6)
        if only:
            print(f"  {only}: {statistics.median(times[only]):.2f} us CPU/req")
            return
        a, m = statistics.median(times["off"]), statistics.median(times["on"])
        print(f"  in-process policy door, known triplets, {blocks} x {per_block} requests each:")
        print(f"    off {a:.2f} us CPU/req (blocks: {', '.join(f'{x:.1f}' for x in times['off'])})")
        print(f"    on  {m:.2f} us CPU/req (blocks: {', '.join(f'{x:.1f}' for x in times['on'])})")
        print(f"    metrics cost {m - a:+.2f} us/req = {(m / a - 1) * 100:+.1f} %")
        for rt in (on, off):
            for svc in rt.services.values():
                close = getattr(svc, "close", None)
                if close is not None and asyncio.iscoroutinefunction(close):
                    await close()

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--micro", action="store_true",
                    help="only time the observer and a counted store call (no servers)")
    ap.add_argument("--inproc", action="store_true",
                    help="the policy door in this process, metrics on/off blocks (no servers)")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--only", choices=("on", "off"),
                    help="with --inproc: only that kind (e.g. under valgrind --tool=callgrind)")
    ap.add_argument("--per-block", type=int, default=1000)
    ap.add_argument("--anchor-rev", default="f226c74",
                    help="git revision without metrics (default: the commit before them)")
    args = ap.parse_args()
    if args.micro:
        micro()
        return
    if args.inproc:
        inproc(args.blocks, args.per_block, args.only)
        return
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(f"metrics cost: {args.rounds} rounds x {args.seconds:g} s, {args.conns} connections, "
          f"anchor {args.anchor_rev}, {os.cpu_count()} cores (shared with the load generator)")
    runs: dict[str, list[dict[str, float]]] = {"anchor": [], "metrics": []}
    with tempfile.TemporaryDirectory(prefix="mxguard-mcost-") as d:
        tmp = Path(d)
        anchor_src = export(args.anchor_rev, tmp / "anchor")
        for r in range(args.rounds):
            order = ["anchor", "metrics"] if r % 2 == 0 else ["metrics", "anchor"]
            for name in order:
                work = tmp / f"{name}-{r}"
                work.mkdir()
                res = one(work, anchor_src if name == "anchor" else None, args.seconds,
                          args.conns, offset=(r + 1) * 10_000_000)
                runs[name].append(res)
                print(f"  round {r + 1} {name:7s}: new {res['new']:7.0f} req/s "
                      f"({res['new_cpu']:4.0f} us CPU/req), known {res['known']:7.0f} req/s "
                      f"({res['known_cpu']:4.0f} us CPU/req)", flush=True)
    for kind in ("new", "known"):
        a = statistics.median(x[kind] for x in runs["anchor"])
        m = statistics.median(x[kind] for x in runs["metrics"])
        ac = statistics.median(x[kind + "_cpu"] for x in runs["anchor"])
        mc = statistics.median(x[kind + "_cpu"] for x in runs["metrics"])
        print(f"  {kind:5s} triplets: median anchor {a:7.0f} req/s, metrics {m:7.0f} req/s "
              f"({(m / a - 1) * 100:+.1f} %); CPU/req anchor {ac:.1f} us, metrics {mc:.1f} us "
              f"({(mc / ac - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
