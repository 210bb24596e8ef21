"""Accuracy benchmark: Bayes (+ rules) trained on the corpus train split, scored on its test split.

    python bench/accuracy_bench.py [--tune] [--no-rules] [--rules PATH ...]
                                   [--workers 2] [--corpus DIR] [--cache DIR]

1. Extracts ``../shared/corpus/spamassassin-public-corpus.tar.xz`` to a cache
   directory under /tmp (once; never into the repository).
2. Learns the **train** split (MANIFEST.tsv ``split=train``) into a fresh
   SQLite Bayes store through the same code path as ``mxguard learn``.
3. ``--tune``: 5-fold cross-validation *inside the train split* (train on 4/5,
   classify the held-out 1/5, in memory) gives an out-of-fold Bayes symbol and
   rule score for every train message; a grid search picks the BAYES_* scores
   that catch the most train spam with a false-positive rate <= 0.2% on train
   ham. Without ``--tune`` the defaults in ``mxguard.content.bayes`` are used
   (they came from this procedure). The test split is never used for tuning.
4. Scans the **test** split: MIME parse, tokenize, Bayes, rules; a message is
   spam when its score reaches ``[actions] add_header`` (5.0). Prints
   precision, recall, false-positive rate and F1 next to the anchors, scan
   throughput in one process and in ``--workers`` processes, and peak RSS.

The score of a message is its Bayes symbol's score plus, when the rule engine
is importable (``mxguard.content.rules``), its
rule score; otherwise Bayes alone (said in the output). Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import importlib
import itertools
import multiprocessing
import os
import resource
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxguard.cli.learn import Item, learn_items
from mxguard.config import Config
from mxguard.content import bayes as bayes_mod
from mxguard.content.bayes import BAYES_SCORES, BayesClassifier, probability, symbol_for
from mxguard.content.mime import parse_message
from mxguard.content.tokenizer import tokenize_message
from mxguard.store.bayes_store import LearnItem, MemoryBayesStore, SqliteBayesStore, hashes

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
ARCHIVE = "spamassassin-public-corpus.tar.xz"
FOLDS = 5
TARGET_FPR = 0.002

ANCHORS = [
    # name, recall, FPR, F1, msgs/s
    ("SpamAssassin 4.0.1 + Bayes", 0.954, 0.0067, 0.969, "17.5"),
    ("rspamd 3.4 + Bayes", 0.83, 0.0116, 0.895, "90"),
]


@dataclass
class Msg:
    file: str
    spam: bool
    split: str
    raw: bytes


# ------------------------------------------------------------ corpus


def extract(corpus: Path, cache: Path | None) -> Path:
    archive = corpus / ARCHIVE
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    root = cache or Path(tempfile.gettempdir()) / f"mxguard-accuracy-corpus-{digest}"
    marker = root / ".complete"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tf:
            tf.extractall(root, filter="data")
        marker.write_text(digest)
    return root


def load(corpus: Path, root: Path) -> list[Msg]:
    with open(corpus / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [Msg(r["file"], r["label"] == "spam", r["split"], (root / r["file"]).read_bytes())
            for r in rows]


# ------------------------------------------------------------ rules


def load_rule_engine(cfg: Config, no_rules: bool) -> tuple[Any, str]:
    """(ruleset or None, how it was found) -- imported dynamically: the rule
    engine is another part of the project and may be absent."""
    if no_rules:
        return None, "rules off (--no-rules): Bayes alone"
    for modname in ("mxguard.content.rules",):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        loader = getattr(mod, "load_rules", None)
        if loader is None:
            continue
        try:
            ruleset = loader(cfg)
        except Exception as exc:  # a broken engine: say so, measure Bayes alone
            return None, f"rule engine {modname} failed to load ({exc}): Bayes alone"
        active = sum(ruleset.stats.active.values()) if hasattr(ruleset, "stats") else "?"
        return ruleset, f"rules from {modname}.load_rules ({active} active rules)"
    return None, "NOTE: no rule engine importable (mxguard.content.rules): Bayes alone"


def rule_score(ruleset: Any, parsed: Any, prob: float | None, ready: bool) -> float:
    if ruleset is None:
        return 0.0
    res = ruleset.scan(parsed, bayes_prob=prob if ready else None, score_set=2 if ready else 0)
    return float(res.score)


# ------------------------------------------------------------ tuning (train only)


def cross_validate(train: list[Msg], ruleset: Any,
                   max_parts: int) -> list[tuple[str, float, bool]]:
    """Out-of-fold (Bayes symbol, rule score, is spam) for every train message.
    Rules are scanned as in the real scan: with the (out-of-fold) Bayes
    probability and the score set for "Bayes ready"."""
    parsed = [parse_message(m.raw, max_parts=max_parts) for m in train]
    toks = [hashes(tokenize_message(p)) for p in parsed]
    out: list[tuple[str, float, bool]] = []
    for k in range(FOLDS):
        store = MemoryBayesStore()
        store.learn_sync([LearnItem(m.file, toks[i], m.spam) for i, m in enumerate(train)
                          if i % FOLDS != k], 1)
        for i, m in enumerate(train):
            if i % FOLDS == k:
                prob, _ = probability(store.lookup_sync(toks[i]), toks[i])
                out.append((symbol_for(prob), rule_score(ruleset, parsed[i], prob, True),
                            m.spam))
    return out


def tune_scores(oof: list[tuple[str, float, bool]], threshold: float) -> dict[str, float]:
    """The monotone BAYES_* scores that catch the most out-of-fold train spam with
    FPR <= 0.2% on train ham; ties go to fewer false positives, then lower scores."""
    nham = sum(1 for *_, s in oof if not s)
    max_fp = int(TARGET_FPR * nham)
    fixed = {"BAYES_00": -1.5, "BAYES_05": -0.5, "BAYES_20": -0.1, "BAYES_40": 0.0}
    grid = {
        "BAYES_999": [4.0, 4.5, 5.0, 5.5, 6.0],
        "BAYES_99": [3.0, 3.5, 4.0, 4.5, 5.0],
        "BAYES_95": [2.5, 3.0, 3.5, 4.0, 4.5],
        "BAYES_80": [1.5, 2.0, 2.5, 3.0, 3.5],
        "BAYES_60": [1.0, 1.5, 2.0],
        "BAYES_50": [0.5, 0.8, 1.0],
    }
    names = list(grid)
    best: tuple[Any, ...] | None = None
    best_scores: dict[str, float] = dict(BAYES_SCORES)
    for combo in itertools.product(*(grid[n] for n in names)):
        if any(a < b for a, b in itertools.pairwise(combo)):
            continue
        scores = {**fixed, **dict(zip(names, combo, strict=True))}
        tp = fp = 0
        for sym, rs, spam in oof:
            if rs + scores[sym] >= threshold:
                if spam:
                    tp += 1
                else:
                    fp += 1
        key = (fp <= max_fp, tp, -fp, -sum(combo))
        if best is None or key > best:
            best, best_scores = key, scores
    return best_scores


# ------------------------------------------------------------ scanning


_W: dict[str, Any] = {}


def _scan_setup(db: str, cfg: Config, ruleset: Any, scores: dict[str, float]) -> None:
    _W.update(db=db, cfg=cfg, ruleset=ruleset, scores=scores)


def _scan_many(raws: Sequence[bytes]) -> list[tuple[float, float, str]]:
    """(total score, bayes prob, symbol) per message -- the whole content path."""
    cfg: Config = _W["cfg"]
    ruleset = _W["ruleset"]
    scores: dict[str, float] = _W["scores"]

    async def go() -> list[tuple[float, float, str]]:
        store = SqliteBayesStore(_W["db"])
        clf = BayesClassifier(store, cfg.bayes)
        out = []
        try:
            for raw in raws:
                parsed = parse_message(raw, max_parts=cfg.content.max_parts)
                res = await clf.classify(tokenize_message(parsed))
                total = scores.get(res.symbol, 0.0) if res.ready else 0.0
                total += rule_score(ruleset, parsed, res.prob, res.ready)
                out.append((total, res.prob, res.symbol))
        finally:
            await store.close()
        return out

    return asyncio.run(go())


def _noop(_: int) -> int:
    return os.getpid()


def scan_parallel(raws: list[bytes], workers: int) -> float:
    """Seconds to scan ``raws`` with ``workers`` processes (started before the clock)."""
    ctx = multiprocessing.get_context("fork")
    chunk = 25
    parts = [raws[i:i + chunk] for i in range(0, len(raws), chunk)]
    with ctx.Pool(workers) as pool:
        pool.map(_noop, range(workers * 4))
        t0 = time.perf_counter()
        pool.map(_scan_many, parts, chunksize=1)
        return time.perf_counter() - t0


# ------------------------------------------------------------ report


def metrics(results: list[tuple[bool, bool]]) -> dict[str, float]:
    tp = sum(1 for spam, flagged in results if spam and flagged)
    fp = sum(1 for spam, flagged in results if not spam and flagged)
    fn = sum(1 for spam, flagged in results if spam and not flagged)
    tn = sum(1 for spam, flagged in results if not spam and not flagged)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall,
            "fpr": fpr, "f1": f1}


def rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--cache", type=Path, default=None, help="extraction dir (default /tmp/...)")
    ap.add_argument("--tune", action="store_true",
                    help="re-derive the BAYES_* scores by cross-validation on the train split")
    ap.add_argument("--no-rules", action="store_true", help="Bayes alone")
    ap.add_argument("--rules", action="append", default=[],
                    help="extra rule dir/file ([content] rules_dirs), e.g. /usr/share/spamassassin")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    started = time.perf_counter()
    cfg = Config()
    if args.rules:
        from dataclasses import replace
        cfg = replace(cfg, content=replace(cfg.content, rules_dirs=list(args.rules)))
    threshold = cfg.actions.add_header
    root = extract(args.corpus, args.cache)
    msgs = load(args.corpus, root)
    train = [m for m in msgs if m.split == "train"]
    test = [m for m in msgs if m.split == "test"]
    print(f"corpus: {len(msgs)} messages ({root}); train {len(train)} "
          f"({sum(m.spam for m in train)} spam), test {len(test)} "
          f"({sum(m.spam for m in test)} spam)")

    t0 = time.perf_counter()
    ruleset, rules_note = load_rule_engine(cfg, args.no_rules)
    print(f"{rules_note} (loaded in {time.perf_counter() - t0:.1f}s)")

    with tempfile.TemporaryDirectory(prefix="mxguard-accuracy-") as tmp:
        db = str(Path(tmp) / "mxguard.db")

        async def train_store() -> tuple[float, int]:
            store = SqliteBayesStore(db)
            clf = BayesClassifier(store, cfg.bayes)
            t = time.perf_counter()
            for spam in (True, False):
                items = (Item(m.file, m.raw) for m in train if m.spam is spam)
                await learn_items(clf, items, spam=spam, max_parts=cfg.content.max_parts)
            elapsed = time.perf_counter() - t
            tokens = (await store.stats()).tokens
            await store.close()
            return elapsed, tokens

        learn_s, ntokens = asyncio.run(train_store())
        print(f"learn (train split, as `mxguard learn`): {len(train)} messages in "
              f"{learn_s:.1f}s ({len(train) / learn_s:.0f} msgs/s), {ntokens} tokens")

        scores = dict(BAYES_SCORES)
        if args.tune:
            t0 = time.perf_counter()
            oof = cross_validate(train, ruleset, cfg.content.max_parts)
            scores = tune_scores(oof, threshold)
            print(f"tuned on train only ({FOLDS}-fold cross-validation, "
                  f"{time.perf_counter() - t0:.0f}s): " +
                  " ".join(f"{k}={v:g}" for k, v in sorted(scores.items())))
        else:
            print("BAYES_* scores: the defaults of mxguard.content.bayes (tuned on the train "
                  "split by --tune; the test split is never used for tuning)")
        params = bayes_mod.DEFAULT_PARAMS
        print(f"Bayes: s={params.s} x={params.x} min_strength={params.min_strength} "
              f"max_tokens={params.max_tokens}; min_spam={cfg.bayes.min_spam} "
              f"min_ham={cfg.bayes.min_ham}")

        _scan_setup(db, cfg, ruleset, scores)
        raws = [m.raw for m in test]
        t0 = time.perf_counter()
        scanned = _scan_many(raws)
        single_s = time.perf_counter() - t0
        parallel_s = scan_parallel(raws, args.workers) if args.workers > 1 else single_s

    results = [(m.spam, total >= threshold) for m, (total, _, _) in zip(test, scanned,
                                                                        strict=True)]
    r = metrics(results)
    single = len(test) / single_s
    multi = len(test) / parallel_s
    bayes_only = metrics([(m.spam, scores.get(sym, 0.0) >= threshold)
                          for m, (_, _, sym) in zip(test, scanned, strict=True)])

    print()
    print(f"test split: {len(test)} messages, spam = score >= {threshold:g} "
          f"([actions] add_header)")
    print(f"  TP {r['tp']}  FP {r['fp']}  FN {r['fn']}  TN {r['tn']}")
    print()
    head = f"{'':30s} {'recall':>7s} {'FPR':>7s} {'precision':>9s} {'F1':>6s} {'msgs/s':>16s}"
    print(head)
    print("-" * len(head))
    print(f"{'mxguard (this run)':30s} {r['recall']:7.3f} {r['fpr'] * 100:6.2f}% "
          f"{r['precision']:9.3f} {r['f1']:6.3f} "
          f"{f'{single:.0f} / {multi:.0f} ({args.workers}p)':>16s}")
    print(f"{'  of which Bayes alone':30s} {bayes_only['recall']:7.3f} "
          f"{bayes_only['fpr'] * 100:6.2f}% {bayes_only['precision']:9.3f} "
          f"{bayes_only['f1']:6.3f} {'':>16s}")
    for name, rec, fpr, f1, rate in ANCHORS:
        print(f"{name:30s} {rec:7.3f} {fpr * 100:6.2f}% {'-':>9s} {f1:6.3f} {rate:>16s}")
    print(f"{'target':30s} {'>=0.96':>7s} {'<=0.2%':>7s} {'':>9s} {'':>6s} "
          f"{'>=150 (2 clients)':>16s}")
    print()
    print(f"scan = MIME parse + tokenize + Bayes (SQLite store) + rules, per message; "
          f"1 process {single_s:.1f}s, {args.workers} processes {parallel_s:.1f}s "
          f"on {os.cpu_count()} CPUs")
    print(f"peak RSS: {rss_mb(resource.RUSAGE_SELF):.0f} MB main process, "
          f"{rss_mb(resource.RUSAGE_CHILDREN):.0f} MB largest worker")
    print(f"total time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
