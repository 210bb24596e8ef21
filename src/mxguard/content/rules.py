"""The rule engine: SpamAssassin ``.cf`` rules compiled once, run per message.

:func:`load_rules` builds a :class:`RuleSet` from ``[content]`` (the built-in
``mxguard.cf``, then ``rules_dirs``, then ``local_rules``; later definitions
and scores win, as in SpamAssassin). Call it at start-up and on SIGHUP and
swap the result in as one object; a RuleSet is immutable and shared by all
scans.

Rule types: ``header`` (``Name``, ``Name:raw``, ``:addr``, ``:name``,
``:host``, ``:domain``, ``:first``, ``:last``, pseudo-headers ``ALL``,
``ToCc``, ``MESSAGEID``, ``EnvelopeFrom``; ``=~`` / ``!~``;
``[if-unset: ...]``; ``exists:Name``), ``body`` (rendered text, Subject
first, one paragraph per line), ``rawbody`` (decoded, not rendered),
``full`` (the message as received), ``uri`` (each normalised URI), ``meta``
(``&& || ! + - * / < > <= >= == !=`` and parentheses over rule hit counts),
and ``eval:`` rules of any type (see :mod:`mxguard.content.evals`). Rules run
on UTF-8 octets, like SpamAssassin 4, so its byte-escaped patterns work.

Scores: SpamAssassin's four score sets are (0) no Bayes, no network, (1)
network, (2) Bayes, (3) Bayes and network. mxguard runs no network rules in
the engine (DNS blocklists are their own check), so :func:`score_set` picks
set 2 once Bayes is usable and set 0 otherwise. A rule without a ``score``
line scores 1.0 (``-1.0`` with ``tflags nice``, 0.01 for ``T_`` test rules,
0 for ``__`` sub-rules); a rule whose four scores are all 0 is not run unless
a scored meta needs it. ``tflags multiple`` counts every match (score times
hits, at most ``maxhits=N``).

Speed: when the ``hyperscan`` package is installed (the ``fast`` extra;
``MXGUARD_RULES_HYPERSCAN=0`` turns this off) the regex rules of each target
(body, rawbody, full, uri, each header spec) are compiled into Hyperscan
databases (:mod:`mxguard.content.rules_compiled`): one pass over the text names
the rules that may match, and only those run with Python ``re``. Without it
(or for the rules Hyperscan cannot take) only regex rules whose required
literals occur in the text are run (the prefilter,
:mod:`mxguard.content.rules_prefilter`). Either way Python ``re`` decides
every hit: ``RuleSet(parsed, compiled=False)`` runs every regex on every text
(the reference the equivalence tests compare with). Text per body part
is capped at :data:`BODY_PART_SCAN` characters (SpamAssassin's
``body_part_scan_size``). Metas are compiled by :mod:`mxguard.content.rules_meta`.
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxguard.content import evals
from mxguard.content import rules_compiled as rc
from mxguard.content.evals import EVALS, NET_EVALS, RuleLists, ScanContext
from mxguard.content.evals.base import DomainSet
from mxguard.content.mime import ParsedMessage, rendered_body
from mxguard.content.rules_hs import Unsupported, hs_pattern
from mxguard.content.rules_meta import HitMap, MetaError, compile_meta
from mxguard.content.rules_parser import ParsedRules, RuleDef, apply_replace_tags, parse_paths
from mxguard.content.rules_prefilter import Prefilter, hyperscan_available, required_literals
from mxguard.content.rules_regex import RegexError, compile_regex
from mxguard.core.runtime import past_deadline

log = logging.getLogger("mxguard")

BUILTIN_RULES = Path(__file__).resolve().parent.parent / "data" / "rules" / "mxguard.cf"
# scores 0 for the built-in rules SpamAssassin's own ruleset already scores
BUILTIN_SA_OVERLAP = BUILTIN_RULES.with_name("mxguard-sa-overlap.cf")
BODY_PART_SCAN = 50_000  # characters of each text part seen by body rules
RAWBODY_PART_SCAN = 500_000
REGEX_KINDS = ("body", "rawbody", "full", "uri")
HS_RULES_ENV = "MXGUARD_RULES_HYPERSCAN"  # "0": no Hyperscan databases of the regexes


@dataclass(slots=True)
class Rule:
    name: str
    kind: str  # header | body | rawbody | full | uri | meta | eval
    source: str
    scores: tuple[float, float, float, float]
    description: str = ""
    tflags: frozenset[str] = frozenset()
    maxhits: int = 0
    literals: tuple[bytes, ...] | None = None
    header: str = ""
    negate: bool = False
    if_unset: bytes | None = None
    exists: str = ""
    eval_fn: Callable[..., bool | int] | None = None
    eval_args: tuple[str, ...] = ()
    meta_fn: Callable[[HitMap], Any] | None = None
    deps: tuple[str, ...] = ()
    pattern: bytes | None = None  # the translated Python pattern (regex rules)
    flags: int = 0
    compiled_re: re.Pattern[bytes] | None = None
    unset_hit: int = -1  # header rules: hit when the header is absent (1/0; -1 not known yet)

    @property
    def multiple(self) -> bool:
        return "multiple" in self.tflags

    @property
    def regex(self) -> re.Pattern[bytes] | None:
        """The compiled regex; compiled on first use for rules read from the cache."""
        if self.compiled_re is None and self.pattern is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.compiled_re = re.compile(self.pattern, self.flags)
        return self.compiled_re

    def absent_hit(self) -> bool:
        """A header rule's outcome when the header is absent (its if-unset text, or empty)."""
        if self.unset_hit < 0:
            assert self.regex is not None
            text = self.if_unset if self.if_unset is not None else b""
            self.unset_hit = int((self.regex.search(text) is not None) != self.negate)
        return bool(self.unset_hit)


@dataclass(frozen=True, slots=True)
class RuleHit:
    name: str
    score: float
    count: int
    description: str


@dataclass(slots=True)
class ScanResult:
    score: float = 0.0
    hits: list[RuleHit] = field(default_factory=list)  # scored rules that hit, by name
    counts: dict[str, int] = field(default_factory=dict)  # every rule that hit, sub-rules too
    elapsed: float = 0.0


@dataclass(slots=True)
class LoadStats:
    files: list[str] = field(default_factory=list)
    defined: Counter[str] = field(default_factory=Counter)  # rules by type as written
    active: Counter[str] = field(default_factory=Counter)  # rules that run, by type
    unsupported_evals: Counter[str] = field(default_factory=Counter)
    net_rules: int = 0
    unsupported_regex: int = 0
    disabled_metas: int = 0
    prefiltered: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored_settings: Counter[str] = field(default_factory=Counter)
    engine: str = "re"
    seconds: float = 0.0
    hs_rules: int = 0  # regex rules in Hyperscan databases
    hs_seconds: float = 0.0  # compiling (or reading) them
    cache: str = ""  # "hit", "written", "" (no disk cache)


# ------------------------------------------------------------------ headers


def _addr_host(value: str) -> str:
    return evals.domain_of(evals.address(value))


def _org_of(value: str) -> str:
    return evals.org_domain(_addr_host(value))


# pure functions of the value: cached (bounded) across messages
_MODIFIERS: dict[str, Callable[[str], str]] = {
    "addr": functools.lru_cache(maxsize=4096)(evals.address),
    "name": functools.lru_cache(maxsize=4096)(evals.display_name),
    "host": functools.lru_cache(maxsize=4096)(_addr_host),
    "domain": functools.lru_cache(maxsize=4096)(_org_of),
}
_PSEUDO = frozenset(("ToCc", "MESSAGEID", "EnvelopeFrom"))


_BARE_MODS = frozenset(("addr", "name", "host", "domain"))
_ALL_HEADERS = frozenset(("ALL", "ALL-TRUSTED", "ALL-UNTRUSTED", "ALL-INTERNAL", "ALL-EXTERNAL"))


HeaderIndex = dict[str, list[str]]


def header_index(pairs: list[tuple[str, str]]) -> HeaderIndex:
    """Lower-case header name -> its values, in order."""
    index: HeaderIndex = {}
    for n, v in pairs:
        index.setdefault(n.lower(), []).append(v)
    return index


def header_values(msg: ParsedMessage, spec: str, ctx: ScanContext | None = None,
                  index: tuple[HeaderIndex, HeaderIndex] | None = None) -> list[str]:
    """The values a header rule tests (``[]`` when the header is absent).
    ``index``: :func:`header_index` of the decoded and of the raw headers."""
    name, *mods = spec.split(":")
    raw = "raw" in mods
    pairs = msg.raw_headers if raw else msg.headers
    # Pseudo-headers are case-sensitive, as in SpamAssassin ("MessageID" is a header).
    if name in _ALL_HEADERS:
        return ["".join(f"{n}: {v.lstrip() if raw else v}\n" for n, v in pairs)] if pairs else []
    key = name.lower()
    if name == "ToCc":
        values = [v for n, v in pairs if n.lower() in ("to", "cc")]
        return [", ".join(v.strip() for v in values)] if values else []
    if name == "MESSAGEID":
        values = [v for n, v in pairs if n.lower() in ("message-id", "resent-message-id",
                                                       "x-message-id")]
    elif name == "EnvelopeFrom":
        env = ctx.envelope_from if ctx is not None else evals.address(msg.first("Return-Path"))
        values = [env] if env else []
    elif index is not None:
        values = list(index[1 if raw else 0].get(key, ()))
    else:
        values = [v for n, v in pairs if n.lower() == key]
    if "first" in mods:
        values = values[:1]
    elif "last" in mods:
        values = values[-1:]
    for mod in mods:
        fn = _MODIFIERS.get(mod)
        if fn is not None:
            values = [fn(v) for v in values[:1]]
    return values


# ------------------------------------------------------------------ the rule set


def _default_score(name: str, tflags: frozenset[str]) -> float:
    if name.startswith("__"):
        return 0.0
    if name.startswith("T_"):
        return 0.01
    return -1.0 if "nice" in tflags else 1.0


class _Target:
    """The regex rules run on one text (a body kind, or one header spec)."""

    __slots__ = ("fast", "negated", "prefilter", "rules")

    def __init__(self, rules: list[Rule], prefilter: Prefilter[Rule] | None) -> None:
        self.rules = rules
        self.prefilter = prefilter  # literal prefilter over all rules; None: run all
        self.negated = [r for r in rules if r.negate]
        # (Hyperscan matcher, literal prefilter over the rules it lacks): set once,
        # as one tuple, when the databases are ready (maybe from another thread)
        self.fast: tuple[rc.HsMatcher, Prefilter[Rule] | None] | None = None

    def candidates(self, text: bytes) -> list[Rule]:
        fast = self.fast
        if fast is not None:
            rules = self.rules
            out = [rules[i] for i in set(fast[0].matches(text))]
            if fast[1] is not None:
                out += fast[1].candidates(text)
            return out
        if self.prefilter is not None:
            return self.prefilter.candidates(text)
        return self.rules


def engine_choice(use_hyperscan: bool | None, compiled: bool = True) -> tuple[bool, bool]:
    """(Hyperscan for the literal prefilter, Hyperscan regex databases)."""
    literal_hs = compiled and (hyperscan_available() if use_hyperscan is None
                               else use_hyperscan)
    # The regex databases whenever Hyperscan is there (HS_RULES_ENV=0: the
    # literal prefilter only). Their patterns carry no anchors and no wide
    # class repeats (rules_hs): with those, Vectorscan 5.4.12 lost matches of
    # patterns compiled together (19 of 6,046 corpus messages differed).
    use_hs = literal_hs and (use_hyperscan is True or os.environ.get(HS_RULES_ENV) != "0")
    return literal_hs, use_hs


class RuleSet:
    """Compiled rules; build with :func:`build_ruleset` or :func:`load_rules`.

    ``compiled=False`` runs every regex rule on every text (no prefilter, no
    Hyperscan): the reference for tests. ``cache_dir``: keep translated
    patterns and Hyperscan databases there (see
    :mod:`mxguard.content.rules_compiled`). ``background``: compile the
    Hyperscan databases in a thread; scans meanwhile use the literal prefilter
    (same hits, slower); :meth:`wait_compiled` waits for it."""

    def __init__(self, parsed: ParsedRules, *, use_hyperscan: bool | None = None,
                 compiled: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                 background: bool = False) -> None:
        started = time.monotonic()
        self.compiled = compiled
        self._ready = threading.Event()
        self.replacement: RuleSet | None = None  # set when a fuller rule set takes over
        # set once the fuller set of a warm start is read from the cache (or could not
        # be): until then the rules check waits for it (see mxguard.checks.rules)
        self.loading: threading.Event | None = None
        self._builder: subprocess.Popen[bytes] | None = None  # rules_build compiling for us
        self._closed = False
        self._lock = threading.Lock()
        literal_hs, use_hs = engine_choice(use_hyperscan, compiled)
        self._cache_file: Path | None = None
        self._cached: tuple[dict[str, Any], list[bytes]] | None = None
        if cache_dir is not None and parsed.files:
            key = rc.cache_key(parsed.files, f"hs={use_hs}")
            if key is not None:
                self._cache_file = rc.cache_path(cache_dir, key)
                self._cached = rc.read_cache(self._cache_file)
        cached_rules: dict[str, Any] = self._cached[0].get("rules", {}) if self._cached else {}
        self._cached_rules = cached_rules if isinstance(cached_rules, dict) else {}
        self.stats = LoadStats(files=list(parsed.files), errors=list(parsed.errors),
                               warnings=list(parsed.warnings),
                               ignored_settings=Counter(parsed.ignored))
        self.lists = RuleLists(DomainSet(parsed.url_shorteners),
                               DomainSet(parsed.freemail_domains),
                               {k: DomainSet(v) for k, v in parsed.uri_host_lists.items()})
        self.rules: dict[str, Rule] = {}
        # explicit score lines of symbols other checks produce (SpamAssassin's
        # BAYES_* scores in 50_scores.cf): see checks/bayes.py
        self.symbol_scores: dict[str, tuple[float, float, float, float]] = {
            n: v for n, v in parsed.scores.items() if n.startswith("BAYES_")}
        self.zero: set[str] = set()  # defined rules that never fire here (net, unsupported)
        for rdef in parsed.rules.values():
            self.stats.defined[rdef.kind] += 1
            rule = self._compile(rdef, parsed)
            if rule is None:
                self.zero.add(rdef.name)
            else:
                self.rules[rule.name] = rule
        self.metas = self._order_metas()
        self._prune()
        # A meta none of whose rules hit has the value it has on an empty hit map:
        # known now, so a scan evaluates only metas with a hit among their rules.
        at_zero = HitMap()
        _run_metas(self.metas, at_zero)
        self._meta_plan = _MetaPlan(self.metas, set(at_zero))
        self.stats.engine = ("hyperscan+re" if use_hs else "literals+re" if compiled
                             else "re (reference)")
        self.header_rules = [r for r in self.rules.values() if r.kind == "header"]
        self.exists_rules = [r for r in self.header_rules if r.exists]
        self.eval_rules = [r for r in self.rules.values() if r.kind == "eval"]
        self.targets: dict[str, _Target] = {}
        for kind in REGEX_KINDS:
            rules = [r for r in self.rules.values() if r.kind == kind]
            self.targets[kind] = _Target(rules, Prefilter(rules, literal_hs) if compiled
                                         else None)
        by_spec: dict[str, list[Rule]] = {}
        for rule in self.header_rules:
            if not rule.exists:
                by_spec.setdefault(rule.header, []).append(rule)
        self.header_targets = {
            spec: _Target(rules, Prefilter(rules, False) if compiled else None)
            for spec, rules in by_spec.items()}
        for rule in self.rules.values():
            self.stats.active[rule.kind] += 1
            if rule.literals is not None:
                self.stats.prefiltered += 1
        self.stats.seconds = time.monotonic() - started
        self._use_hs = use_hs
        if not use_hs and self._cache_file is None:
            self._ready.set()
        elif background:
            threading.Thread(target=self._compile_hs, args=(True,), name="mxguard-rules-compile",
                             daemon=True).start()
        else:
            self._compile_hs()
            self.stats.seconds = time.monotonic() - started

    # -- Hyperscan ------------------------------------------------------------

    def _all_targets(self) -> dict[str, _Target]:
        out = dict(self.targets)
        out.update((f"header {spec}", t) for spec, t in self.header_targets.items())
        return out

    def _compile_hs(self, warm: bool = False) -> None:
        """Build (or read) the Hyperscan databases; ``warm``: then compile the
        regexes read from the cache, so the first messages do not pay for it."""
        started = time.monotonic()
        try:
            self._build_hs()
        except Exception as exc:  # never an outage: the literal prefilter stays
            log.warning("content: rules: hyperscan databases unusable (%s: %s); using the "
                        "literal prefilter", type(exc).__name__, exc)
        finally:
            self.stats.hs_seconds = time.monotonic() - started
            self._cached = None
            self._ready.set()
        log.info("content: rules: hyperscan databases ready: %d rules in %.1fs (cache %s)",
                 self.stats.hs_rules, self.stats.hs_seconds, self.stats.cache or "none")
        if warm:
            for rule in list(self.rules.values()):
                if rule.pattern is not None:
                    _ = rule.regex

    def _build_hs(self) -> None:
        cached_targets: dict[str, Any] = {}
        blobs: list[bytes] = []
        if self._cached is not None:
            cached_targets, blobs = self._cached[0].get("targets", {}), self._cached[1]
        out_targets: dict[str, Any] = {}
        out_blobs: list[bytes] = []
        complete = True
        for key, target in (self._all_targets() if self._use_hs else {}).items():
            if not target.rules or (key.startswith("header ") and len(target.rules) < 3):
                continue  # a header spec with one or two rules: plain re is as quick
            names = [r.name for r in target.rules]
            entry = cached_targets.get(key)
            dbs: list[Any] = []
            covered: list[int] = []
            if isinstance(entry, dict) and entry.get("names") == names:
                first, count = entry["first"], entry["count"]
                dbs = [rc.load_db(b) for b in blobs[first:first + count]]
                covered = list(entry["covered"])
                mine = blobs[first:first + count]
            else:
                complete = False
                patterns: list[tuple[int, bytes]] = []
                coarse: list[int] = []
                for i, rule in enumerate(target.rules):
                    assert rule.regex is not None
                    try:
                        patterns.append((i, hs_pattern(rule.regex).encode("latin-1")))
                    except Unsupported:
                        coarse.append(i)
                dbs, refused = rc.compile_target(patterns)
                # too long, or refused: once more with look-alike alternations widened
                retry: list[tuple[int, bytes]] = []
                for i in sorted(set(coarse) | set(refused)):
                    rule = target.rules[i]
                    assert rule.regex is not None
                    try:
                        retry.append((i, hs_pattern(rule.regex, coarse=True).encode("latin-1")))
                    except Unsupported:
                        continue
                more, refused2 = rc.compile_target(retry)
                dbs += more
                covered = sorted(({i for i, _ in patterns} - set(refused))
                                 | ({i for i, _ in retry} - set(refused2)))
                mine = [rc.dump_db(db) for db in dbs] if self._cache_file is not None else []
            if not dbs:
                continue
            out_targets[key] = {"names": names, "first": len(out_blobs), "count": len(dbs),
                                "covered": covered}
            out_blobs += mine
            in_hs = set(covered)
            rest = [r for i, r in enumerate(target.rules) if i not in in_hs]
            target.fast = (rc.HsMatcher(dbs), Prefilter(rest, False) if rest else None)
            self.stats.hs_rules += len(covered)
        if self._cache_file is None:
            return
        if complete and self._cached is not None and self._cached_rules:
            self.stats.cache = "hit"
            return
        meta = {"rules": {r.name: [r.source, r.pattern.decode("latin-1"), r.flags,
                                   None if r.literals is None else
                                   [lit.hex() for lit in r.literals]]
                          for r in self.rules.values() if r.pattern is not None},
                "targets": out_targets}
        try:
            rc.write_cache(self._cache_file, meta, out_blobs)
            self.stats.cache = "written"
        except OSError as exc:
            log.warning("content: rules: cannot write the compiled-rules cache %s: %s",
                        self._cache_file, exc.strerror or exc)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the Hyperscan databases (True when ready or not used)."""
        return self._ready.wait(timeout)

    def close(self) -> None:
        """Stop a background compile this rule set started (the daemon stopping):
        SIGTERM, then SIGKILL after :data:`BUILD_STOP_GRACE` seconds. The rules stay
        usable; nothing replaces them any more."""
        with self._lock:
            self._closed = True
            proc = self._builder
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(BUILD_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("content: rules: background compile stopped (mxguard stopping); the next "
                 "start compiles again")

    # -- compiling ------------------------------------------------------------

    def _compile(self, rdef: RuleDef, parsed: ParsedRules) -> Rule | None:
        tflags = frozenset(parsed.tflags.get(rdef.name, "").split())
        if rdef.net or "net" in tflags:
            self.stats.net_rules += 1
            return None
        name = rdef.name
        scores = parsed.scores.get(name) or (_default_score(name, tflags),) * 4
        maxhits = next((int(f[8:]) for f in tflags if f.startswith("maxhits=")
                        and f[8:].isdigit()), 0)
        rule = Rule(name, rdef.kind, rdef.source, scores, parsed.describe.get(name, ""),
                    tflags, maxhits)
        try:
            if rdef.kind == "meta":
                rule.meta_fn, rule.deps = compile_meta(rdef.meta)
            elif rdef.eval_name:
                return self._eval_rule(rule, rdef)
            elif rdef.kind in ("mimeheader", "uri_detail"):
                self.stats.unsupported_evals[f"({rdef.kind} rules)"] += 1
                return None
            elif rdef.exists:
                rule.exists = rdef.exists
            else:
                pattern = rdef.pattern
                if name in parsed.replace_rules:
                    pattern = apply_replace_tags(pattern, parsed.replace_tags)
                extra = re.MULTILINE if rdef.kind in ("body", "rawbody") else 0
                hit = self._cached_rules.get(name)
                if (isinstance(hit, list) and len(hit) == 4 and hit[0] == rdef.source
                        and hit[2] & extra == extra):
                    # translated before, from these very files: compiled on first use
                    rule.pattern, rule.flags = hit[1].encode("latin-1"), int(hit[2])
                    rule.literals = (None if hit[3] is None else
                                     tuple(bytes.fromhex(x) for x in hit[3]))
                else:
                    rule.compiled_re = compile_regex(pattern, extra)
                    rule.pattern, rule.flags = rule.compiled_re.pattern, rule.compiled_re.flags
                    rule.literals = required_literals(rule.compiled_re)
                if rdef.kind == "header":
                    rule.header, rule.negate = rdef.header, rdef.negate
                    if rdef.if_unset is not None:
                        rule.if_unset = rdef.if_unset.encode("latin-1", "replace")
        except (RegexError, MetaError) as exc:
            self.stats.errors.append(f"{rdef.source}: {rdef.kind} {name}: {exc}")
            if isinstance(exc, RegexError):
                self.stats.unsupported_regex += 1
            return None
        return rule

    def _eval_rule(self, rule: Rule, rdef: RuleDef) -> Rule | None:
        if rdef.eval_name in NET_EVALS:
            self.stats.net_rules += 1
            return None
        fn = EVALS.get(rdef.eval_name)
        if fn is None:
            self.stats.unsupported_evals[rdef.eval_name] += 1
            return None
        rule.kind, rule.eval_fn, rule.eval_args = "eval", fn, rdef.eval_args
        return rule

    def _order_metas(self) -> list[Rule]:
        """Metas in dependency order; cycles and undefined names disable a meta."""
        metas = {n: r for n, r in self.rules.items() if r.kind == "meta"}
        order: list[Rule] = []
        state: dict[str, int] = {}  # 1 visiting, 2 done

        def visit(name: str, chain: tuple[str, ...]) -> bool:
            if state.get(name) == 2:
                return name in self.rules
            if state.get(name) == 1:
                self.stats.errors.append(f"{self.rules[name].source}: meta {name}: circular "
                                         f"dependency via {' -> '.join(chain)}")
                return False
            state[name] = 1
            rule = metas[name]
            ok = True
            for dep in rule.deps:
                if dep in metas:
                    ok = visit(dep, (*chain, dep)) and ok
                elif dep not in self.rules and dep not in self.zero:
                    self.stats.warnings.append(f"{rule.source}: meta {name}: undefined rule "
                                               f"{dep}: meta disabled")
                    ok = False
            state[name] = 2
            if ok:
                order.append(rule)
            else:
                self.stats.disabled_metas += 1
                del self.rules[name]
                self.zero.add(name)
            return ok

        for name in list(metas):
            if state.get(name) != 2:
                visit(name, (name,))
        return order

    def _prune(self) -> None:
        """Drop rules that can never change a score (all scores 0, no scored meta needs them)."""
        needed: set[str] = set()
        stack = [n for n, r in self.rules.items() if any(r.scores)]
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            needed.add(name)
            rule = self.rules.get(name)
            if rule is not None:
                stack.extend(d for d in rule.deps if d in self.rules)
        for name in [n for n in self.rules if n not in needed]:
            del self.rules[name]
        self.metas = [m for m in self.metas if m.name in self.rules]

    # -- scanning -------------------------------------------------------------

    def scan(self, msg: ParsedMessage, *, tx: Any = None, now: float | None = None,
             bayes_prob: float | None = None, score_set: int = 0,
             deadline: float | None = None) -> ScanResult:
        """Run every rule on ``msg``. ``deadline`` (``time.monotonic()``): checked
        between rules; past it the scan stops with
        :class:`~mxguard.core.runtime.Overrun` (a TimeoutError: the rules check
        ends as RULES_TIMEOUT, its worker thread is free again)."""
        started = time.monotonic()
        ctx = ScanContext(msg, tx, time.time() if now is None else now, bayes_prob, self.lists)
        hits = HitMap()
        self._scan_headers(ctx, hits, deadline)
        texts = _texts(msg, ctx)
        past_deadline(deadline)
        for kind in ("body", "rawbody", "full"):
            text = texts[kind]
            for rule in self.targets[kind].candidates(text):
                past_deadline(deadline)
                _count(rule, text, hits)
        self._scan_uris(msg, hits, deadline)
        self._scan_evals(ctx, hits, deadline)
        past_deadline(deadline)
        if self.compiled:
            self._meta_plan.run(hits)
        else:
            _run_metas(self.metas, hits)
        return self._result(hits, score_set, time.monotonic() - started)

    def _scan_headers(self, ctx: ScanContext, hits: HitMap, deadline: float | None) -> None:
        index = (header_index(ctx.msg.headers), header_index(ctx.msg.raw_headers))
        for rule in self.exists_rules:  # pseudo-headers (ToCc, MESSAGEID ...) too
            name = rule.exists
            if ":" not in name and name not in _PSEUDO and name not in _ALL_HEADERS:
                if name.lower() in index[0]:
                    hits[rule.name] = 1
            elif ctx.msg.get(name) or header_values(ctx.msg, name, ctx, index):
                hits[rule.name] = 1
        for spec, target in self.header_targets.items():
            past_deadline(deadline)
            values = header_values(ctx.msg, spec, ctx, index)
            if not values:
                for rule in target.rules:
                    if rule.absent_hit():
                        hits[rule.name] = 1
                continue
            # Plain values end in a newline each (as SpamAssassin's get() gives
            # them); :addr, :name, :host, :domain give bare values.
            end = "" if _BARE_MODS.intersection(spec.split(":")[1:]) else "\n"
            text = "".join(v + end for v in values).encode("utf-8", "replace")
            matched: set[str] = set()
            for rule in target.candidates(text):
                assert rule.regex is not None
                if rule.regex.search(text) is not None:
                    matched.add(rule.name)
                    if not rule.negate:
                        hits[rule.name] = 1
            for rule in target.negated:
                if rule.name not in matched:
                    hits[rule.name] = 1

    def _scan_uris(self, msg: ParsedMessage, hits: HitMap, deadline: float | None) -> None:
        urls = [u.url.encode("utf-8", "replace") for u in msg.uris]
        if not urls:
            return
        # Every construct of a Hyperscan pattern only widens, and a URL's match is
        # a substring of the joined text: candidates from one pass over all URLs.
        for rule in self.targets["uri"].candidates(b"\n".join(urls)):
            past_deadline(deadline)
            assert rule.regex is not None
            n = sum(1 for u in urls if rule.regex.search(u))
            if n:
                hits[rule.name] = min(n, rule.maxhits or n) if rule.multiple else 1

    def _scan_evals(self, ctx: ScanContext, hits: HitMap, deadline: float | None) -> None:
        for rule in self.eval_rules:
            past_deadline(deadline)
            assert rule.eval_fn is not None
            try:
                value = rule.eval_fn(ctx, *rule.eval_args)
            except Exception as exc:
                _eval_failed(rule, exc)
                continue
            if value:
                hits[rule.name] = int(value)

    def _result(self, hits: HitMap, score_set: int, elapsed: float) -> ScanResult:
        out = ScanResult(counts=dict(hits), elapsed=elapsed)
        for name in sorted(hits):
            rule = self.rules.get(name)
            if rule is None or name.startswith("__"):
                continue
            score = rule.scores[score_set] * (hits[name] if rule.multiple else 1)
            if score:
                out.hits.append(RuleHit(name, round(score, 3), hits[name], rule.description))
                out.score += score
        out.score = round(out.score, 3)
        return out

    def describe(self, name: str) -> str:
        rule = self.rules.get(name)
        return rule.description if rule is not None else ""


def _run_metas(metas: list[Rule], hits: HitMap) -> None:
    for meta in metas:
        try:
            if meta.meta_fn is not None and meta.meta_fn(hits):
                hits[meta.name] = 1
        except (TypeError, ArithmeticError):
            continue


class _MetaPlan:
    """Metas to evaluate for one hit map: only those with a hit among their
    rules (found through an index of who reads which rule), in dependency
    order; a meta none of whose rules hit takes its value on an empty map
    (true for a few, such as ``!__X``), known at load time."""

    def __init__(self, metas: list[Rule], true_at_zero: set[str]) -> None:
        self.metas = metas
        self.deps = [frozenset(m.deps) for m in metas]
        self.at_zero = [i for i, m in enumerate(metas) if m.name in true_at_zero]
        self.true_at_zero = frozenset(self.at_zero)
        self.readers: dict[str, list[int]] = {}
        for i in range(len(metas)):
            for dep in self.deps[i]:
                self.readers.setdefault(dep, []).append(i)

    def run(self, hits: HitMap) -> None:
        readers, metas, deps = self.readers, self.metas, self.deps
        queue = list(self.at_zero)
        for name in hits:
            queue += readers.get(name, ())
        heapq.heapify(queue)
        keys = hits.keys()  # a live view: sees the metas set on the way
        done: set[int] = set()
        while queue:
            i = heapq.heappop(queue)
            if i in done:
                continue
            done.add(i)
            meta = metas[i]
            if keys.isdisjoint(deps[i]):
                fire = i in self.true_at_zero
            else:
                try:
                    fire = meta.meta_fn is not None and bool(meta.meta_fn(hits))
                except (TypeError, ArithmeticError):
                    continue
            if fire:
                hits[meta.name] = 1
                for j in readers.get(meta.name, ()):
                    heapq.heappush(queue, j)  # dependency order: always after i


def _count(rule: Rule, text: bytes, hits: HitMap) -> None:
    assert rule.regex is not None
    if not rule.multiple:
        if rule.regex.search(text):
            hits[rule.name] = 1
        return
    n = 0
    for _ in rule.regex.finditer(text):
        n += 1
        if rule.maxhits and n >= rule.maxhits:
            break
    if n:
        hits[rule.name] = n


def _texts(msg: ParsedMessage, ctx: ScanContext) -> dict[str, bytes]:
    body_msg = msg
    if any(len(p.text) > BODY_PART_SCAN for p in msg.parts):
        body_msg = ParsedMessage(headers=msg.headers, parts=[
            type(p)(p.content_type, p.charset, p.text[:BODY_PART_SCAN], p.raw, p.filename)
            for p in msg.parts])
        ctx.cache["body"] = rendered_body(body_msg)
    raw = "\n".join(p.raw[:RAWBODY_PART_SCAN] for p in msg.parts)
    head = "".join(f"{n}:{v}\n" for n, v in msg.raw_headers)
    full = head.encode("utf-8", "replace") + b"\n" + msg.raw_body.encode("latin-1", "replace")
    return {"body": ctx.body.encode("utf-8", "replace"),
            "rawbody": raw.encode("utf-8", "replace"), "full": full}


_FAILED_EVALS: set[str] = set()


def _eval_failed(rule: Rule, exc: Exception) -> None:
    if rule.name not in _FAILED_EVALS:
        _FAILED_EVALS.add(rule.name)
        log.warning("content: eval rule %s failed: %s: %s (logged once)", rule.name,
                    type(exc).__name__, exc)


# ------------------------------------------------------------------ loading


def build_ruleset(paths: Iterable[str | os.PathLike[str]], *,
                  use_hyperscan: bool | None = None, compiled: bool = True,
                  cache_dir: str | os.PathLike[str] | None = None,
                  background: bool = False) -> RuleSet:
    """Parse and compile rule files/directories in order (later wins); see
    :class:`RuleSet` for the keywords."""
    return RuleSet(parse_paths(list(paths)), use_hyperscan=use_hyperscan, compiled=compiled,
                   cache_dir=cache_dir, background=background)


# Where ``rules_dirs = "auto"`` looks for SpamAssassin's rules: sa-update's
# directory first (its newest <version>/updates_spamassassin_org), then the
# package's. MXGUARD_SA_RULES (directories separated by ":", empty for none)
# replaces the list: the test suite sets it empty, so that what runs does not
# depend on whether SpamAssassin is installed on the machine.
SA_UPDATES_DIR = Path("/var/lib/spamassassin")
SA_SHARE_DIR = Path("/usr/share/spamassassin")
SA_SEARCH_ENV = "MXGUARD_SA_RULES"


def _has_cf(path: Path) -> bool:
    try:
        return path.is_dir() and any(path.glob("*.cf"))
    except OSError:
        return False


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def spamassassin_rules_dir() -> Path | None:
    """SpamAssassin's installed rules for ``rules_dirs = "auto"``, or None."""
    env = os.environ.get(SA_SEARCH_ENV)
    if env is not None:
        return next((Path(d) for d in env.split(":") if d and _has_cf(Path(d))), None)
    try:
        versions = sorted((d for d in SA_UPDATES_DIR.iterdir() if d.is_dir()),
                          key=lambda d: _version_key(d.name), reverse=True)
    except OSError:
        versions = []
    for version in versions:
        updates = version / "updates_spamassassin_org"
        if _has_cf(updates):
            return updates
    return SA_SHARE_DIR if _has_cf(SA_SHARE_DIR) else None


def rules_dirs(cfg: Any) -> tuple[list[str], str]:
    """(``[content] rules_dirs`` resolved, how: "auto" or "configured")."""
    value = cfg.content.rules_dirs
    if value == "auto":
        found = spamassassin_rules_dir()
        return ([str(found)] if found is not None else []), "auto"
    return list(value), "configured"


def is_spamassassin_dir(path: str | os.PathLike[str]) -> bool:
    """A directory of SpamAssassin's own ruleset (it holds its 50_scores.cf)."""
    try:
        return (Path(path) / "50_scores.cf").is_file()
    except OSError:
        return False


def rule_paths(cfg: Any) -> list[str]:
    """The rule sources ``[content]`` names, in load order: the built-in rules,
    ``rules_dirs``, :data:`BUILTIN_SA_OVERLAP` when both the built-in rules and
    SpamAssassin's are loaded (the built-in rules it already scores score 0),
    ``local_rules``."""
    content = cfg.content
    dirs = rules_dirs(cfg)[0]
    paths = [str(BUILTIN_RULES)] if content.builtin_rules else []
    overlap = [str(BUILTIN_SA_OVERLAP)] if paths and any(map(is_spamassassin_dir, dirs)) \
        else []
    return paths + dirs + overlap + list(content.local_rules)


def rules_cache_dir(cfg: Any) -> str:
    """Where compiled rules are kept: ``<state_dir>/rules-cache``."""
    return os.path.join(cfg.state_dir, "rules-cache")


def is_cached(paths: list[str], cache_dir: str | os.PathLike[str]) -> bool:
    """Whether the compiled-rules cache for these rule files is there."""
    key = rc.cache_key(parse_paths(list(paths)).files, f"hs={engine_choice(None)[1]}")
    return key is not None and rc.looks_cached(rc.cache_path(cache_dir, key))


def load_rules(cfg: Any, *, background: bool = False, interim: bool = False) -> RuleSet:
    """The RuleSet for a Config; logs one summary line and every load error.
    With rules besides the built-in ones, translated patterns and Hyperscan
    databases are cached under :func:`rules_cache_dir`; ``background``:
    Hyperscan databases not in the cache are compiled in a thread.

    ``interim`` (daemon start-up): the RuleSet returned has the built-in and
    local rules only (ready at once, so the milter listens at once) and the
    full set becomes its ``replacement`` (which
    :func:`mxguard.checks.rules.ruleset` then puts in service):

    * cache missing (cold start): compiled by a lower-priority process
      (:mod:`mxguard.content.rules_build`) and read back from the cache it
      wrote; messages meanwhile are scanned with the built-in rules;
    * cache present (warm start): read from it in a thread (about a second with
      SpamAssassin's rules); ``loading`` is set when done, and messages that
      reach the rules check before then wait for the full set."""
    dirs, how = rules_dirs(cfg)
    extra = bool(dirs or cfg.content.local_rules)
    paths = rule_paths(cfg)
    cache_dir = rules_cache_dir(cfg) if extra else None
    base = ([str(BUILTIN_RULES)] if cfg.content.builtin_rules else []) + [
        str(p) for p in cfg.content.local_rules]
    if interim and dirs and cache_dir is not None and is_cached(paths, cache_dir):
        ruleset = build_ruleset(base, background=background)
        ruleset.loading = threading.Event()
        log.info("content: rules: reading %s from the compiled-rules cache in %s; messages "
                 "wait for them", ", ".join(dirs), cache_dir)
        threading.Thread(target=_load_cached, args=(ruleset, cfg, paths, cache_dir),
                         name="mxguard-rules-load", daemon=True).start()
        return ruleset
    if interim and dirs and cache_dir is not None:
        ruleset = build_ruleset(base, background=background)
        log.warning("content: rules: %s not compiled yet (no cache in %s): serving with the "
                    "built-in%s rules until a background process has compiled them",
                    ", ".join(dirs), cache_dir, " and local" if cfg.content.local_rules else "")
        threading.Thread(target=_compile_elsewhere, args=(ruleset, cfg, paths, cache_dir),
                         name="mxguard-rules-build", daemon=True).start()
        _log_loaded(ruleset, cfg, [], how)
        return ruleset
    ruleset = build_ruleset(paths, cache_dir=cache_dir, background=background)
    _log_loaded(ruleset, cfg, dirs, how)
    return ruleset


BUILD_TIMEOUT = 3600.0  # seconds the background compile may take before it is stopped
BUILD_STOP_GRACE = 2.0  # after SIGTERM at close, before SIGKILL


def _compile_elsewhere(interim: RuleSet, cfg: Any, paths: list[str], cache_dir: str) -> None:
    """Compile ``paths`` into the cache in another process, then load them
    from it into ``interim.replacement`` (in this process, as a warm start).
    :meth:`RuleSet.close` (the daemon stopping) stops that process: a stopped
    daemon leaves none behind (the cache is written under a temporary name and
    renamed, so a compile stopped half-way leaves no cache file)."""
    started = time.monotonic()
    cmd = [sys.executable, "-m", "mxguard.content.rules_build", "--cache-dir", cache_dir, *paths]
    try:
        with interim._lock:
            if interim._closed:
                return
            proc = interim._builder = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if interim._closed:
            return  # stopped by close(): the daemon is going away
        if proc.returncode != 0:
            log.warning("content: rules: background compile failed (status %s: %s); "
                        "compiling in the daemon", proc.returncode,
                        err.decode("utf-8", "replace").strip()[-300:])
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("content: rules: background compile did not run (%s); compiling in the "
                    "daemon", exc)
    if interim._closed:
        return
    try:
        full = build_ruleset(paths, cache_dir=cache_dir, background=True)
    except Exception as exc:  # never an outage: the interim rules stay
        log.error("content: rules: cannot load %s (%s: %s); the built-in rules stay in use",
                  ", ".join(paths), type(exc).__name__, exc)
        return
    interim.replacement = full
    dirs, how = rules_dirs(cfg)
    _log_loaded(full, cfg, dirs, how)
    log.info("content: rules: full rule set in use after %.1fs (compiled in a background "
             "process)", time.monotonic() - started)


def _load_cached(interim: RuleSet, cfg: Any, paths: list[str], cache_dir: str) -> None:
    """A warm start: the full set from the cache into ``interim.replacement``;
    ``interim.loading`` is set in every case (a failure leaves the built-in rules
    in use, logged)."""
    started = time.monotonic()
    try:
        full = build_ruleset(paths, cache_dir=cache_dir, background=True)
    except Exception as exc:  # never an outage: the interim rules stay
        log.error("content: rules: cannot load %s (%s: %s); the built-in rules stay in use",
                  ", ".join(paths), type(exc).__name__, exc)
    else:
        interim.replacement = full
        dirs, how = rules_dirs(cfg)
        _log_loaded(full, cfg, dirs, how)
        log.info("content: rules: full rule set in use after %.1fs (read from the cache)",
                 time.monotonic() - started)
    finally:
        assert interim.loading is not None
        interim.loading.set()


def _log_loaded(ruleset: RuleSet, cfg: Any, dirs: list[str], how: str) -> None:
    st = ruleset.stats
    for err in st.errors[:50]:
        log.warning("content: rules: %s", err)
    if len(st.errors) > 50:
        log.warning("content: rules: %d more errors (see mxguard rules check)",
                    len(st.errors) - 50)
    sources = (["built-in"] if cfg.content.builtin_rules else []) + dirs + [
        str(p) for p in cfg.content.local_rules]
    log.info("content rules: %d rules from %s (%s)", sum(st.active.values()),
             ", ".join(sources) or "nothing", how if dirs or how == "configured" else
             "auto: SpamAssassin's rules not installed")
    log.info("content: rules loaded files=%d active=%d unsupported_evals=%d net_rules=%d "
             "errors=%d engine=%s hyperscan_rules=%s cache=%s seconds=%.2f", len(st.files),
             sum(st.active.values()), sum(st.unsupported_evals.values()), st.net_rules,
             len(st.errors), st.engine,
             st.hs_rules if ruleset.wait_compiled(0) else "compiling", st.cache or "none",
             st.seconds)


def score_set(cfg: Any, bayes_ready: bool) -> int:
    """SpamAssassin score set: 2 with a usable Bayes, 0 without (no network rules here)."""
    return 2 if bayes_ready and cfg.bayes.enabled else 0


__all__ = ["BUILTIN_RULES", "BUILTIN_SA_OVERLAP", "SA_SHARE_DIR", "SA_UPDATES_DIR", "LoadStats",
           "Rule", "RuleHit", "RuleSet", "ScanResult", "build_ruleset", "engine_choice",
           "header_values", "is_cached", "is_spamassassin_dir", "load_rules", "rule_paths",
           "rules_cache_dir", "rules_dirs", "score_set", "spamassassin_rules_dir"]
