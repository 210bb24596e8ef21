"""Bayes cold start: what autolearn would learn from an empty store, per policy.

    python bench/cold_start_bench.py --corpus DIR [--cache DIR] [--split train|test|all]

Scores every corpus message with the built-in rules **without Bayes** (as
autolearn sees it while Bayes is not ready) and counts, for each
``[bayes] cold_start`` policy, how many spam and ham autolearn would take as
spam and as ham -- and how many of those lessons would be **wrong** (ham
learned as spam, spam learned as ham), which is what ``strict`` is for. The
corpus is offline mail: no DNS, so no DMARC_PASS, so a strict cold start learns
no ham from it (live mail that passes DMARC would be). Prints figures; asserts
nothing. The corpus is the one of bench/accuracy_bench.py (MANIFEST.tsv).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_bench import DEFAULT_CORPUS, extract, load, load_rule_engine, rule_score

from mxguard.checks.bayes import cold_start_autolearn
from mxguard.config import Config
from mxguard.content.bayes import autolearn_decision
from mxguard.content.mime import parse_message
from mxguard.core.transaction import Symbol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--split", choices=("train", "test", "all"), default="train")
    args = ap.parse_args()
    cfg = Config()
    msgs = load(args.corpus, extract(args.corpus, args.cache))
    if args.split != "all":
        msgs = [m for m in msgs if m.split == args.split]
    ruleset, how = load_rule_engine(cfg, False)
    print(f"{len(msgs)} messages ({args.split} split); {how}")
    started = time.monotonic()
    scored: list[tuple[bool, float]] = []
    for m in msgs:
        parsed = parse_message(m.raw, max_parts=cfg.content.max_parts)
        scored.append((m.spam, rule_score(ruleset, parsed, None, False)))
    print(f"scored in {time.monotonic() - started:.1f}s")
    nspam = sum(1 for s, _ in scored if s)
    nham = len(scored) - nspam
    spam_scores = sorted(sc for s, sc in scored if s)
    ham_scores = sorted(sc for s, sc in scored if not s)
    for bar in (5.0, 8.0, cfg.bayes.autolearn_spam,
                cfg.bayes.autolearn_spam + cfg.bayes.cold_start_margin):
        print(f"score without Bayes >= {bar:g}: spam {sum(sc >= bar for sc in spam_scores)}"
              f"/{nspam}, ham {sum(sc >= bar for sc in ham_scores)}/{nham}")
    print(f"highest score without Bayes: spam {spam_scores[-1]:.1f}, ham {ham_scores[-1]:.1f}; "
          f"below autolearn_ham ({cfg.bayes.autolearn_ham:g}): spam "
          f"{sum(sc < cfg.bayes.autolearn_ham for sc in spam_scores)}, ham "
          f"{sum(sc < cfg.bayes.autolearn_ham for sc in ham_scores)}")
    print(f"{'policy':<8} {'spam->spam':>11} {'ham->ham':>9} {'ham->spam (wrong)':>18} "
          f"{'spam->ham (wrong)':>18}")
    # No DNS here: no DMARC_PASS symbol, and no rule hit is known per symbol from
    # the score alone -- a ham "with no rule against it" needs the symbol list,
    # so strict ham is counted as the corpus allows: none.
    symbols: list[Symbol] = []
    for policy in ("normal", "strict", "off"):
        bcfg = replace(cfg.bayes, cold_start=policy)
        counts = {"ss": 0, "hh": 0, "hs": 0, "sh": 0}
        for spam, score in scored:
            d = cold_start_autolearn(autolearn_decision(score, 0.0, bcfg), rest=score,
                                     symbols=symbols, cfg=bcfg)
            if d.spam is None:
                continue
            counts[("s" if spam else "h") + ("s" if d.spam else "h")] += 1
        print(f"{policy:<8} {counts['ss']:>5}/{nspam:<5} {counts['hh']:>4}/{nham:<4} "
              f"{counts['hs']:>18} {counts['sh']:>18}")


if __name__ == "__main__":
    main()
