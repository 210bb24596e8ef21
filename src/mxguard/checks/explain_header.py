"""``[milter] explain_header``: ``X-Mxguard-Reason:`` on incoming mail, for admins
who read headers -- the action, the check that decided it, the score and the
strongest symbols::

    X-Mxguard-Reason: accept by actions; score 7.2; top symbols BAYES_99(5),
        HTML_ONLY(2.2)

ASCII only, folded, at most :data:`MAX_LINE` characters per line and
:data:`MAX_SYMBOLS` symbols. A header of that name that came with the message is
removed first (nobody outside may tell our users why we let mail in). Off by
default; a DONE-stage row: it reads the verdict.
"""

from __future__ import annotations

from mxguard.core.runtime import Runtime
from mxguard.core.transaction import (
    CheckResult,
    Edit,
    HeaderChange,
    HeaderEdit,
    Symbol,
    Transaction,
    Verdict,
)

NAME = "explain_header"
HEADER = "X-Mxguard-Reason"
SYMBOLS: tuple[str, ...] = ()
MAX_SYMBOLS = 8
MAX_LINE = 998
FOLD_WIDTH = 78
FOLD = "\r\n\t"


def _ascii(text: str) -> str:
    return "".join(c if " " < c <= "~" else "_" for c in text)


def top_symbols(symbols: list[Symbol], limit: int = MAX_SYMBOLS) -> list[Symbol]:
    """The scored symbols, strongest (by absolute score) first."""
    scored = [s for s in symbols if s.score]
    return sorted(scored, key=lambda s: (-abs(s.score), s.name))[:limit]


def reason_value(verdict: Verdict) -> str:
    """The header's value, folded after commas and semicolons."""
    head = [f"{verdict.action.value} by {_ascii(verdict.decided_by or 'actions')};",
            f"score {round(verdict.score, 3):g};"]
    tops = top_symbols(verdict.symbols)
    words = head + (["top symbols"] if tops else ["no scored symbols"])
    words += [f"{_ascii(s.name)[:60]}({s.score:g})" + ("," if i < len(tops) - 1 else "")
              for i, s in enumerate(tops)]
    lines: list[str] = []
    line = ""
    offset = len(HEADER) + 2
    for word in words:
        candidate = f"{line} {word}" if line else word
        width = FOLD_WIDTH - (offset if not lines else 1)
        if len(candidate) > width and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return FOLD.join(ln[:MAX_LINE - offset] for ln in lines)


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    verdict = tx.verdict
    if verdict is None:
        return None
    headers = tx.message.headers if tx.message is not None else []
    count = sum(1 for name, _ in headers if name.strip().lower() == HEADER.lower())
    edits: list[Edit] = [HeaderChange.delete(HEADER, n) for n in range(count, 0, -1)]
    return CheckResult(NAME, headers=[HeaderEdit(HEADER, reason_value(verdict))], edits=edits)


__all__ = ["HEADER", "NAME", "SYMBOLS", "check", "reason_value"]
