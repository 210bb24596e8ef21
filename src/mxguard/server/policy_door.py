"""The policy door: one policy request through the pipeline, one reply.

The request becomes a :class:`~mxguard.core.transaction.Transaction`; the
runner walks the rows of :data:`mxguard.checks.PIPELINE` up to the request's
stage; the Verdict becomes exactly one ``action=`` (plus, when no milter is
wired, one header a check wants prepended). One log line per request.

HELO checks and ``policy_context=helo``: Postfix can call us from
``smtpd_helo_restrictions`` with ``policy_context=helo`` (so it words a HELO
reject as one); with ``smtpd_delay_reject = yes`` that request comes right
before the recipient request of the same session. The HELO rows then ran for
that session, and its later requests run only the stages after HELO. What
ran is remembered per SMTP session (client address, client port, HELO name),
bounded -- never for the whole process, so one request cannot switch HELO
checks off for other clients.
"""

from __future__ import annotations

from collections import OrderedDict

from mxguard.checks import PIPELINE
from mxguard.core.runner import evaluate, log_decision
from mxguard.core.runtime import HasRuntime
from mxguard.core.transaction import HeaderEdit, Stage, Transaction, Verdict
from mxguard.protocols.policy import PolicyRequest, encode_action, encode_reply
from mxguard.server.policy_headers import HeaderMemory

# Stages at which the policy door runs checks; other states answer DUNNO.
CHECKED_STAGES = (Stage.HELO, Stage.MAIL, Stage.RCPT)
# SMTP sessions whose HELO checks ran in smtpd_helo_restrictions: sessions in flight,
# at most Postfix's smtpd process limit (100 by default); see policy_headers.MAX_MESSAGES
MAX_SESSIONS = 4096

Session = tuple[str, str, str]


class PolicyDoor:
    """Turns one policy request into one reply through the pipeline."""

    def __init__(self, daemon: HasRuntime, max_sessions: int = MAX_SESSIONS) -> None:
        self.daemon = daemon
        self.headers = HeaderMemory()
        self.max_sessions = max_sessions
        self._helo_done: OrderedDict[Session, None] = OrderedDict()

    @staticmethod
    def session(tx: Transaction) -> Session:
        return (tx.client_address, tx.client_port, tx.helo)

    def helo_ran(self, tx: Transaction) -> None:
        key = self.session(tx)
        self._helo_done[key] = None
        self._helo_done.move_to_end(key)
        while len(self._helo_done) > self.max_sessions:
            self._helo_done.popitem(last=False)

    async def __call__(self, req: PolicyRequest) -> bytes:
        rt = self.daemon.runtime
        tx = req.transaction()
        if tx.stage not in CHECKED_STAGES:
            if tx.stage is Stage.DATA:  # headers still owed to this message
                header = self.headers.next_header(tx.instance, [])
                if header is not None:
                    return encode_reply(encode_action(Verdict(headers=[header])))
            return b"action=DUNNO\n\n"
        helo_context = tx.attrs.get("policy_context", "") == "helo"
        if helo_context:
            self.helo_ran(tx)
            verdict = await evaluate(tx, rt, PIPELINE, Stage.HELO)
        else:
            done = self.session(tx) in self._helo_done
            verdict = await evaluate(tx, rt, PIPELINE, tx.stage, Stage.HELO if done else None)
        wanted = [h for h in verdict.headers if isinstance(h, HeaderEdit)]
        header = self.headers.next_header(tx.instance, wanted)
        verdict.headers = [header] if header is not None else []
        action = encode_action(verdict, mta_prefix=helo_context)
        log_decision("policy", tx, verdict, action, rt)
        return encode_reply(action)


__all__ = ["CHECKED_STAGES", "PolicyDoor"]
