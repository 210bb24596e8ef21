"""Content rules through the daemon's milter: msgs/s and start-up, this tree
against an anchor tree, taking turns.

    python bench/rules_milter_bench.py --rules-dir /tmp/sa/usr/share/spamassassin \\
        [--anchor-src /tmp/anchor/src] [--clients 4] [--seconds 20] [--runs 3] \\
        [--messages 300] [--workers 1] [--corpus DIR]

Starts ``mxguard serve`` (from ``src/`` of this tree, and of ``--anchor-src``
when given) with content scanning on (built-in rules plus ``--rules-dir``;
``--rules-dir none`` for built-in only), Bayes on with an empty store, HELO,
greylisting, SPF, DKIM, DMARC and DNSBL off (no DNS in the measurement), and
drives its milter with ``--clients`` connections (bench/milter_client.py, as
Postfix would) sending ``--messages`` corpus messages spread over MANIFEST.tsv
(spam and ham), round and round, for ``--seconds``. Each tree keeps its state
directory across runs, so after the first (warm-up, not counted: it fills the
compiled-rules cache; its start-up is printed as the cold start) every start is
a warm start. Printed per tree: the median
of ``--runs`` msgs/s, the median start-up (process start until the milter door
listens, and the daemon's own rules load time from its log), and the ratio.
The machine's other load counts in every figure: compare the two trees within
one run. Prints figures; exits 1 only when a message gets no reply.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from milter_bench import free_port, stop
from milter_client import Client, Message, MilterClient

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"


def load_messages(corpus: Path, limit: int) -> list[bytes]:
    rows = [line.split("\t") for line in (corpus / "MANIFEST.tsv").read_text().splitlines()[1:]
            if line]
    step = max(1, len(rows) // limit)
    wanted = {row[0].split("/")[-1] for row in rows[::step][:limit]}
    out = []
    with tarfile.open(corpus / "spamassassin-public-corpus.tar.xz") as tf:
        for member in tf:
            if member.isfile() and member.name.split("/")[-1] in wanted:
                fh = tf.extractfile(member)
                if fh is not None:
                    raw = fh.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                    out.append(raw)
    return out


def write_config(work: Path, rules_dir: str, workers: int) -> tuple[Path, str]:
    port = free_port()
    rules = "[]" if rules_dir == "none" else f'["{rules_dir}"]'
    cfg = work / "mxguard.toml"
    cfg.write_text(
        f'[server]\nstate_dir = "{work}/state"\nworkers = {workers}\n'
        f'[policy]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[milter]\nlisten = "127.0.0.1:{port}"\n'
        f'[storage]\nurl = "sqlite:///{work}/mxguard.db"\n'
        '[dns]\nnameservers = ["127.0.0.1:9"]\n'
        '[helo]\nmode = "off"\n[greylist]\nmode = "off"\n[spf]\nmode = "off"\n'
        '[dkim]\nmode = "off"\n[dmarc]\nmode = "off"\n[dnsbl]\nmode = "off"\n'
        f'[content]\nrules_dirs = {rules}\n'
    )
    return cfg, f"inet:127.0.0.1:{port}"


def start(src: Path, work: Path, cfg: Path, target: str) -> tuple[subprocess.Popen[bytes], float,
                                                                  str]:
    log = work / "mxguard.log"
    t0 = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mxguard", "serve", "--config", str(cfg)],
                                stdout=out, stderr=out,
                                env=dict(os.environ, PYTHONPATH=str(src)))
    wait_listening(target, proc, log)
    return proc, time.monotonic() - t0, log.read_text(errors="replace")


def wait_listening(target: str, proc: subprocess.Popen[bytes], log: Path,
                   timeout: float = 180) -> None:
    """Until the milter door accepts connections (a loaded machine starts slowly)."""
    host, _, port = target.partition(":")[2].rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"mxguard exited early with status {proc.returncode}\n{tail}")
        try:
            socket.create_connection((host, int(port)), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"mxguard did not start listening on {target}")


def wait_compiled(log: Path, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    """Until the daemon logs its Hyperscan databases ready (or never will)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace")
        if "not compiled yet" in text:  # cold start: built-in rules until the rest is compiled
            text = text.partition("full rule set in use")[2]
            if not text:
                time.sleep(0.5)
                continue
        if "hyperscan databases ready" in text or "hyperscan_rules=compiling" not in text:
            return
        time.sleep(0.5)


async def drive(target: str, msgs: list[Message], clients: int, seconds: float) -> tuple[int,
                                                                                         int]:
    done = failed = 0
    stop_at = time.monotonic() + seconds

    async def one(n: int) -> None:
        nonlocal done, failed
        client = MilterClient(target, queue_prefix=f"C{n}")
        await client.open(Client(address=f"198.51.100.{10 + n}", port=40000 + n,
                                 helo=f"host{n}.example.net"))
        i = n
        while time.monotonic() < stop_at:
            outcome = await client.message(msgs[i % len(msgs)])
            i += clients
            if outcome.final is None:
                failed += 1
            else:
                done += 1
        await client.close()

    await asyncio.gather(*(one(n) for n in range(clients)))
    return done, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules-dir", required=True, help='SpamAssassin rules dir, or "none"')
    ap.add_argument("--anchor-src", type=Path, default=None,
                    help="src/ of the tree to compare with (e.g. an export of main)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = ap.parse_args()
    raws = load_messages(args.corpus, args.messages)
    msgs = [Message.parse(raw, "sender@example.net", ["user@mx.example.org"]) for raw in raws]
    trees = {"this": ROOT / "src"}
    if args.anchor_src is not None:
        trees["anchor"] = args.anchor_src
    rates: dict[str, list[float]] = {t: [] for t in trees}
    starts: dict[str, list[float]] = {t: [] for t in trees}
    loads: dict[str, list[float]] = {t: [] for t in trees}
    cold: dict[str, tuple[float, float]] = {}
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mxguard-rulesbench-") as tmp:
        setups = {}
        for name in trees:
            work = Path(tmp) / name
            work.mkdir()
            setups[name] = (work, *write_config(work, args.rules_dir, args.workers))
        for run in range(args.runs + 1):
            for name, src in (trees.items() if run % 2 == 0 else reversed(trees.items())):
                work, cfg, target = setups[name]
                proc, startup, text = start(src, work, cfg, target)
                try:
                    if run == 0:
                        spawned = time.monotonic() - startup
                        wait_compiled(work / "mxguard.log", proc)
                        cold[name] = (startup, time.monotonic() - spawned)
                    t0 = time.monotonic()
                    done, failed = asyncio.run(drive(target, msgs, args.clients, args.seconds))
                    rate = done / (time.monotonic() - t0)
                finally:
                    stop(proc)
                failures += failed
                secs = [float(x) for x in re.findall(r"engine=\S+ .*?seconds=([\d.]+)",
                                                     text)]
                label = "warm-up" if run == 0 else f"run {run}"
                print(f"{label:8s} {name:6s} {rate:7.1f} msgs/s  start-up {startup:5.2f}s  "
                      f"rules load {secs[-1] if secs else float('nan'):.2f}s  "
                      f"({done} messages, {failed} failed)", flush=True)
                if run:
                    rates[name].append(rate)
                    starts[name].append(startup)
                    if secs:
                        loads[name].append(secs[-1])
    print(f"\nrules: built-in + {args.rules_dir}; {args.clients} clients, {len(msgs)} corpus "
          f"messages, {args.seconds:g}s per run, workers={args.workers}")
    for name in trees:
        print(f"  {name:6s} median {statistics.median(rates[name]):7.1f} msgs/s  start-up "
              f"{statistics.median(starts[name]):.2f}s  rules load "
              f"{statistics.median(loads[name]) if loads[name] else float('nan'):.2f}s")
    for name, (startup, full) in cold.items():
        print(f"  {name:6s} cold start (no cache): milter listening after {startup:.2f}s, "
              f"all rules in use after {full:.1f}s")
    if "anchor" in trees:
        print(f"  ratio this/anchor: "
              f"{statistics.median(rates['this']) / statistics.median(rates['anchor']):.2f}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
