"""Content rules at end of message: the loaded ruleset on the parsed message.

Runs the :class:`~mxguard.content.rules.RuleSet` found at
``rt.services["content_rules"]`` (built by :func:`load_rules` at start-up and
on SIGHUP; built once here if absent) -- the built-in ``mxguard.cf``,
``rules_dirs`` and ``local_rules`` -- after SPF, DKIM, DMARC and Bayes, so
rules can read their results. A message over ``[milter] max_scan_size`` is
scanned partially (logged). The score set depends on whether Bayes is ready.

Config: ``[content] mode, builtin_rules, rules_dirs, local_rules, max_parts``.
Symbols: one per rule hit, named as the rule, scored by its ``score`` line.
"""

from __future__ import annotations

import asyncio
import time

from mxguard.content.message import parsed
from mxguard.content.rules import RuleSet, ScanResult, load_rules, score_set
from mxguard.core.runtime import Runtime, check_deadline, off_loop
from mxguard.core.transaction import CheckResult, Symbol, Transaction

NAME = "rules"
SYMBOLS = ("<RULE_NAME>",)
RULES_SERVICE = "content_rules"  # rt.services key of the loaded RuleSet


def ruleset(rt: Runtime) -> RuleSet:
    loaded = rt.services.get(RULES_SERVICE)
    if isinstance(loaded, RuleSet) and loaded.replacement is not None:
        # the interim rules of a cold start: the full set is compiled now
        while loaded.replacement is not None:
            loaded = loaded.replacement
        rt.services[RULES_SERVICE] = loaded
    if not isinstance(loaded, RuleSet):
        loaded = load_rules(rt.config)
        rt.services[RULES_SERVICE] = loaded
    return loaded


# the longest a message waits for the rule set of a warm start to be read (about a
# second with SpamAssassin's rules; a machine this slow scans with what is loaded)
WARM_START_WAIT = 60.0


async def loaded_ruleset(rt: Runtime) -> RuleSet:
    """:func:`ruleset`, once a warm start's full set is in service (bounded wait)."""
    current = ruleset(rt)
    loading = current.loading
    if loading is not None and not loading.is_set():
        deadline = time.monotonic() + WARM_START_WAIT
        while not loading.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        current = ruleset(rt)
    return current


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    message = await parsed(tx, rt)
    rules = await loaded_ruleset(rt)
    bayes = tx.results.get("bayes")
    ready = bayes is not None and isinstance(bayes.data, tuple) and bayes.data[2].ready
    result: ScanResult = await off_loop(
        tx.size, rules.scan, message, tx=tx, now=rt.clock(), bayes_prob=None,
        score_set=score_set(rt.config, ready), deadline=check_deadline())
    symbols = [Symbol(h.name, h.score, h.description) for h in result.hits]
    return CheckResult(NAME, symbols, reason=f"score={result.score:g}:rules={len(result.hits)}",
                       data=result, extra={"content_score": f"{result.score:g}"})


__all__ = ["NAME", "RULES_SERVICE", "SYMBOLS", "WARM_START_WAIT", "check", "loaded_ruleset",
           "ruleset"]
