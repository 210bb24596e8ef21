"""Identical hits: the compiled rule engine against one regex per rule, on a corpus.

    python bench/rules_equivalence.py --corpus /work/shared/corpus \\
        [--rules-dir DIR ...] [--no-builtin] [--limit N]

Builds three RuleSets from the same files -- the reference (``compiled=False``:
every regex on every text), the literal prefilter (no Hyperscan) and, when
the ``hyperscan`` package is installed, the Hyperscan databases -- scans every
message of the corpus (``MANIFEST.tsv`` and its ``.tar.xz``, or a directory of
message files) with each, and prints how many messages have a different hit
set (rule -> count, sub-rules and metas included) and the first differences.
Exits 1 when any message differs.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from mxguard.content.mime import parse_message
from mxguard.content.rules import BUILTIN_RULES, RuleSet, build_ruleset
from mxguard.content.rules_prefilter import hyperscan_available


def messages(corpus: Path, limit: int) -> Iterator[tuple[str, bytes]]:
    archives = sorted(corpus.glob("*.tar.xz")) if corpus.is_dir() else []
    if archives:
        manifest = corpus / "MANIFEST.tsv"
        wanted = None
        if manifest.exists():
            wanted = {line.split("\t")[0] for line in manifest.read_text().splitlines()[1:]
                      if line}
        n = 0
        for archive in archives:
            with tarfile.open(archive) as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    if wanted is not None and not any(member.name.endswith(w) for w in
                                                      _suffixes(member.name, wanted)):
                        continue
                    fh = tf.extractfile(member)
                    if fh is None:
                        continue
                    yield member.name, fh.read()
                    n += 1
                    if limit and n >= limit:
                        return
        return
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    for p in files[:limit or None]:
        yield str(p), p.read_bytes()


def _suffixes(name: str, wanted: set[str]) -> list[str]:
    parts = name.split("/")
    return [s for s in ("/".join(parts[-k:]) for k in (2, 1)) if s in wanted]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--rules-dir", action="append", default=[], help="rule dir or .cf file")
    ap.add_argument("--no-builtin", action="store_true")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    paths = ([] if args.no_builtin else [str(BUILTIN_RULES)]) + args.rules_dir
    t0 = time.perf_counter()
    engines: dict[str, RuleSet] = {"reference": build_ruleset(paths, compiled=False),
                                   "prefilter": build_ruleset(paths, use_hyperscan=False)}
    if hyperscan_available():
        engines["hyperscan"] = build_ruleset(paths, use_hyperscan=True)
    print(f"rules: {', '.join(paths)}; built in {time.perf_counter() - t0:.1f}s")
    for name, rs in engines.items():
        st = rs.stats
        print(f"  {name:10s} engine={st.engine} active={sum(st.active.values())} "
              f"hyperscan_rules={st.hs_rules}")
    seconds: Counter[str] = Counter()
    differ: Counter[str] = Counter()
    examples: list[str] = []
    total = hits = 0
    for name, raw in messages(args.corpus, args.limit):
        msg = parse_message(raw)
        results = {}
        for engine, rs in engines.items():
            s = time.perf_counter()
            results[engine] = rs.scan(msg, now=0.0).counts
            seconds[engine] += time.perf_counter() - s
        ref = results["reference"]
        total += 1
        hits += len(ref)
        for engine, counts in results.items():
            if counts != ref:
                differ[engine] += 1
                if len(examples) < 20:
                    extra = sorted(set(counts.items()) - set(ref.items()))
                    missing = sorted(set(ref.items()) - set(counts.items()))
                    examples.append(f"{engine} {name}: extra {extra} missing {missing}")
        if total % 500 == 0:
            print(f"  ... {total} messages", flush=True)
    print(f"messages: {total}, reference hits: {hits} (sub-rules and metas included)")
    for engine in engines:
        if engine == "reference":
            continue
        print(f"  {engine:10s} messages with a different hit set: {differ[engine]}")
    for engine in engines:
        print(f"  {engine:10s} scan time {seconds[engine]:.1f}s "
              f"({1000 * seconds[engine] / max(total, 1):.2f} ms/msg)")
    for line in examples:
        print("  " + line)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
