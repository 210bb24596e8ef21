"""The literal prefilter of the rule engine: which regex rules may match a text.

Every regex's required literal strings (from the parsed pattern,
:func:`required_literals`) are looked up in the lower-cased text first --
with one Hyperscan pass over all literals when the ``hyperscan`` package is
installed (and ``MXGUARD_NO_HYPERSCAN`` is unset), else with ``bytes in`` --
and only rules whose literals occur are run (:class:`Prefilter`).
"""

from __future__ import annotations

import logging
import os
import re
import re._constants as sre_c
import re._parser as sre_parse
import threading
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger("mxguard")

MIN_LITERAL = 3  # shorter required literals are not worth a prefilter


class HasLiterals(Protocol):
    """A rule as the prefilter sees it: its required literals, or None (always run)."""

    @property
    def literals(self) -> tuple[bytes, ...] | None: ...


R = TypeVar("R", bound=HasLiterals)


def required_literals(pattern: re.Pattern[bytes]) -> tuple[bytes, ...] | None:
    """Lower-cased strings of which at least one occurs in every match, or
    None when no useful set exists (then the rule always runs)."""
    try:
        parsed = sre_parse.parse(pattern.pattern, pattern.flags)
    except Exception:
        return None
    found = _required(list(parsed))
    if not found or min(len(x) for x in found) < MIN_LITERAL:
        return None
    return tuple(sorted({x.lower() for x in found}))


def _rank(cands: set[bytes] | None) -> float:
    if not cands:
        return -1.0
    return min(len(c) for c in cands) - 0.5 * (len(cands) - 1) / len(cands)


def _in_literal(av: list[tuple[Any, Any]]) -> int | None:
    """``[Vv]`` -> ord('v'): a class that is one letter in either case."""
    if av and all(op is sre_c.LITERAL for op, _ in av):
        lowered = {bytes([v]).lower() for _, v in av}
        if len(lowered) == 1:
            return lowered.pop()[0]
    return None


def _required(items: list[tuple[Any, Any]]) -> set[bytes] | None:
    best: set[bytes] | None = None
    run = bytearray()

    def consider(cands: set[bytes] | None) -> None:
        nonlocal best
        if cands and _rank(cands) > _rank(best):
            best = cands

    for op, av in items:
        lit = av if op is sre_c.LITERAL else _in_literal(av) if op is sre_c.IN else None
        if lit is not None:
            run.append(lit)
            continue
        if run:
            consider({bytes(run)})
            run = bytearray()
        if op is sre_c.SUBPATTERN:
            consider(_required(list(av[-1])))
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
            if av[0] >= 1:
                consider(_required(list(av[2])))
        elif op is sre_c.ATOMIC_GROUP:
            consider(_required(list(av)))
        elif op is sre_c.ASSERT:
            consider(_required(list(av[1])))
        elif op is sre_c.BRANCH:
            alts = [_required(list(a)) for a in av[1]]
            if all(alts):
                union: set[bytes] = set()
                for a in alts:
                    union |= a or set()
                consider(union)
    if run:
        consider({bytes(run)})
    return best


class Prefilter(Generic[R]):
    """Which rules of one kind may match a text, from their literals."""

    def __init__(self, rules: list[R], use_hyperscan: bool) -> None:
        self.rules = rules
        self.always = [i for i, r in enumerate(rules) if r.literals is None]
        by_literal: dict[bytes, list[int]] = {}
        for i, r in enumerate(rules):
            for lit in r.literals or ():
                by_literal.setdefault(lit, []).append(i)
        self.literals = list(by_literal)
        self.targets = [by_literal[lit] for lit in self.literals]
        self.hs_db: Any = _hyperscan_db(self.literals) if use_hyperscan else None
        # Hyperscan scratch space may serve one scan at a time: messages are scanned
        # in several threads at once, so each thread gets its own.
        self._local = threading.local()

    def _scratch(self) -> Any:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            import hyperscan as hs

            scratch = self._local.scratch = hs.Scratch(self.hs_db)
        return scratch

    def present(self, text_lower: bytes) -> list[int]:
        """Indices of literals found in the (lower-cased) text."""
        if self.hs_db is not None:
            found: list[int] = []
            self.hs_db.scan(text_lower, match_event_handler=_hs_collect, context=found,
                            scratch=self._scratch())
            return found
        return [i for i, lit in enumerate(self.literals) if lit in text_lower]

    def candidates(self, text: bytes) -> list[R]:
        chosen = set(self.always)
        for i in self.present(text.lower()):
            chosen.update(self.targets[i])
        return [self.rules[i] for i in sorted(chosen)]


def _hs_collect(lit_id: int, start: int, end: int, flags: int, context: Any) -> None:
    context.append(lit_id)


def hyperscan_available() -> bool:
    if os.environ.get("MXGUARD_NO_HYPERSCAN"):
        return False
    try:
        import hyperscan  # noqa: F401
    except Exception:
        return False
    return True


def _hyperscan_db(literals: list[bytes]) -> Any:
    if not literals or not hyperscan_available():
        return None
    import hyperscan as hs

    try:
        db = hs.Database(mode=hs.HS_MODE_BLOCK)
        db.compile(expressions=[re.escape(lit) for lit in literals],
                   ids=list(range(len(literals))), elements=len(literals),
                   flags=[hs.HS_FLAG_SINGLEMATCH] * len(literals))
    except Exception as exc:
        log.warning("content: hyperscan unusable (%s); using re", exc)
        return None
    return db


__all__ = ["MIN_LITERAL", "HasLiterals", "Prefilter", "hyperscan_available", "required_literals"]
