"""Bayes: classify at end of message; autolearn once the verdict is known.

Classify (stage EOM, before the rules so SpamAssassin's ``check_bayes`` rules
see the probability): the message's tokens, hashed once, against the store;
with fewer than ``min_spam`` / ``min_ham`` learned it scores nothing
(``reason=not-ready``). Autolearn (stage DONE): a message whose score without
Bayes is clearly spam (``autolearn_spam``) or ham (``autolearn_ham``) is
learned in the background -- never mail from authenticated clients, never
rejected mail as ham, never under ``mxguard scan`` (a dry run). Its
``autolearn=`` status goes to X-Spam-Status.

Config: ``[bayes]``; mode: ``[content] mode``. Symbols: BAYES_00 ... BAYES_999.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from mxguard.content.bayes import autolearn_decision, message_key_of
from mxguard.content.message import parsed
from mxguard.content.tokenizer import tokenize_message
from mxguard.core.runner import log_failure
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Action, CheckResult, Transaction
from mxguard.store.bayes_store import hashes

NAME = "bayes"
AUTOLEARN = "autolearn"
SERVICE = "bayes"  # rt.services key of the BayesClassifier
SYMBOLS = ("BAYES_00", "BAYES_05", "BAYES_20", "BAYES_40", "BAYES_50", "BAYES_60", "BAYES_80",
           "BAYES_95", "BAYES_99", "BAYES_999")

log = logging.getLogger("mxguard")
_learning: set[asyncio.Task[Any]] = set()  # background learns, referenced until done


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    clf = rt.services.get(SERVICE)
    if clf is None:
        return None
    message = await parsed(tx, rt)
    hs = hashes(tokenize_message(message))  # hashed once: classify, then autolearn
    result = await clf.classify_hashes(hs)
    return CheckResult(NAME, result.symbols(rt.config.scores),
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
    decision = autolearn_decision(total, bayes_score, rt.config.bayes, bayes_prob=prob)
    rejected = verdict.decision is not None and verdict.decision.action is Action.REJECT
    status = decision.status
    if (decision.spam is not None and not tx.authenticated and not rt.dry_run
            and not (rejected and not decision.spam)):
        task = asyncio.get_running_loop().create_task(clf.learn_hashes(key, hs, decision.spam))
        _learning.add(task)
        task.add_done_callback(functools.partial(
            _learned, interval=rt.config.storage.fail_open_log_interval))
    return CheckResult(AUTOLEARN, extra={"autolearn": status})


__all__ = ["AUTOLEARN", "NAME", "SERVICE", "SYMBOLS", "autolearn", "check"]
