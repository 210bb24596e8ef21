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

import logging
from typing import TYPE_CHECKING, Any

from mxguard import logs
from mxguard.auth import authresults
from mxguard.auth.dmarc import SpfAuth
from mxguard.checks import dkim as dkim_check
from mxguard.checks import dmarc as dm
from mxguard.checks import spf as spf_check
from mxguard.checks.content import evaluate_content
from mxguard.pipeline import Runtime
from mxguard.protocols.milter_server import (
    BaseMilterHandler,
    HeaderChange,
    MilterAction,
    MilterResult,
    MilterSession,
)
from mxguard.transaction import CheckResult, HeaderEdit, Mode, Stage, Transaction, Verdict

if TYPE_CHECKING:
    from mxguard.daemon import Daemon

log = logging.getLogger("mxguard")


class MxguardMilter(BaseMilterHandler):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

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
        edits += await self._content(tx, rt, verdict)
        if verdict.decision is not None:
            return MilterResult.from_decision(verdict.decision)
        if (outcome is not None and outcome.action == "quarantine"
                and cfg.mode("dmarc") is Mode.ENFORCE):
            return MilterResult(MilterAction.QUARANTINE, headers=edits,
                                quarantine_reason=f"DMARC policy of {outcome.result.from_domain}")
        return MilterResult(headers=edits)

    async def _content(self, tx: Transaction, rt: Runtime, verdict: Verdict) -> list[Any]:
        """Content scoring on top of the scores so far; X-Spam-* headers unless observing."""
        mode = rt.config.mode("content")
        if mode is Mode.OFF:
            return []
        outcome = await evaluate_content(tx, rt, base_score=verdict.score,
                                         base_symbols=list(verdict.symbols))
        tx.results["content"] = outcome.result
        verdict.add(outcome.result, mode)
        verdict.extra["spam_action"] = outcome.action
        if mode is Mode.OBSERVE:
            return []
        edits: list[Any] = list(outcome.headers)
        if outcome.subject is not None:
            edits.append(outcome.subject)
        return edits

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
