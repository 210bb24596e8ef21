"""Worst-case cost of the content path per KB: MIME parse, rule scan
(``load_rules(Config())``) and Bayes tokenizer, for ordinary corpus mail next
to each adversarial shape of :mod:`mxguard.testing.adversarial`.

    python bench/content_worst.py [CORPUS_DIR] [--sizes 32,256,1024] [--runs 3]
                                  [--limit 200] [--shapes many_labels_url,...]

CORPUS_DIR (optional) holds ``spamassassin-public-corpus.tar.xz`` and
``MANIFEST.tsv``; ``--limit`` messages spread over the manifest are read. Prints
ms per KB (median of ``--runs``) for each step and size; a shape whose ms/KB
grows with size is superlinear. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mxguard.config import Config
from mxguard.content.mime import parse_message
from mxguard.content.rules import RuleSet, load_rules
from mxguard.content.tokenizer import tokenize_message
from mxguard.testing.adversarial import SHAPES

T = TypeVar("T")


def corpus_messages(corpus: Path, limit: int, tmp: str) -> list[bytes]:
    rows = [line.split("\t")[0] for line in
            (corpus / "MANIFEST.tsv").read_text().splitlines()[1:] if line]
    wanted = set(rows[::max(1, len(rows) // limit)][:limit])
    with tarfile.open(corpus / "spamassassin-public-corpus.tar.xz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and
                   any(m.name.endswith(w) for w in wanted)]
        tf.extractall(tmp, members=members, filter="data")
    return [p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()]


def timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    started = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - started, value


def measure(ruleset: RuleSet, messages: list[bytes], runs: int) -> tuple[float, float, float]:
    """Median over ``runs`` of (parse, scan, tokenize) ms per KB of ``messages``."""
    kb = sum(len(m) for m in messages) / 1024
    out: list[tuple[float, float, float]] = []
    for _ in range(runs):
        parse = scan = tok = 0.0
        for raw in messages:
            took, msg = timed(parse_message, raw)
            parse += took
            scan += timed(ruleset.scan, msg)[0]
            tok += timed(tokenize_message, msg)[0]
        out.append((parse, scan, tok))
    p, s, t = (1000 * statistics.median(r[i] for r in out) / kb for i in range(3))
    return p, s, t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="?", type=Path)
    ap.add_argument("--sizes", default="32,256,1024", help="KB, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ruleset = load_rules(Config())
    ruleset.scan(parse_message(SHAPES["many_labels_headers"](1000)))  # warm lazy tables (PSL)
    print(f"{'shape':22} {'KB':>6} {'parse':>9} {'scan':>9} {'tokenize':>9} {'total':>9}"
          "   (ms per KB, median)")
    if args.corpus is not None:
        with tempfile.TemporaryDirectory() as tmp:
            messages = corpus_messages(args.corpus, args.limit, tmp)
        kb = sum(len(m) for m in messages) / 1024 / max(1, len(messages))
        p, s, t = measure(ruleset, messages, args.runs)
        print(f"{'corpus (' + str(len(messages)) + ' msgs)':22} {kb:6.1f} {p:9.3f} {s:9.3f} "
              f"{t:9.3f} {p + s + t:9.3f}")
    worst: dict[str, float] = {}
    for name in args.shapes.split(","):
        for size in sizes:
            raw = SHAPES[name](size * 1024)
            p, s, t = measure(ruleset, [raw], args.runs)
            worst[name] = max(worst.get(name, 0.0), p + s + t)
            print(f"{name:22} {len(raw) / 1024:6.0f} {p:9.3f} {s:9.3f} {t:9.3f} {p + s + t:9.3f}",
                  flush=True)
    top = max(worst, key=worst.__getitem__)
    print(f"worst shape: {top} {worst[top]:.3f} ms/KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
