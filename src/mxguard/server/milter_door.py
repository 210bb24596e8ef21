"""The milter door: a milter session's end of message through the pipeline.

The session becomes a :class:`~mxguard.core.transaction.Transaction` with its
:class:`~mxguard.core.transaction.Message`; the one runner walks the EOM and
DONE rows of :data:`mxguard.checks.PIPELINE` (outgoing mail: DKIM signing;
incoming: SPF, DKIM, DMARC, Authentication-Results, blocklists, Bayes, rules,
then the score actions and the spam headers); the Verdict becomes a
:class:`MilterResult`. One log line per message.
"""

from __future__ import annotations

from mxguard.checks import run_message
from mxguard.core.runner import log_decision
from mxguard.core.runtime import HasRuntime
from mxguard.core.transaction import Action, Verdict
from mxguard.server.milter_session import (
    BaseMilterHandler,
    MilterAction,
    MilterResult,
    MilterSession,
)


def milter_result(verdict: Verdict) -> MilterResult:
    """The Verdict as a milter answer."""
    decision = verdict.decision
    if decision is not None and decision.action is Action.QUARANTINE:
        return MilterResult(MilterAction.QUARANTINE, headers=list(verdict.headers),
                            replace_body=verdict.replace_body,
                            quarantine_reason=decision.text)
    if decision is not None:
        return MilterResult.from_decision(decision)
    return MilterResult(headers=list(verdict.headers), replace_body=verdict.replace_body)


class MxguardMilter(BaseMilterHandler):
    def __init__(self, daemon: HasRuntime) -> None:
        self.daemon = daemon

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        rt = self.daemon.runtime
        tx = session.transaction()
        tx.message = session.message()
        verdict = await run_message(tx, rt)
        result = milter_result(verdict)
        log_decision("milter", tx, verdict, result.action.value, rt)
        return result


__all__ = ["MxguardMilter", "milter_result"]
