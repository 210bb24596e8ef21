"""What mxguard does at the milter door, at end of message.

Outgoing mail (client in ``[dkim] internal_hosts`` or SASL-authenticated):
DKIM-sign it once. Incoming mail: DKIM-verify every signature, take the SPF
result the policy door remembered for this (client, HELO, sender) -- or
compute it here when the policy door is not wired --, evaluate DMARC, remove
forged Authentication-Results claiming our authserv-id, and write one
Authentication-Results header at the top. One log line per message.

Modes apply as at the policy door: a DMARC reject is sent only in enforce
mode; observe logs what would have happened.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from mxguard import logs
from mxguard.auth import authresults
from mxguard.auth.dmarc import SpfAuth
from mxguard.checks import dkim as dkim_check
from mxguard.checks import dmarc as dm
from mxguard.checks import spf as spf_check
from mxguard.checks.content import (
    evaluate_content,
    is_spam,
    off_loop,
    parse_tx_message,
    spam_headers,
)
from mxguard.content import dnsbl
from mxguard.content.bayes import autolearn_decision, message_key_of
from mxguard.content.report import build_report_safe
from mxguard.content.tokenizer import tokenize_message
from mxguard.core.runner import Runtime
from mxguard.core.transaction import (
    Action,
    CheckResult,
    HeaderEdit,
    Mode,
    Stage,
    Transaction,
    Verdict,
)
from mxguard.server.milter import (
    BaseMilterHandler,
    HeaderChange,
    MilterAction,
    MilterResult,
    MilterSession,
)
from mxguard.store.bayes_store import hashes

if TYPE_CHECKING:
    from mxguard.server.daemon import Daemon

log = logging.getLogger("mxguard")
BAYES_SERVICE = "bayes"


class MxguardMilter(BaseMilterHandler):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._learning: set[asyncio.Task[Any]] = set()

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        rt = self.daemon.runtime
        tx = session.transaction()
        tx.stage = Stage.EOM
        tx.message = session
        verdict = Verdict()
        if dkim_check.is_outgoing(tx, rt.config.dkim):
            edits = self._outgoing(tx, rt, verdict)
            result = MilterResult(headers=edits)
        else:
            result = await self._incoming(session, tx, rt, verdict)
        logs.decisions.emit("door=milter " + logs.decision_line(tx, verdict, result.action.value))
        return result

    # ------------------------------------------------------------ outgoing

    def _outgoing(self, tx: Transaction, rt: Runtime, verdict: Verdict) -> list[Any]:
        if not rt.config.dkim.sign or rt.config.mode("dkim") is Mode.OFF:
            return []
        signed = dkim_check.sign_message(tx, rt)
        verdict.add(signed, Mode.SCORE)
        return [HeaderEdit(h.name, h.value) for h in signed.headers]

    # ------------------------------------------------------------ incoming

    async def _incoming(self, session: MilterSession, tx: Transaction, rt: Runtime,
                        verdict: Verdict) -> MilterResult:
        cfg = rt.config
        spf = await self._spf(tx, rt)
        if spf is not None:
            tx.results.setdefault("spf", CheckResult("spf", extra={"spf": spf.result}))
        dkim_results = None
        if cfg.dkim.verify and cfg.mode("dkim") is not Mode.OFF:
            checked = await dkim_check.verify(tx, rt)
            tx.results["dkim"] = checked
            verdict.add(checked, cfg.mode("dkim"))
            dkim_results = dm.dkim_auths(checked.data)
        outcome = None
        if cfg.mode("dmarc") is not Mode.OFF:
            outcome = await dm.evaluate_message(session.headers, spf, dkim_results or [], rt,
                                                tx=tx)
            tx.results["dmarc"] = outcome.check
            verdict.add(outcome.check, cfg.mode("dmarc"))
        edits: list[Any] = [HeaderChange.delete(authresults.HEADER, n) for n in
                            authresults.forged_indexes(session.headers, self.authserv_id(rt))]
        edits.append(dm.authentication_results(rt, spf=spf, dkim=dkim_results, dmarc=outcome))
        content_edits, new_body = await self._content(tx, rt, verdict)
        edits += content_edits
        if verdict.decision is not None:
            return MilterResult.from_decision(verdict.decision)
        if (outcome is not None and outcome.action == "quarantine"
                and cfg.mode("dmarc") is Mode.ENFORCE):
            return MilterResult(MilterAction.QUARANTINE, headers=edits, replace_body=new_body,
                                quarantine_reason=f"DMARC policy of {outcome.result.from_domain}")
        return MilterResult(headers=edits, replace_body=new_body)

    async def _content(self, tx: Transaction, rt: Runtime,
                       verdict: Verdict) -> tuple[list[Any], bytes | None]:
        """Blocklists, Bayes and the rules on top of the scores so far, then autolearn;
        X-Spam-* headers unless observing; with ``[content] report_safe`` spam also
        gets a new body (a report with the original attached) and MIME header edits."""
        cfg = rt.config
        mode = cfg.mode("content")
        if mode is Mode.OFF:
            return [], None
        parsed = await off_loop(tx.size, parse_tx_message, tx, rt)
        if cfg.mode("dnsbl") is not Mode.OFF:
            listed = await dnsbl.check(tx, rt, parsed)
            if listed is not None:
                verdict.add(listed, cfg.mode("dnsbl"))
        bayes_result = await self._bayes(tx, rt, parsed, verdict, mode)
        outcome = await evaluate_content(tx, rt, base_score=verdict.score,
                                         base_symbols=list(verdict.symbols), parsed=parsed,
                                         bayes_ready=bayes_result is not None
                                         and bayes_result.ready)
        before = list(verdict.symbols)
        tx.results["content"] = outcome.result
        verdict.add(outcome.result, mode)
        verdict.extra["spam_action"] = outcome.action
        status = self._autolearn(tx, rt, parsed, outcome.total, before, bayes_result, verdict)
        if mode is Mode.OBSERVE:
            return [], None
        descriptions = {h.name: h.description for h in outcome.result.data.hits}
        edits: list[Any] = spam_headers(outcome.total, before + outcome.result.symbols, cfg,
                                        status, descriptions)
        if outcome.subject is not None:
            edits.append(outcome.subject)
        new_body = None
        if (cfg.content.report_safe and is_spam(outcome.total, cfg.actions)
                and verdict.decision is None):  # delivered spam only: not rejected/deferred
            msg = tx.message
            if msg is None or getattr(msg, "truncated", False):
                log.warning("content: report_safe skipped queue_id=%s: the message was not "
                            "kept whole (milter max_message_size)", tx.queue_id or "-")
            else:
                wrap, new_body = await asyncio.to_thread(
                    build_report_safe, list(msg.headers), msg.body_file(),
                    score=outcome.total, required=float(cfg.actions.add_header),
                    symbols=before + outcome.result.symbols, descriptions=descriptions,
                    hostname=self.authserv_id(rt),
                    headers_exact=bool(getattr(msg, "headers_exact", True)))
                edits += wrap
        return edits, new_body

    async def _bayes(self, tx: Transaction, rt: Runtime, parsed: Any, verdict: Verdict,
                     mode: Mode) -> Any:
        clf = rt.services.get(BAYES_SERVICE)
        if clf is None or not rt.config.bayes.enabled:
            return None
        hs = hashes(tokenize_message(parsed))  # hashed once: classify, then autolearn
        result = await clf.classify_hashes(hs)
        symbols = result.symbols(rt.config.scores)
        checked = CheckResult("bayes", symbols, reason=f"prob={result.prob:.3f}"
                              if result.ready else "not-ready",
                              data=(message_key_of(parsed), hs))
        tx.results["bayes"] = checked
        verdict.add(checked, mode)
        return result

    def _autolearn(self, tx: Transaction, rt: Runtime, parsed: Any, total: float,
                   before: list[Any], bayes_result: Any, verdict: Verdict) -> str:
        """Learn clearly-spam / clearly-ham mail in the background; the autolearn= value."""
        clf = rt.services.get(BAYES_SERVICE)
        if clf is None or "bayes" not in tx.results:
            return "no"
        bayes_score = sum(s.score for s in tx.results["bayes"].symbols)
        prob = bayes_result.prob if bayes_result is not None and bayes_result.ready else None
        decision = autolearn_decision(total, bayes_score, rt.config.bayes, bayes_prob=prob)
        rejected = verdict.decision is not None and verdict.decision.action is Action.REJECT
        if decision.spam is None or tx.authenticated or (rejected and not decision.spam):
            return decision.status
        key, hs = tx.results["bayes"].data
        task = asyncio.get_running_loop().create_task(clf.learn_hashes(key, hs, decision.spam))
        self._learning.add(task)
        task.add_done_callback(self._learned)
        return decision.status

    def _learned(self, task: asyncio.Task[Any]) -> None:
        self._learning.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("bayes: autolearn failed: %s", task.exception())

    async def _spf(self, tx: Transaction, rt: Runtime) -> SpfAuth | None:
        """The policy door's SPF verdict for this message, or computed now."""
        if rt.config.mode("spf") is Mode.OFF:
            return None
        remembered = spf_check.remembered(rt, tx.client_address, tx.helo, tx.sender)
        if remembered is None:
            result: CheckResult | None = await spf_check.check(tx, rt)
            if result is None:
                return None
            remembered = spf_check.remembered(rt, tx.client_address, tx.helo, tx.sender)
            if remembered is None:
                return None
        return dm.spf_auth(remembered.mailfrom, null_sender=not tx.sender)

    def authserv_id(self, rt: Runtime) -> str:
        return rt.config.milter.authserv_id or authresults.default_authserv_id()
