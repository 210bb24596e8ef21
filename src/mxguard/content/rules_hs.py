"""Hyperscan prefilter patterns: a rule's Python regex as a Hyperscan pattern
that matches at least wherever the regex does.

The rule engine scans a text once with one Hyperscan database holding every
regex rule of that target (body, rawbody, full, uri, one header) and then
runs, with Python ``re``, only the rules Hyperscan reported: Python ``re``
decides, so hits are exactly those of running every regex. For that the
Hyperscan pattern must never miss a match of the regex (it may report more).

:func:`hs_pattern` writes the pattern from the regex's parse tree (Python's own
``re`` parser, so the semantics are Python's), every construct either exact
or widened:

* literals and character classes as explicit byte sets (case folding and
  ``\\d \\s \\w`` resolved here as Python does for bytes);
* ``.`` as ``[^\\n]`` or, under ``(?s)``, any byte;
* no Hyperscan anchors at all: ``^`` and ``\\A`` where a match starts become
  a newline, ``$`` and ``\\Z`` where it ends a newline too, and the text is
  scanned with a newline before and after it (:func:`padded`); so a Python
  anchor's position (start of text or after a newline; end of text or before
  a newline) is always next to a newline. Anchors anywhere else are dropped
  (that only widens);
* lookarounds dropped (a removed condition only widens), atomic groups and
  possessive quantifiers as plain ones, a back-reference as a copy of its
  group's pattern, ``(?(1)a|b)`` as ``(?:a|b)``;
* an unbounded repeat of a class of :data:`WIDE_CLASS` bytes or more
  (``[^\\n]*``, ``.*``, ``\\S+``) as a run of any bytes;
* bounded repeats with an upper bound above :data:`MAX_BOUND` unbounded and
  minimums above it lowered to it (Hyperscan compiles large bounded repeats
  slowly; a search for fewer repetitions finds every place with more).

With ``coarse=True`` (for patterns too long for Hyperscan, such as
SpamAssassin's look-alike letter alternations) an alternation whose branches
are all strings of single characters, ``(?:[yY]|\xc3[\x9d\xbd]|...)``,
becomes one character class per position, the later ones optional
(``[yY\xc3][\x9d\xbd]?``): every branch matches it.

Anything else raises :class:`Unsupported`; that rule keeps the literal
prefilter of :mod:`mxguard.content.rules_prefilter`.

Why no anchors and no wide class repeats: Vectorscan 5.4.12 (the library in
python-hyperscan 0.9.1) loses matches of some patterns compiled into one
database. ``\\n[^>][^\\n]*<a href=`` together with
``\\n[^>][^\\n]*<img src="data`` does not report the first on
``"*" * 23 + "\\n\\n<a href="`` (each alone does; with 22 stars both do;
the same with ``^`` and flag MULTILINE for the ``\\n``), and ``>$`` was lost
the same way on a header. Written as above neither happens, and on 6,046
corpus messages with SpamAssassin's rules no hit differs from Python's
(``bench/rules_equivalence.py``; a test replays the cases).
"""

from __future__ import annotations

import re
import re._constants as c
import re._parser as sre_parse
from typing import Any

MAX_BOUND = 16
MAX_PATTERN = 20_000  # characters of Hyperscan pattern; longer ones keep the literal prefilter

_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_DIGIT = frozenset(b"0123456789")
_SPACE = frozenset(b" \t\n\r\f\v")
_ALL = frozenset(range(256))
_HIGH = frozenset(range(128, 256))
_CATEGORIES = {
    c.CATEGORY_DIGIT: _DIGIT, c.CATEGORY_NOT_DIGIT: _ALL - _DIGIT,
    c.CATEGORY_SPACE: _SPACE, c.CATEGORY_NOT_SPACE: _ALL - _SPACE,
    c.CATEGORY_WORD: _WORD, c.CATEGORY_NOT_WORD: _ALL - _WORD,
}


class Unsupported(ValueError):
    """No Hyperscan prefilter pattern for this regex."""


def _fold(chars: set[int]) -> set[int]:
    """Python's IGNORECASE on bytes folds ASCII letters only."""
    out = set(chars)
    for ch in chars:
        if 65 <= ch <= 90 or 97 <= ch <= 122:
            out.add(ch ^ 0x20)
    return out


def _byte_class(chars: set[int] | frozenset[int]) -> str:
    if not chars:
        raise Unsupported("empty character class")
    if len(chars) == 256:
        return r"[\x00-\xff]"
    parts: list[str] = []
    run: list[int] = []
    for ch in sorted(chars):
        if run and ch == run[-1] + 1:
            run.append(ch)
            continue
        if run:
            parts.append(_run(run))
        run = [ch]
    parts.append(_run(run))
    return "[" + "".join(parts) + "]"


def _run(run: list[int]) -> str:
    if len(run) == 1:
        return f"\\x{run[0]:02x}"
    return f"\\x{run[0]:02x}-\\x{run[-1]:02x}"


PAD = b"\n"
ANY_RUN = r"[\x00-\xff]*"
WIDE_CLASS = 128  # unbounded repeats of classes this wide become ANY_RUN


def padded(text: bytes) -> bytes:
    """The text as the patterns expect it: a newline before and after (where
    anchors at the start and end of a match became newlines)."""
    return PAD + text + PAD


class _Writer:
    def __init__(self, parsed: Any, flags: int, coarse: bool = False) -> None:
        self.groups: dict[int, tuple[list[tuple[Any, Any]], int]] = {}
        self.flags = flags
        self.coarse = coarse
        self._collect(list(parsed), flags)

    def _collect(self, items: list[tuple[Any, Any]], flags: int) -> None:
        """Group number -> (its items, flags in force): for back-references."""
        for op, av in items:
            if op is c.SUBPATTERN:
                group, add, drop, sub = av
                inner = (flags | add) & ~drop
                if group is not None:
                    self.groups[group] = (list(sub), inner)
                self._collect(list(sub), inner)
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                self._collect(list(av[2]), flags)
            elif op is c.BRANCH:
                for alt in av[1]:
                    self._collect(list(alt), flags)
            elif op is c.ATOMIC_GROUP:
                self._collect(list(av), flags)
            elif op is c.GROUPREF_EXISTS:
                self._collect(list(av[1]), flags)
                if av[2] is not None:
                    self._collect(list(av[2]), flags)

    def seq(self, items: list[tuple[Any, Any]], flags: int, depth: int = 0,
            start: bool = False, end: bool = False) -> str:
        """``start``/``end``: the sequence begins/ends the match (an anchor there
        becomes a newline of the padded text)."""
        if depth > 50:
            raise Unsupported("pattern nested too deep")
        out: list[str] = []
        for n, (op, av) in enumerate(items):
            at_start = start and not "".join(out)
            at_end = end and all(o in (c.ASSERT, c.ASSERT_NOT) for o, _ in items[n + 1:])
            out.append(self.item(op, av, flags, depth, at_start, at_end))
        return "".join(out)

    def item(self, op: Any, av: Any, flags: int, depth: int, start: bool = False,
             end: bool = False) -> str:
        icase = bool(flags & re.IGNORECASE)
        chars = _char_set(op, av, icase, flags)
        if chars is not None:
            if self.coarse and chars & _HIGH:
                chars |= _HIGH
            return _byte_class(chars) if len(chars) > 1 else f"\\x{min(chars):02x}"
        if op is c.BRANCH:
            if self.coarse:
                columns = _columns([list(a) for a in av[1]], icase, flags)
                if columns is not None:
                    return "".join(_byte_class(col | _HIGH if col & _HIGH else col)
                                   + ("?" if n else "") for n, col in enumerate(columns))
                first = _first_chars(list(av[1]), icase, flags, 0)
                widest = max(a.getwidth()[1] for a in av[1])
                if first is not None and widest <= 8:
                    first = first | _HIGH if first & _HIGH else first
                    tail = f"[\\x00-\\xff]{{0,{widest - 1}}}" if widest > 1 else ""
                    return f"(?:{_byte_class(first)}{tail})"
            alts = dict.fromkeys(self.seq(list(a), flags, depth + 1, start, end)
                                 for a in av[1])
            return "(?:" + "|".join(alts) + ")"
        if op is c.SUBPATTERN:
            _, add, drop, sub = av
            return "(?:" + self.seq(list(sub), (flags | add) & ~drop, depth + 1, start,
                                    end) + ")"
        if op is c.ATOMIC_GROUP:
            return "(?:" + self.seq(list(av), flags, depth + 1, start, end) + ")"
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            inner = self.seq(list(sub), flags, depth + 1)
            if not inner:
                return ""
            lo = min(lo, MAX_BOUND)
            if hi is c.MAXREPEAT or hi > MAX_BOUND:
                items = list(sub)
                chars = (_char_set(items[0][0], items[0][1], icase, flags) if len(items) == 1
                         else None)
                if chars is not None and len(chars) >= WIDE_CLASS:
                    # any bytes: Vectorscan loses matches of some patterns with
                    # repeats such as [^\n]* compiled together (module docstring)
                    head = ("" if lo == 0 else f"(?:{inner})" if lo == 1
                            else f"(?:{inner}){{{lo}}}")
                    return head + ANY_RUN
                quant = "*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}"
            elif lo == hi:
                quant = "" if lo == 1 else f"{{{lo}}}"
            else:
                quant = "?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}"
            return f"(?:{inner}){quant}" if quant else f"(?:{inner})"
        if op is c.AT:
            if av in (c.AT_BEGINNING, c.AT_BEGINNING_STRING, c.AT_BEGINNING_LINE):
                return "\\x0a" if start else ""  # elsewhere dropped: only widens
            if av in (c.AT_END, c.AT_END_STRING, c.AT_END_LINE):
                return "\\x0a" if end else ""
            if av is c.AT_BOUNDARY:
                return r"\b"
            if av is c.AT_NON_BOUNDARY:
                return r"\B"
            raise Unsupported(f"anchor {av}")
        if op in (c.ASSERT, c.ASSERT_NOT):
            return ""  # a dropped condition only widens
        if op is c.GROUPREF:
            if av not in self.groups:
                raise Unsupported("back-reference to an unknown group")
            sub, gflags = self.groups[av]
            # the referenced text matched the group; case folds if either side folds
            return "(?:" + self.seq(sub, gflags | (flags & re.IGNORECASE), depth + 1) + ")"
        if op is c.GROUPREF_EXISTS:
            yes = self.seq(list(av[1]), flags, depth + 1, start, end)
            no = self.seq(list(av[2]), flags, depth + 1, start, end) if av[2] is not None else ""
            return f"(?:{yes}|{no})"
        raise Unsupported(f"regex construct {op}")


def _char_set(op: Any, av: Any, icase: bool, flags: int) -> set[int] | None:
    """The bytes one single-character item matches, or None for anything else."""
    if op is c.LITERAL:
        return _fold({av}) if icase else {av}
    if op is c.NOT_LITERAL:
        return set(_ALL - (_fold({av}) if icase else {av}))
    if op is c.ANY:
        return set(_ALL) if flags & re.DOTALL else set(_ALL - {10})
    if op is c.IN:
        return _class_set(av, icase)
    return None


def _columns(alts: list[list[tuple[Any, Any]]], icase: bool, flags: int
             ) -> list[set[int]] | None:
    """Per position, the union of the branches' characters: None unless every
    branch is a non-empty string of single characters (nested alternations
    included, those of varying length only at the end of their branch)."""
    got = _branch_columns(alts, icase, flags, 0)
    return got[0] if got is not None and got[0] else None


def _branch_columns(alts: list[list[tuple[Any, Any]]], icase: bool, flags: int, depth: int
                    ) -> tuple[list[set[int]], bool] | None:
    columns: list[set[int]] = []
    lengths = set()
    for alt in alts:
        got = _seq_columns(alt, icase, flags, depth + 1)
        if got is None or not got[0]:
            return None
        cols, fixed = got
        lengths.add(len(cols) if fixed else -1)
        for n, chars in enumerate(cols):
            if n == len(columns):
                columns.append(set())
            columns[n] |= chars
    return columns, len(lengths) == 1 and -1 not in lengths


def _seq_columns(items: list[tuple[Any, Any]], icase: bool, flags: int, depth: int
                 ) -> tuple[list[set[int]], bool] | None:
    if depth > 20:
        return None
    columns: list[set[int]] = []
    for n, (op, av) in enumerate(items):
        chars = _char_set(op, av, icase, flags)
        if chars is not None:
            columns.append(chars)
            continue
        if op is c.BRANCH:
            got = _branch_columns([list(a) for a in av[1]], icase, flags, depth)
        elif op is c.SUBPATTERN and not av[1] and not av[2]:
            got = _seq_columns(list(av[3]), icase, flags, depth + 1)
        else:
            return None
        if got is None:
            return None
        cols, fixed = got
        columns += cols
        if not fixed:
            # later positions would no longer line up: only the last item may vary
            return (columns, False) if n == len(items) - 1 else None
    return columns, True


def _first_chars(alts: list[Any], icase: bool, flags: int, depth: int) -> set[int] | None:
    """The bytes every branch can start with (None if unknown or a branch may be empty)."""
    out: set[int] = set()
    for alt in alts:
        items = list(alt)
        if not items or depth > 20:
            return None
        op, av = items[0]
        chars = _char_set(op, av, icase, flags)
        if chars is None:
            if op is c.BRANCH:
                chars = _first_chars(list(av[1]), icase, flags, depth + 1)
            elif op is c.SUBPATTERN and not av[1] and not av[2]:
                chars = _first_chars([av[3]], icase, flags, depth + 1)
            if chars is None:
                return None
        out |= chars
    return out


def _class_set(items: list[tuple[Any, Any]], icase: bool) -> set[int]:
    chars: set[int] = set()
    negate = False
    for op, av in items:
        if op is c.NEGATE:
            negate = True
        elif op is c.LITERAL:
            chars.add(av)
        elif op is c.RANGE:
            chars.update(range(av[0], av[1] + 1))
        elif op is c.CATEGORY:
            if av not in _CATEGORIES:
                raise Unsupported(f"class category {av}")
            chars.update(_CATEGORIES[av])
        else:
            raise Unsupported(f"class item {op}")
    if icase:
        chars = _fold(chars)
    return set(_ALL - chars) if negate else chars


def hs_pattern(regex: re.Pattern[bytes], coarse: bool = False) -> str:
    """A Hyperscan pattern, without anchors, that matches the :func:`padded`
    text wherever ``regex`` matches the text; raises :class:`Unsupported`."""
    if regex.flags & (re.LOCALE | re.UNICODE):
        raise Unsupported("locale/unicode flags")
    try:
        parsed = sre_parse.parse(regex.pattern, regex.flags)
    except Exception as exc:  # the pattern compiled, so this should not happen
        raise Unsupported(f"cannot parse: {exc}") from None
    flags = parsed.state.flags
    writer = _Writer(parsed, flags, coarse)
    try:
        out = writer.seq(list(parsed), flags, 0, True, True)
    except RecursionError:
        raise Unsupported("pattern nested too deep") from None
    if len(out) > MAX_PATTERN * (3 if coarse else 1):
        raise Unsupported("pattern too long for Hyperscan")
    return out


__all__ = ["MAX_BOUND", "PAD", "Unsupported", "hs_pattern", "padded"]
