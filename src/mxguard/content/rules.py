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

Speed: only regex rules whose required literals occur in the text are run
(the prefilter, :mod:`mxguard.content.rules_prefilter`). Text per body part
is capped at :data:`BODY_PART_SCAN` characters (SpamAssassin's
``body_part_scan_size``). Metas are compiled by :mod:`mxguard.content.rules_meta`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxguard.content import evals
from mxguard.content.evals import EVALS, NET_EVALS, RuleLists, ScanContext
from mxguard.content.evals.base import DomainSet
from mxguard.content.mime import ParsedMessage, rendered_body
from mxguard.content.rules_meta import HitMap, MetaError, compile_meta
from mxguard.content.rules_parser import ParsedRules, RuleDef, apply_replace_tags, parse_paths
from mxguard.content.rules_prefilter import Prefilter, hyperscan_available, required_literals
from mxguard.content.rules_regex import RegexError, compile_regex
from mxguard.core.runtime import past_deadline

log = logging.getLogger("mxguard")

BUILTIN_RULES = Path(__file__).resolve().parent.parent / "data" / "rules" / "mxguard.cf"
BODY_PART_SCAN = 50_000  # characters of each text part seen by body rules
RAWBODY_PART_SCAN = 500_000
REGEX_KINDS = ("body", "rawbody", "full", "uri")


@dataclass(slots=True)
class Rule:
    name: str
    kind: str  # header | body | rawbody | full | uri | meta | eval
    source: str
    scores: tuple[float, float, float, float]
    description: str = ""
    tflags: frozenset[str] = frozenset()
    maxhits: int = 0
    regex: re.Pattern[bytes] | None = None
    literals: tuple[bytes, ...] | None = None
    header: str = ""
    negate: bool = False
    if_unset: bytes | None = None
    exists: str = ""
    eval_fn: Callable[..., bool | int] | None = None
    eval_args: tuple[str, ...] = ()
    meta_fn: Callable[[HitMap], Any] | None = None
    deps: tuple[str, ...] = ()

    @property
    def multiple(self) -> bool:
        return "multiple" in self.tflags


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


# ------------------------------------------------------------------ headers


def _addr_host(value: str) -> str:
    return evals.domain_of(evals.address(value))


_MODIFIERS: dict[str, Callable[[str], str]] = {
    "addr": evals.address,
    "name": evals.display_name,
    "host": _addr_host,
    "domain": lambda v: evals.org_domain(_addr_host(v)),
}


_BARE_MODS = frozenset(("addr", "name", "host", "domain"))
_ALL_HEADERS = frozenset(("ALL", "ALL-TRUSTED", "ALL-UNTRUSTED", "ALL-INTERNAL", "ALL-EXTERNAL"))


def header_values(msg: ParsedMessage, spec: str, ctx: ScanContext | None = None) -> list[str]:
    """The values a header rule tests (``[]`` when the header is absent)."""
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


class RuleSet:
    """Compiled rules; build with :func:`build_ruleset` or :func:`load_rules`."""

    def __init__(self, parsed: ParsedRules, *, use_hyperscan: bool | None = None) -> None:
        started = time.monotonic()
        self.stats = LoadStats(files=list(parsed.files), errors=list(parsed.errors),
                               warnings=list(parsed.warnings),
                               ignored_settings=Counter(parsed.ignored))
        self.lists = RuleLists(DomainSet(parsed.url_shorteners),
                               DomainSet(parsed.freemail_domains),
                               {k: DomainSet(v) for k, v in parsed.uri_host_lists.items()})
        self.rules: dict[str, Rule] = {}
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
        use_hs = hyperscan_available() if use_hyperscan is None else use_hyperscan
        self.stats.engine = "hyperscan+re" if use_hs else "re"
        self.header_rules = [r for r in self.rules.values() if r.kind == "header"]
        self.eval_rules = [r for r in self.rules.values() if r.kind == "eval"]
        self.prefilters = {kind: Prefilter([r for r in self.rules.values() if r.kind == kind],
                                            use_hs) for kind in REGEX_KINDS}
        for rule in self.rules.values():
            self.stats.active[rule.kind] += 1
            if rule.literals is not None:
                self.stats.prefiltered += 1
        self.stats.seconds = time.monotonic() - started

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
                rule.regex = compile_regex(pattern, extra)
                rule.literals = required_literals(rule.regex)
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
            for rule in self.prefilters[kind].candidates(text):
                past_deadline(deadline)
                _count(rule, text, hits)
        self._scan_uris(msg, hits, deadline)
        self._scan_evals(ctx, hits, deadline)
        past_deadline(deadline)
        for meta in self.metas:
            try:
                if meta.meta_fn is not None and meta.meta_fn(hits):
                    hits[meta.name] = 1
            except (TypeError, ArithmeticError):
                continue
        return self._result(hits, score_set, time.monotonic() - started)

    def _scan_headers(self, ctx: ScanContext, hits: HitMap, deadline: float | None) -> None:
        cache: dict[str, list[str]] = {}
        for n, rule in enumerate(self.header_rules):
            if not n % 16:
                past_deadline(deadline)
            if rule.exists:  # pseudo-headers (ToCc, MESSAGEID ...) too
                if ctx.msg.get(rule.exists) or header_values(ctx.msg, rule.exists, ctx):
                    hits[rule.name] = 1
                continue
            spec = rule.header
            if spec not in cache:
                cache[spec] = header_values(ctx.msg, spec, ctx)
            values = cache[spec]
            if values:
                # Plain values end in a newline each (as SpamAssassin's get() gives
                # them); :addr, :name, :host, :domain give bare values.
                end = "" if _BARE_MODS.intersection(spec.split(":")[1:]) else "\n"
                text = "".join(v + end for v in values).encode("utf-8", "replace")
            else:
                text = rule.if_unset if rule.if_unset is not None else b""
            assert rule.regex is not None
            matched = rule.regex.search(text) is not None
            if matched != rule.negate:
                hits[rule.name] = 1

    def _scan_uris(self, msg: ParsedMessage, hits: HitMap, deadline: float | None) -> None:
        urls = [u.url.encode("utf-8", "replace") for u in msg.uris]
        if not urls:
            return
        for rule in self.prefilters["uri"].candidates(b"\n".join(urls)):
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
                  use_hyperscan: bool | None = None) -> RuleSet:
    """Parse and compile rule files/directories in order (later wins)."""
    return RuleSet(parse_paths(list(paths)), use_hyperscan=use_hyperscan)


def rule_paths(cfg: Any) -> list[str]:
    """The rule sources ``[content]`` names, in load order."""
    content = cfg.content
    paths = [str(BUILTIN_RULES)] if content.builtin_rules else []
    return paths + list(content.rules_dirs) + list(content.local_rules)


def load_rules(cfg: Any) -> RuleSet:
    """The RuleSet for a Config; logs one summary line and every load error."""
    ruleset = build_ruleset(rule_paths(cfg))
    st = ruleset.stats
    for err in st.errors[:50]:
        log.warning("content: rules: %s", err)
    if len(st.errors) > 50:
        log.warning("content: rules: %d more errors (see mxguard rules check)",
                    len(st.errors) - 50)
    log.info("content: rules loaded files=%d active=%d unsupported_evals=%d net_rules=%d "
             "errors=%d engine=%s seconds=%.2f", len(st.files), sum(st.active.values()),
             sum(st.unsupported_evals.values()), st.net_rules, len(st.errors), st.engine,
             st.seconds)
    return ruleset


def score_set(cfg: Any, bayes_ready: bool) -> int:
    """SpamAssassin score set: 2 with a usable Bayes, 0 without (no network rules here)."""
    return 2 if bayes_ready and cfg.bayes.enabled else 0


__all__ = ["BUILTIN_RULES", "LoadStats", "Rule", "RuleHit", "RuleSet", "ScanResult",
           "build_ruleset", "header_values", "load_rules", "rule_paths", "score_set"]
