"""``[content] report_safe``: spam that is delivered (not rejected or deferred)
is wrapped in a report message with the original attached, as SpamAssassin's
``report_safe`` does (:mod:`mxguard.content.report`). Off by default.

Config: ``[content] report_safe``, ``[actions] add_header``.
"""

from __future__ import annotations

import asyncio
import logging

from mxguard.checks.authresults import authserv_id
from mxguard.checks.spam_headers import descriptions_of
from mxguard.content.report import build_report_safe
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Action, CheckResult, Transaction
from mxguard.core.verdict import is_spam

NAME = "report_safe"
SYMBOLS: tuple[str, ...] = ()
log = logging.getLogger("mxguard")


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    verdict, msg, cfg = tx.verdict, tx.message, rt.config
    if verdict is None or msg is None:
        return None
    total = round(verdict.score, 3)
    held = verdict.decision is not None and verdict.decision.action is not Action.QUARANTINE
    if not is_spam(total, cfg.actions) or held:
        return None  # delivered spam only: not rejected/deferred
    if msg.truncated:
        log.warning("content: report_safe skipped queue_id=%s: the message was not "
                    "kept whole (milter max_message_size)", tx.queue_id or "-")
        return None
    wrap, new_body = await asyncio.to_thread(
        build_report_safe, list(msg.headers), msg.body_file(),
        score=total, required=float(cfg.actions.add_header),
        symbols=list(verdict.symbols), descriptions=descriptions_of(tx),
        hostname=authserv_id(rt), headers_exact=msg.headers_exact)
    return CheckResult(NAME, edits=list(wrap), replace_body=new_body, reason="wrapped")


__all__ = ["NAME", "SYMBOLS", "check"]
