"""Accuracy benchmark: the daemon's content pipeline on the SpamAssassin public corpus.

    python bench/accuracy_bench.py [--split random|time] [--rules-dir DIR ...]
                                   [--no-builtin] [--no-bayes] [--dev] [--jobs N]
                                   [--repeat 3] [--top 25] [--corpus DIR] [--cache DIR]
                                   [--fit K [--folds N]] [--dump FILE]
                                   [--bayes-params s=..,x=..,min_strength=..,max_tokens=..]
                                   [--score SYMBOL=N ...]

Every message goes through the same pipeline ``mxguard scan`` and the milter
door run at end of message (:func:`mxguard.cli.scan.scan_async`: the rules
``[content]`` names, Bayes from the configured store, the ``[actions]``), with
the network checks off (no SMTP client, no DNS here) and autolearn off. A
message counts as spam when the pipeline adds ``X-Spam-Flag: YES`` or refuses
it (``[actions] add_header`` = 5.0, ``reject`` = 15.0: the defaults).

Splits (MANIFEST.tsv names each message's group and random split):

* ``--split random``: learn MANIFEST's ``train`` half, test its ``test`` half
  (fresh Bayes: learned on mail of the same years);
* ``--split time``: learn the older groups ``spam`` and ``easy_ham`` (whole),
  test the later ``spam_2``, ``easy_ham_2`` and ``hard_ham`` (whole): the
  stand-in for Bayes data a few years older than the mail it scores.

Development without looking at a test half:

* ``--dev``: only MANIFEST's train half of the groups ``spam``, ``easy_ham``
  and ``hard_ham`` (the commercial ham, as a false-positive guard): learn
  every other one, test the rest (no message of the random split's test half
  is read; the time split's test shares the ``hard_ham`` train half, so
  trust its ``hard_ham`` figure on the test half the bench prints);
* ``--no-bayes``: rules alone (Bayes off), e.g. ``--dev --no-bayes`` to see
  what the rules catch on the train groups.

Score fitting without looking at a test half (``bench/fit_scores.py``):

* ``--fit K``: only MANIFEST's train half. ``--split time --fit 0``: learn
  its 2002 groups, test its later ones (stale Bayes); ``--split random --fit
  K --folds N``: N-fold cross-validation inside it, fold K tested;
* ``--dump FILE``: one JSON line per tested message (group, split, the
  symbols with their scores, Bayes' probability in full), the input of
  ``bench/fit_scores.py``;
* ``--bayes-params`` and ``--score`` try other Bayes constants or
  ``[scores]`` for one run.

The time split's report also prints a **held-out** line: recall and FPR of
its tested messages that are in MANIFEST's test half (the clean figure:
the rest of its test set is in the train half, which rules and scores were
developed on).

Learning goes through ``mxguard learn``'s code path (``learn_items``) into a
fresh SQLite store in a temporary directory. The scan runs in ``--jobs``
processes (forked after the rules are loaded, each with its own store
connection); ``--repeat`` scans again and reports the median msgs/s (the hits
are the same every time). Prints recall, FPR (with counts), msgs/s, the
flagged share per corpus group (also of the group's MANIFEST test half alone:
for the time split, the messages no rule was ever developed on) and the
rules' hit counts on the spam and ham of the tested messages; progress on
stderr. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxguard import config
from mxguard.checks import bayes as bayes_check
from mxguard.checks.rules import RULES_SERVICE
from mxguard.cli.learn import Item, learn_items
from mxguard.cli.scan import scan_async
from mxguard.content.bayes import DEFAULT_PARAMS, BayesClassifier, BayesParams, BayesResult
from mxguard.content.rules import RuleSet
from mxguard.server.daemon import load_content_rules
from mxguard.store.backends import open_bayes_store

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
ARCHIVE = "spamassassin-public-corpus.tar.xz"
TIME_TRAIN = ("spam", "easy_ham")
TIME_TEST = ("spam_2", "easy_ham_2", "hard_ham")
DEV_GROUPS = (*TIME_TRAIN, "hard_ham")
CHUNK = 20


@dataclass
class Msg:
    file: str
    spam: bool
    group: str
    split: str
    raw: bytes


@dataclass
class Outcome:
    score: float
    flagged: bool
    symbols: list[str]
    scores: list[float] = dataclasses.field(default_factory=list)
    bayes: str = ""  # the Bayes symbol's detail (prob=... tokens=...), "" when none


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
    return [Msg(r["file"], r["label"] == "spam", r["group"], r["split"],
                (root / r["file"]).read_bytes()) for r in rows]


def split(msgs: list[Msg], how: str, dev: bool, learn: bool = True,
          fit: int | None = None, folds: int = 2) -> tuple[list[Msg], list[Msg]]:
    """(learned, tested) of the chosen split; with ``dev`` both from its train part;
    with ``fit`` (0 or 1) the split inside MANIFEST's train half that
    ``bench/fit_scores.py`` fits scores on (time: learn the train half of the
    2002 groups, test the train half of the later ones; random: ``folds``-fold
    cross-validation inside the train half, ``fit`` naming the fold tested:
    every ``folds``-th message from the ``fit``-th on, the others learned)."""
    if fit is not None:
        pool = [m for m in msgs if m.split == "train"]
        if how == "time":
            return ([m for m in pool if m.group in TIME_TRAIN],
                    [m for m in pool if m.group in TIME_TEST])
        tested = pool[fit::folds]
        return ([m for i, m in enumerate(pool) if i % folds != fit], tested) if learn \
            else ([], pool)
    if how == "time":
        train = [m for m in msgs if m.group in TIME_TRAIN]
        test = [m for m in msgs if m.group in TIME_TEST]
    else:
        train = [m for m in msgs if m.split == "train"]
        test = [m for m in msgs if m.split == "test"]
    if dev:  # MANIFEST train half of the 2002 groups and of hard_ham (the FPR guard)
        pool = [m for m in msgs if m.split == "train" and m.group in DEV_GROUPS]
        return (pool[0::2], pool[1::2]) if learn else ([], pool)
    return train, test


# ------------------------------------------------------------ pipeline


def bench_config(state: Path, rules_dirs: list[str], builtin: bool, bayes: bool) -> config.Config:
    base = config.Config()
    return dataclasses.replace(
        base,
        storage=dataclasses.replace(base.storage, url=f"sqlite:///{state}/mxguard.db"),
        content=dataclasses.replace(base.content, rules_dirs=rules_dirs, builtin_rules=builtin),
        bayes=dataclasses.replace(base.bayes, autolearn=False, enabled=bayes),
    )


async def learn(cfg: config.Config, msgs: list[Msg]) -> tuple[float, int]:
    store = open_bayes_store(cfg)
    clf = BayesClassifier(store, cfg.bayes)
    t0 = time.perf_counter()
    try:
        for spam in (True, False):
            items = (Item(m.file, m.raw) for m in msgs if m.spam is spam)
            await learn_items(clf, items, spam=spam, max_parts=cfg.content.max_parts)
        tokens = (await store.stats()).tokens
    finally:
        await store.close()
    return time.perf_counter() - t0, tokens


_W: dict[str, Any] = {}


def _setup(cfg: config.Config, ruleset: RuleSet | None, params: BayesParams) -> None:
    _W.update(cfg=cfg, ruleset=ruleset, params=params)


def _scan_chunk(raws: Sequence[bytes]) -> list[Outcome]:
    """Scan ``raws`` as ``mxguard scan`` does, with this process' own store."""
    cfg: config.Config = _W["cfg"]

    async def go() -> list[Outcome]:
        services: dict[str, Any] = {}
        if _W["ruleset"] is not None:
            services[RULES_SERVICE] = _W["ruleset"]
        store = None
        if cfg.bayes.enabled:
            store = open_bayes_store(cfg)
            services["bayes_store"] = store
            services[bayes_check.SERVICE] = BayesClassifier(store, cfg.bayes,
                                                            params=_W["params"])
        out = []
        try:
            for raw in raws:
                rep = await scan_async(raw, cfg, services)
                flagged = bool(rep["spam"]) or rep["verdict"] == "reject"
                syms = rep["symbols"]
                out.append(Outcome(rep["score"], flagged, [s["name"] for s in syms],
                                   [s["score"] for s in syms],
                                   next((s["description"] for s in syms
                                         if s["name"].startswith("BAYES_")), "")))
        finally:
            if store is not None:
                await store.close()
        return out

    return asyncio.run(go())


def scan_all(msgs: list[Msg], jobs: int, label: str) -> tuple[list[Outcome], float]:
    """(outcome per message, seconds) with ``jobs`` forked processes."""
    raws = [m.raw for m in msgs]
    parts = [raws[i:i + CHUNK] for i in range(0, len(raws), CHUNK)]
    out: list[Outcome] = []
    t0 = time.perf_counter()
    if jobs <= 1:
        for i, part in enumerate(parts):
            out.extend(_scan_chunk(part))
            _progress(label, (i + 1) * CHUNK, len(raws), t0)
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs) as pool:
            for i, res in enumerate(pool.imap(_scan_chunk, parts, chunksize=1)):
                out.extend(res)
                _progress(label, (i + 1) * CHUNK, len(raws), t0)
    seconds = time.perf_counter() - t0
    print(file=sys.stderr)
    return out, seconds


def _progress(label: str, done: int, total: int, t0: float) -> None:
    done = min(done, total)
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"\r{label}: {done}/{total} ({rate:.0f} msgs/s)", end="", file=sys.stderr,
          flush=True)


# ------------------------------------------------------------ report


def report(tested: list[Msg], outs: list[Outcome], rates: list[float], top: int) -> None:
    spam = [o for m, o in zip(tested, outs, strict=True) if m.spam]
    ham = [o for m, o in zip(tested, outs, strict=True) if not m.spam]
    tp = sum(o.flagged for o in spam)
    fp = sum(o.flagged for o in ham)
    recall = tp / len(spam) if spam else 0.0
    fpr = fp / len(ham) if ham else 0.0
    rate = statistics.median(rates)
    print(f"tested {len(tested)}: {len(spam)} spam, {len(ham)} ham")
    print(f"recall {recall:.3f} ({tp}/{len(spam)})   FPR {fpr * 100:.2f} % ({fp}/{len(ham)})   "
          f"msgs/s {rate:.0f} (median of {len(rates)}: "
          f"{', '.join(f'{r:.0f}' for r in rates)})")
    held = [(m, o) for m, o in zip(tested, outs, strict=True) if m.split == "test"]
    if len(held) < len(tested):  # the time split tests train-half messages too
        hs_ = [o for m, o in held if m.spam]
        hh_ = [o for m, o in held if not m.spam]
        htp, hfp = sum(o.flagged for o in hs_), sum(o.flagged for o in hh_)
        print(f"held-out (MANIFEST test half only, never tuned on): "
              f"recall {htp / max(len(hs_), 1):.3f} ({htp}/{len(hs_)})   "
              f"FPR {hfp / max(len(hh_), 1) * 100:.2f} % ({hfp}/{len(hh_)})")
    groups: dict[str, list[tuple[Msg, Outcome]]] = {}
    for m, o in zip(tested, outs, strict=True):
        groups.setdefault(m.group, []).append((m, o))
    for g, pairs in sorted(groups.items()):
        half = [o for m, o in pairs if m.split == "test"]
        print(f"  {g:<11} {sum(o.flagged for _, o in pairs):5d}/{len(pairs):<5d} flagged"
              f"   (of MANIFEST's test half: {sum(o.flagged for o in half)}/{len(half)})")
    hs = Counter(s for o in spam for s in set(o.symbols))
    hh = Counter(s for o in ham for s in set(o.symbols))
    names = sorted(set(hs) | set(hh), key=lambda n: (-hs[n], hh[n], n))
    print()
    print(f"rule hits on the tested messages (top {top} by spam hits, then every rule "
          "hitting ham):")
    print(f"  {'symbol':<32s} {'spam':>6s} {'ham':>6s}")
    shown = names[:top] + [n for n in names[top:] if hh[n]]
    for n in shown:
        print(f"  {n:<32s} {hs[n]:6d} {hh[n]:6d}")


def dump(path: Path, tested: list[Msg], outs: list[Outcome]) -> None:
    with open(path, "w") as fh:
        for m, o in zip(tested, outs, strict=True):
            fh.write(json.dumps({"file": m.file, "group": m.group, "split": m.split,
                                 "spam": m.spam, "score": o.score, "flagged": o.flagged,
                                 "symbols": dict(zip(o.symbols, o.scores, strict=True)),
                                 "bayes": o.bayes}) + "\n")
    print(f"dumped {len(tested)} outcomes to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--split", choices=("random", "time"), default="random")
    ap.add_argument("--rules-dir", action="append", default=[],
                    help="SpamAssassin rule directory ([content] rules_dirs), e.g. "
                    "/usr/share/spamassassin; repeatable")
    ap.add_argument("--no-builtin", action="store_true", help="leave out mxguard's own rules")
    ap.add_argument("--no-bayes", action="store_true", help="rules alone (nothing learned)")
    ap.add_argument("--dev", action="store_true",
                    help="train of both splits only: learn half of it, test the other half")
    ap.add_argument("--folds", type=int, default=2, help="folds of --split random --fit")
    ap.add_argument("--fit", type=int, default=None,
                    help="score-fitting split inside MANIFEST's train half (see split()); "
                    "with --dump, the input of bench/fit_scores.py")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=1, help="scans for the msgs/s median")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--cache", type=Path, default=None, help="extraction dir (default /tmp/...)")
    ap.add_argument("--dump", type=Path, default=None,
                    help="write one JSON line per tested message (file, group, split, spam, "
                    "score, flagged, symbols with scores, Bayes detail) for bench/fit_scores.py")
    ap.add_argument("--bayes-params", default="",
                    help="Bayes constants to try instead of the defaults, e.g. "
                    "'s=0.4,x=0.5,min_strength=0.1,max_tokens=300'")
    ap.add_argument("--score", action="append", default=[], metavar="SYMBOL=N",
                    help="[scores] override for this run; repeatable")
    args = ap.parse_args()
    params = DEFAULT_PARAMS
    for item in filter(None, args.bayes_params.split(",")):
        key, _, value = item.partition("=")
        params = dataclasses.replace(params, **{key: type(getattr(params, key))(value)})

    if args.dump is not None:  # the dump keeps Bayes' probability in full
        BayesResult.detail = property(  # type: ignore[assignment, method-assign]
            lambda r: f"prob={r.prob!r} tokens={r.used}/{r.tokens}")
    started = time.perf_counter()
    root = extract(args.corpus, args.cache)
    learned, tested = split(load(args.corpus, root), args.split, args.dev,
                            learn=not args.no_bayes, fit=args.fit, folds=args.folds)
    name = "dev (MANIFEST train half of spam, easy_ham, hard_ham)" if args.dev else args.split
    if args.fit is not None:
        name = f"{args.split}, fit {args.fit} of {args.folds} (MANIFEST train half only)"
    print(f"split {name}: learn "
          f"{len(learned)} ({sum(m.spam for m in learned)} spam), test {len(tested)} "
          f"({sum(m.spam for m in tested)} spam)")
    with tempfile.TemporaryDirectory(prefix="mxguard-accuracy-") as tmp:
        cfg = bench_config(Path(tmp), args.rules_dir, not args.no_builtin, not args.no_bayes)
        if args.score:
            extra = {k: float(v) for k, _, v in (x.partition("=") for x in args.score)}
            cfg = dataclasses.replace(cfg, scores={**cfg.scores, **extra})
        t0 = time.perf_counter()
        ruleset = load_content_rules(cfg)
        active = sum(ruleset.stats.active.values()) if ruleset is not None else 0
        print(f"rules: {'builtin' if cfg.content.builtin_rules else 'no builtin'}"
              f"{' + ' + ', '.join(args.rules_dir) if args.rules_dir else ''}: {active} active, "
              f"loaded in {time.perf_counter() - t0:.1f}s")
        if cfg.bayes.enabled:
            secs, tokens = asyncio.run(learn(cfg, learned))
            print(f"learned {len(learned)} messages in {secs:.0f}s ({tokens} tokens); "
                  "autolearn off")
            if params != DEFAULT_PARAMS:
                print(f"Bayes constants: {params}")
        else:
            print("Bayes off")
        _setup(cfg, ruleset, params)
        rates: list[float] = []
        outs: list[Outcome] = []
        for i in range(max(1, args.repeat)):
            outs, secs = scan_all(tested, args.jobs, f"scan {i + 1}/{args.repeat}")
            rates.append(len(tested) / secs)
    print(f"scan: {args.jobs} process(es) on {os.cpu_count()} CPUs, whole pipeline per message "
          "(MIME, rules, Bayes, actions)")
    report(tested, outs, rates, args.top)
    if args.dump is not None:
        dump(args.dump, tested, outs)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
