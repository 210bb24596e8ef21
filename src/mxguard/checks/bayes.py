"""Bayes: classify at end of message; autolearn once the verdict is known.

Classify (stage EOM, before the rules so SpamAssassin's ``check_bayes`` rules
see the probability): the message's tokens, hashed once, against the store;
with fewer than ``min_spam`` / ``min_ham`` learned it scores nothing
(``reason=not-ready``). Autolearn (stage DONE): a message whose score without
Bayes is clearly spam (``autolearn_spam``) or ham (``autolearn_ham``) is
learned in the background -- never mail from authenticated clients, never
rejected mail as ham, never under ``mxguard scan`` (a dry run). Its
``autolearn=`` status goes to X-Spam-Status.

Cold start (fewer than ``min_spam`` / ``min_ham`` learned, so Bayes cannot yet
veto a wrong lesson): with ``[bayes] cold_start = "strict"`` (the default)
autolearn takes only the clearest cases -- spam scoring at least
``autolearn_spam + cold_start_margin`` without Bayes, and ham whose From domain
passed DMARC (aligned SPF or DKIM) with not one rule scoring against it;
``"normal"`` keeps the usual thresholds, ``"off"`` learns nothing until Bayes is
ready. Each process says so in the log once an hour while it lasts, and once
when Bayes becomes ready.

Scores: ``[scores]``, else the loaded rule files' score lines for BAYES_*
(SpamAssassin's, when its rules are loaded: :func:`bayes_scores`), else the
built-in defaults (``config.SYMBOL_SCORES``).

Config: ``[bayes]``; mode: ``[content] mode``. Symbols: BAYES_00 ... BAYES_999.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mxguard.checks.rules import RULES_SERVICE
from mxguard.content.bayes import Autolearn, autolearn_decision, message_key_of
from mxguard.content.message import parsed
from mxguard.content.rules import score_set
from mxguard.content.tokenizer import tokenize_message
from mxguard.core.runner import log_failure
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Action, CheckResult, Symbol, Transaction
from mxguard.store.bayes_store import hashes

if TYPE_CHECKING:
    from mxguard.config import BayesConfig

NAME = "bayes"
AUTOLEARN = "autolearn"
SERVICE = "bayes"  # rt.services key of the BayesClassifier
SYMBOLS = ("BAYES_00", "BAYES_05", "BAYES_20", "BAYES_40", "BAYES_50", "BAYES_60", "BAYES_80",
           "BAYES_95", "BAYES_99", "BAYES_999")

COLD_START_LOG_INTERVAL = 3600.0  # seconds between "cold start" lines of one process
COLD_HAM_NEEDS = "DMARC_PASS"  # the symbol a cold-start ham must carry

log = logging.getLogger("mxguard")
_learning: set[asyncio.Task[Any]] = set()  # background learns, referenced until done


def cold_start_autolearn(decision: Autolearn, *, rest: float, symbols: Sequence[Symbol],
                         cfg: BayesConfig) -> Autolearn:
    """What :func:`autolearn_decision` may still learn while Bayes is in cold start.

    ``rest`` is the score without Bayes, ``symbols`` those of the verdict."""
    if decision.spam is None or cfg.cold_start == "normal":
        return decision
    if cfg.cold_start == "off":
        return Autolearn(None, "no", "cold start: no autolearn until Bayes is ready")
    if decision.spam:
        bar = cfg.autolearn_spam + cfg.cold_start_margin
        if rest >= bar:
            return decision
        return Autolearn(None, "no", f"cold start: score without bayes {rest:.1f} < {bar:.1f}")
    against = [s.name for s in symbols if s.score > 0]
    if any(s.name == COLD_HAM_NEEDS for s in symbols) and not against:
        return decision
    why = f"rules against it: {','.join(sorted(against))}" if against else \
        f"no {COLD_HAM_NEEDS}"
    return Autolearn(None, "no", f"cold start: ham needs {COLD_HAM_NEEDS} and no rule "
                     f"against it ({why})")


def cold_start_policy(cfg: BayesConfig) -> str:
    """One phrase: what autolearn does during cold start (log line, ``bayes stats``)."""
    if not (cfg.enabled and cfg.autolearn):
        return "autolearn is off"
    if cfg.cold_start == "off":
        return "autolearn learns nothing until then (bayes.cold_start = off)"
    if cfg.cold_start == "normal":
        return (f"autolearn uses its usual thresholds: spam >= {cfg.autolearn_spam:g}, ham < "
                f"{cfg.autolearn_ham:g} without Bayes (bayes.cold_start = normal)")
    return (f"autolearn takes only spam scoring >= "
            f"{cfg.autolearn_spam + cfg.cold_start_margin:g} without Bayes and ham with "
            f"{COLD_HAM_NEEDS} and no rule against it (bayes.cold_start = strict)")


class ColdStartLog:
    """The "cold start" line: at most once per interval while it lasts, and one
    "ready" line when it ends (only after a cold-start line of this process)."""

    def __init__(self, interval: float = COLD_START_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last = -math.inf
        self.said_cold = False

    def note(self, ready: bool, nspam: int, nham: int, cfg: BayesConfig) -> None:
        if ready:
            if self.said_cold:
                self.said_cold = False
                self.last = -math.inf
                log.info("bayes: ready: %d spam and %d ham learned; Bayes scores now and "
                         "autolearn uses its usual thresholds", nspam, nham)
            return
        now = self.clock()
        if now - self.last < self.interval:
            return
        self.last = now
        self.said_cold = True
        log.info("bayes: cold start: %d of %d spam and %d of %d ham learned, Bayes does not "
                 "score yet; meanwhile %s", nspam, cfg.min_spam, nham, cfg.min_ham,
                 cold_start_policy(cfg))


COLD_START_LOG = ColdStartLog()  # one per process


def bayes_scores(rt: Runtime) -> Mapping[str, float]:
    """The BAYES_* scores: ``[scores]`` first, then the loaded rule files' own
    score lines for them, then the built-in defaults.

    With SpamAssassin's rules loaded, its ``50_scores.cf`` scores Bayes for
    its score set 2 (Bayes, no network rules: mxguard runs none), balanced
    with its rules -- e.g. BAYES_99 3.8 -- where mxguard's defaults are
    fitted for the built-in rules alone. SpamAssassin's BAYES_999 range lies
    inside BAYES_99's and both fire; mxguard names one range per message, so
    its BAYES_999 scores the two together (3.8 + 0.2)."""
    ruleset = rt.services.get(RULES_SERVICE)
    lines = getattr(ruleset, "symbol_scores", None) or {}
    if not lines:
        return rt.config.scores
    sset = score_set(rt.config, True)
    scores = {name: value[sset] for name, value in lines.items() if name in SYMBOLS}
    if "BAYES_999" in scores and "BAYES_99" in scores:
        scores["BAYES_999"] = round(scores["BAYES_999"] + scores["BAYES_99"], 3)
    return {**scores, **rt.config.scores}


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    clf = rt.services.get(SERVICE)
    if clf is None:
        return None
    message = await parsed(tx, rt)
    hs = hashes(tokenize_message(message))  # hashed once: classify, then autolearn
    result = await clf.classify_hashes(hs)
    return CheckResult(NAME, result.symbols(bayes_scores(rt)),
                       reason=f"prob={result.prob:.3f}" if result.ready else "not-ready",
                       data=(message_key_of(message), hs, result))


def _learned(task: asyncio.Task[Any], interval: float) -> None:
    _learning.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # a read-only or unreachable store fails every learn: one line per interval
        log_failure("autolearn-task", interval, "bayes: autolearn failed: %s",
                    task.exception())


async def autolearn(tx: Transaction, rt: Runtime) -> CheckResult | None:
    """Learn clearly-spam / clearly-ham mail; ``extra["autolearn"]`` is the status."""
    clf = rt.services.get(SERVICE)
    checked = tx.results.get(NAME)
    verdict = tx.verdict
    if clf is None or checked is None or verdict is None or not isinstance(checked.data, tuple):
        return None
    key, hs, bayes_result = checked.data
    bayes_score = sum(s.score for s in checked.symbols)
    total = round(verdict.score, 3)
    prob = bayes_result.prob if bayes_result.ready else None
    cfg = rt.config.bayes
    decision = autolearn_decision(total, bayes_score, cfg, bayes_prob=prob)
    if decision.status != "disabled":
        COLD_START_LOG.note(bayes_result.ready, bayes_result.nspam, bayes_result.nham, cfg)
    if not bayes_result.ready:
        decision = cold_start_autolearn(decision, rest=total - bayes_score,
                                        symbols=verdict.symbols, cfg=cfg)
    rejected = verdict.decision is not None and verdict.decision.action is Action.REJECT
    status = decision.status
    if (decision.spam is not None and not tx.authenticated and not rt.dry_run
            and not (rejected and not decision.spam)):
        task = asyncio.get_running_loop().create_task(clf.learn_hashes(key, hs, decision.spam))
        _learning.add(task)
        task.add_done_callback(functools.partial(
            _learned, interval=rt.config.storage.fail_open_log_interval))
    return CheckResult(AUTOLEARN, extra={"autolearn": status})


__all__ = ["AUTOLEARN", "COLD_START_LOG", "NAME", "SERVICE", "SYMBOLS", "ColdStartLog",
           "autolearn", "bayes_scores", "check", "cold_start_autolearn", "cold_start_policy"]
