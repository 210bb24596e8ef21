"""X-Spam-* headers once the verdict is known, in SpamAssassin's grammar so
existing filters keep working::

    X-Spam-Flag: YES                      (only when score >= [actions] add_header)
    X-Spam-Status: Yes, score=7.3 required=5.0 tests=RULE_A,RULE_B
    \tautolearn=no autolearn_force=no version=mxguard-0.1.0
    X-Spam-Level: *******                 (one star per whole point, at most 50)
    X-Spam-Report: ...                    (with [content] add_report)

The score is the verdict's total (every check's symbols); ``tests=`` lists
every scored symbol. Not written in observe mode. ``mxguard scan`` prints the
same headers for the same message and config.

Config: ``[content] mode, header_prefix, add_report``, ``[actions] add_header``.
"""

from __future__ import annotations

from typing import Any

from mxguard import __version__
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import CheckResult, HeaderEdit, Symbol, Transaction
from mxguard.core.verdict import is_spam, printable

NAME = "spam_headers"
SYMBOLS: tuple[str, ...] = ()
VERSION = f"mxguard-{__version__}"
MAX_STARS = 50
FOLD = "\r\n\t"
FOLD_WIDTH = 78


def status_value(score: float, required: float, tests: list[str], spam: bool,
                 autolearn: str = "no", header_name: str = "X-Spam-Status",
                 autolearn_force: str = "no") -> str:
    """``Yes, score=7.3 required=5.0 tests=A,B autolearn=no autolearn_force=no version=..``,
    folded like SpamAssassin's (the tests list wraps after a comma)."""
    head = f"{'Yes' if spam else 'No'}, score={score:.1f} required={required:.1f}"
    names = ",".join(tests) if tests else "none"
    # Break the tests list into pieces ending in a comma so it wraps after commas.
    pieces = [p + "," for p in names.split(",")]
    pieces[-1] = pieces[-1][:-1]
    words = [head, "tests=" + pieces[0], *pieces[1:]]
    tail = [f"autolearn={autolearn}", f"autolearn_force={autolearn_force}", f"version={VERSION}"]
    lines: list[str] = []
    line = ""
    offset = len(header_name) + 2
    for word in words + tail:
        joiner = "" if line.endswith(",") else " "
        candidate = f"{line}{joiner}{word}" if line else word
        width = FOLD_WIDTH - (offset if not lines else 8)
        if len(candidate) > width and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return FOLD.join(lines)


def report_value(score: float, required: float, symbols: list[Symbol],
                 descriptions: dict[str, str]) -> str:
    lines = [f"Content analysis details: ({score:.1f} points, {required:.1f} required)"]
    for s in sorted(symbols, key=lambda s: (-s.score, s.name)):
        desc = descriptions.get(s.name) or s.detail
        lines.append(f"* {s.score:5.1f} {s.name} {printable(desc)}".rstrip())
    return FOLD.join(lines)


def spam_headers(verdict_score: float, symbols: list[Symbol], cfg: Any,
                 autolearn: str = "no", descriptions: dict[str, str] | None = None
                 ) -> list[HeaderEdit]:
    """X-Spam-Flag (only for spam), X-Spam-Status, X-Spam-Level and, with
    ``add_report``, X-Spam-Report.

    ``verdict_score`` is the total; ``symbols`` every scored symbol of the
    message (zero-score symbols are left out of ``tests=``, as SpamAssassin
    runs no zero-score rule); ``cfg`` the Config.
    """
    prefix = cfg.content.header_prefix
    actions = cfg.actions
    required = float(actions.add_header)
    spam = is_spam(verdict_score, actions)
    scored = [s for s in symbols if s.score]
    tests = sorted({s.name for s in scored})
    stars = "*" * max(0, min(MAX_STARS, int(verdict_score)))
    edits = []
    if spam:
        edits.append(HeaderEdit(f"{prefix}Flag", "YES"))
    edits.append(HeaderEdit(f"{prefix}Status", status_value(
        verdict_score, required, tests, spam, autolearn, f"{prefix}Status")))
    edits.append(HeaderEdit(f"{prefix}Level", stars))
    if cfg.content.add_report and scored:
        edits.append(HeaderEdit(f"{prefix}Report", report_value(
            verdict_score, required, scored, descriptions or {})))
    return edits


def descriptions_of(tx: Transaction) -> dict[str, str]:
    rules = tx.results.get("rules")
    hits = getattr(rules.data, "hits", []) if rules is not None else []
    return {h.name: h.description for h in hits}


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    verdict = tx.verdict
    if verdict is None:
        return None
    autolearn = verdict.extra.get("autolearn", "no")
    return CheckResult(NAME, headers=spam_headers(round(verdict.score, 3), verdict.symbols,
                                                  rt.config, autolearn, descriptions_of(tx)))


__all__ = ["NAME", "SYMBOLS", "check", "descriptions_of", "report_value", "spam_headers",
           "status_value"]
