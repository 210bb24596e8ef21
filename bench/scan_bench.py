"""Content scan throughput: MIME parse + rules, single process, no daemon.

    python bench/scan_bench.py [--limit 500] [--rules DIR ...] [--no-builtin]
                               [--no-hyperscan] [--corpus PATH.tar.xz]

Reads messages from the shared corpus archive (extracted to a temporary
directory), takes ``--limit`` of them spread evenly over MANIFEST.tsv (ham and
spam alike), loads the rules once and prints messages per second for parsing
alone and for parsing plus scanning, with the slowest messages. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from mxguard.content.mime import parse_message
from mxguard.content.rules import BUILTIN_RULES, build_ruleset

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def load_messages(corpus: Path, limit: int, tmp: str) -> list[tuple[str, bytes]]:
    archive = corpus / "spamassassin-public-corpus.tar.xz"
    manifest = corpus / "MANIFEST.tsv"
    rows = [line.split("\t") for line in manifest.read_text().splitlines()[1:] if line]
    step = max(1, len(rows) // limit)
    wanted = {row[0] for row in rows[::step][:limit]}
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and
                   any(m.name.endswith(w) for w in wanted)]
        tf.extractall(tmp, members=members, filter="data")
    out = []
    for m in members:
        out.append((m.name, (Path(tmp) / m.name).read_bytes()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--rules", action="append", default=[], help="extra rule dir/file")
    ap.add_argument("--no-builtin", action="store_true")
    ap.add_argument("--no-hyperscan", action="store_true")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--repeat", type=int, default=1, help="passes over the messages")
    args = ap.parse_args()
    if args.no_hyperscan:
        os.environ["MXGUARD_NO_HYPERSCAN"] = "1"
    with tempfile.TemporaryDirectory(prefix="mxguard-scanbench-") as tmp:
        messages = load_messages(args.corpus, args.limit, tmp)
    if not messages:
        sys.exit("no messages found")
    paths = ([] if args.no_builtin else [str(BUILTIN_RULES)]) + args.rules
    t0 = time.perf_counter()
    ruleset = build_ruleset(paths)
    load = time.perf_counter() - t0
    st = ruleset.stats
    print(f"rules: {', '.join(paths)}")
    print(f"  load {load:.2f}s engine={st.engine} active={sum(st.active.values())} "
          f"({dict(st.active)}) prefiltered={st.prefiltered}")
    size = sum(len(raw) for _, raw in messages)
    print(f"messages: {len(messages)} ({size / 1e6:.1f} MB)")

    t0 = time.perf_counter()
    parsed = [parse_message(raw) for _ in range(args.repeat) for _, raw in messages]
    parse_s = time.perf_counter() - t0
    timings = []
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        for name, raw in messages:
            s = time.perf_counter()
            result = ruleset.scan(parse_message(raw))
            timings.append((time.perf_counter() - s, name, result.score))
    total = time.perf_counter() - t0
    n = len(messages) * args.repeat
    print(f"parse only:      {n / parse_s:8.1f} msgs/s ({1000 * parse_s / n:.2f} ms/msg)")
    print(f"parse + scan:    {n / total:8.1f} msgs/s ({1000 * total / n:.2f} ms/msg)")
    timings.sort(reverse=True)
    print("slowest:", ", ".join(f"{Path(name).name[:24]} {1000 * t:.0f}ms"
                                for t, name, _ in timings[:5]))
    del parsed
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
