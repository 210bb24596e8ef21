"""Content scoring at end of message: rules, the score -> action policy, spam headers.

The milter handler calls :func:`evaluate_content` once per incoming message
(after SPF, DKIM, DMARC and HELO results are in ``tx.results`` so rules can
read them). It parses ``tx.message`` (a ``MilterSession``: ``headers`` and
``body_file()``) with :func:`mxguard.content.mime.parse_message`, bounded by
``[milter] max_scan_size`` and ``[content] max_parts`` (a larger message is
scanned partially, logged), runs the :class:`~mxguard.content.rules.RuleSet`
found at ``rt.services["content_rules"]`` (built by :func:`load_rules` at
start-up and on SIGHUP; built once here if absent) in a worker thread, and
returns a :class:`ContentOutcome`.

Scoring model (like rspamd's): every check emits symbols with scores; the
total -- the earlier checks' symbols (``base_score``, i.e. the milter's
``Verdict.score``) plus the content rules -- picks one action from
``[actions]``, strongest first: ``reject``, ``greylist`` (defer once),
``rewrite_subject``, ``add_header``; a threshold of 0 turns that action off.
Hard decisions of earlier stages (HELO, greylisting, SPF, DMARC rejects) are
not touched here: they are already in the milter's Verdict and win by rank
when the handler merges :attr:`ContentOutcome.result` into it.

Headers (:func:`spam_headers`), in SpamAssassin's grammar so existing filters
keep working::

    X-Spam-Flag: YES                      (only when score >= add_header)
    X-Spam-Status: Yes, score=7.3 required=5.0 tests=RULE_A,RULE_B
    \tautolearn=no autolearn_force=no version=mxguard-0.1.0
    X-Spam-Level: *******                 (one star per whole point, at most 50)
    X-Spam-Report: ...                    (with [content] add_report)

The subject tag (``[content] subject_tag``) is returned as a
``HeaderChange.change("Subject", ...)`` (or an add when the message has
none) for the handler to apply. ``[content] report_safe`` (off by default)
makes the milter handler wrap spam that is not rejected in a report with the
original attached (:mod:`mxguard.content.report`).

Config: ``[content]`` (mode, rules, header_prefix, add_report, subject_tag,
report_safe, max_parts), ``[actions]``, ``[milter] max_scan_size``.
Symbols: one per rule hit, named as the rule, scored by its ``score`` line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mxguard import __version__
from mxguard.content.mime import ParsedMessage, parse_message
from mxguard.content.rules import RuleSet, ScanResult, load_rules, score_set
from mxguard.core.runner import Runtime
from mxguard.core.transaction import Action, CheckResult, Decision, HeaderEdit, Symbol, Transaction
from mxguard.server.milter import HeaderChange

NAME = "content"
RULES_SERVICE = "content_rules"  # rt.services key of the loaded RuleSet
VERSION = f"mxguard-{__version__}"
MAX_STARS = 50
FOLD = "\r\n\t"
FOLD_WIDTH = 78

NO_ACTION = "no action"
ACTIONS = ("reject", "greylist", "rewrite_subject", "add_header")  # strongest first

log = logging.getLogger("mxguard")
T = TypeVar("T")

# Messages up to this size are parsed and scanned on the event loop itself.
# Both are mostly Python (they hold the GIL), so a worker thread gains no
# parallelism for them, only two thread hops and GIL hand-overs that the loop
# waits through (up to the 5 ms switch interval) while other mail is in flight.
# Bigger messages still go to a thread, so a big message never stalls the loop
# for long. Measured with bench/e2e.py (2 cores, 10 clients): at 2.3 KB inline
# gave +7-23% msgs/s and -0.4 ms CPU per message; at 52 KB it was a wash
# (worse with one worker, better with two), hence the bound.
INLINE_BYTES = 32 * 1024


async def off_loop(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in place for a message of ``size`` bytes up to
    :data:`INLINE_BYTES`, else in a worker thread."""
    if size <= INLINE_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


@dataclass(slots=True)
class ContentOutcome:
    """What content scoring says about one message.

    ``result`` is merged into the milter's Verdict (its symbols carry the rule
    scores; its ``decision`` is set for reject / greylist); ``action`` is the
    action for the *total* score; ``headers`` the X-Spam-* headers to add;
    ``subject`` the subject rewrite (None unless rewrite_subject applies);
    ``parsed`` the parsed message (for Bayes autolearn); ``total`` the score
    the action was chosen from.
    """

    result: CheckResult
    action: str = NO_ACTION
    headers: list[HeaderEdit] = field(default_factory=list)
    subject: HeaderChange | None = None
    parsed: ParsedMessage | None = None
    total: float = 0.0
    content_score: float = 0.0


# ------------------------------------------------------------------ policy


def choose_action(score: float, actions: Any) -> str:
    """The strongest action whose threshold (non-zero) the score reaches."""
    for name in ACTIONS:
        threshold = float(getattr(actions, name))
        if threshold and score >= threshold:
            return name
    return NO_ACTION


def is_spam(score: float, actions: Any) -> bool:
    return bool(actions.add_header) and score >= actions.add_header


def decision_for(action: str, score: float, cfg: Any) -> Decision | None:
    """The hard decision for ``reject`` (550 5.7.1) and ``greylist`` (451 4.7.1)."""
    if action == "reject":
        try:
            text = cfg.actions.reject_text.format(score=f"{score:.1f}",
                                                  required=f"{cfg.actions.reject:.1f}")
        except (KeyError, IndexError, ValueError):
            text = f"Message rejected as spam (score {score:.1f})"
        return Decision(Action.REJECT, 550, "5.7.1", _printable(text))
    if action == "greylist":
        return Decision(Action.DEFER, 451, "4.7.1",
                        "Message looks like spam, please try again later")
    return None


def _printable(text: str) -> str:
    return " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())[:400]


# ------------------------------------------------------------------ headers


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
        lines.append(f"* {s.score:5.1f} {s.name} {_printable(desc)}".rstrip())
    return FOLD.join(lines)


def spam_headers(verdict_score: float, symbols: list[Symbol], cfg: Any,
                 autolearn: str = "no", descriptions: dict[str, str] | None = None
                 ) -> list[HeaderEdit]:
    """X-Spam-Flag (only for spam), X-Spam-Status, X-Spam-Level and, with
    ``add_report``, X-Spam-Report -- in SpamAssassin's grammar.

    ``verdict_score`` is the total; ``symbols`` every scored symbol of the
    message (zero-score symbols are left out of ``tests=``, as SpamAssassin
    runs no zero-score rule); ``cfg`` the Config.
    """
    prefix = cfg.content.header_prefix
    required = float(cfg.actions.add_header)
    spam = is_spam(verdict_score, cfg.actions)
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


def subject_change(headers: list[tuple[str, str]], tag: str) -> HeaderChange | None:
    """The tagged Subject (not tagged twice); an added Subject when there is none."""
    if not tag:
        return None
    for name, value in headers:
        if name.strip().lower() == "subject":
            current = value.lstrip(" ")
            if current.startswith(tag.strip()):
                return None
            return HeaderChange.change("Subject", " " + tag + current
                                       if value.startswith(" ") else tag + current)
    return HeaderChange.add("Subject", tag.strip())


# ------------------------------------------------------------------ scanning


def _ruleset(rt: Runtime) -> RuleSet:
    ruleset = rt.services.get(RULES_SERVICE)
    if not isinstance(ruleset, RuleSet):
        ruleset = load_rules(rt.config)
        rt.services[RULES_SERVICE] = ruleset
    return ruleset


def parse_tx_message(tx: Transaction, rt: Runtime) -> ParsedMessage:
    """The transaction's message parsed within the configured bounds."""
    msg = tx.message
    max_bytes = rt.config.milter.max_scan_size
    max_parts = rt.config.content.max_parts
    if msg is None:
        return parse_message(b"", max_parts=max_parts, max_bytes=max_bytes)
    parsed = parse_message((list(msg.headers), msg.body_file()), max_parts=max_parts,
                           max_bytes=max_bytes)
    if parsed.truncated:
        log.info("content: partial scan queue_id=%s size=%d max_scan_size=%d parts=%d "
                 "problems=%s", tx.queue_id or "-", parsed.size, max_bytes, parsed.entities,
                 ";".join(parsed.problems[:3]).replace(" ", "_"))
    return parsed


async def scan(tx: Transaction, rt: Runtime, parsed: ParsedMessage, *,
               bayes_prob: float | None = None, bayes_ready: bool = False) -> CheckResult:
    """The content check: one symbol per rule hit; ``data`` is the ScanResult."""
    ruleset = _ruleset(rt)
    sset = score_set(rt.config, bayes_ready)
    result: ScanResult = await off_loop(
        tx.size, ruleset.scan, parsed, tx=tx, now=rt.clock(), bayes_prob=bayes_prob,
        score_set=sset)
    symbols = [Symbol(h.name, h.score, h.description) for h in result.hits]
    reason = f"score={result.score:g}:rules={len(result.hits)}"
    return CheckResult(NAME, symbols, reason=reason, data=result,
                       extra={"content_score": f"{result.score:g}"})


async def evaluate_content(tx: Transaction, rt: Runtime, *, base_score: float = 0.0,
                           base_symbols: list[Symbol] | None = None,
                           parsed: ParsedMessage | None = None,
                           bayes_prob: float | None = None, bayes_ready: bool = False,
                           autolearn: str = "no") -> ContentOutcome:
    """Scan ``tx.message`` and apply the score -> action policy.

    ``base_score`` / ``base_symbols``: what the earlier checks scored (the
    milter's ``Verdict.score`` and ``Verdict.symbols``), so the action and
    the headers reflect the whole message. ``parsed``: pass it when already
    parsed (e.g. for Bayes). ``bayes_prob``: the Bayes spam probability for
    SpamAssassin's ``check_bayes`` rules (None: those rules do not fire).
    """
    cfg = rt.config
    if parsed is None:
        parsed = await off_loop(tx.size, parse_tx_message, tx, rt)
    result = await scan(tx, rt, parsed, bayes_prob=bayes_prob, bayes_ready=bayes_ready)
    data: ScanResult = result.data
    total = round(base_score + data.score, 3)
    action = choose_action(total, cfg.actions)
    result.decision = decision_for(action, total, cfg)
    symbols = list(base_symbols or []) + result.symbols
    descriptions = {h.name: h.description for h in data.hits}
    headers = spam_headers(total, symbols, cfg, autolearn, descriptions)
    subject = None
    tag_at = cfg.actions.rewrite_subject
    if tag_at and total >= tag_at and action not in ("reject", "greylist"):
        subject = subject_change(_headers_of(tx), cfg.content.subject_tag)
    result.extra.update({"content_action": action, "score_total": f"{total:g}"})
    return ContentOutcome(result, action, headers, subject, parsed, total, data.score)


def _headers_of(tx: Transaction) -> list[tuple[str, str]]:
    msg = tx.message
    return list(getattr(msg, "headers", []) or [])


__all__ = ["ACTIONS", "NO_ACTION", "RULES_SERVICE", "ContentOutcome", "choose_action",
           "decision_for", "evaluate_content", "is_spam", "parse_tx_message", "scan",
           "spam_headers", "status_value", "subject_change"]
