"""Authentication-Results (RFC 8601) at end of message, after SPF, DKIM and DMARC.

Removes forged Authentication-Results fields that claim our authserv-id
(``[milter] authserv_id``, default: this host's name) and writes one field at
the top from the results of the rows before it. Always on for incoming mail.
"""

from __future__ import annotations

from mxguard.auth import authresults
from mxguard.checks.dmarc import DmarcOutcome, auth_inputs, authentication_results
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import CheckResult, Edit, HeaderChange, Transaction

NAME = "authresults"
SYMBOLS: tuple[str, ...] = ()


def authserv_id(rt: Runtime) -> str:
    return rt.config.milter.authserv_id or authresults.default_authserv_id()


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    headers = tx.message.headers if tx.message is not None else []
    spf, dkim = auth_inputs(tx)
    dmarc_result = tx.results.get("dmarc")
    dmarc = dmarc_result.data if dmarc_result is not None and isinstance(
        dmarc_result.data, DmarcOutcome) else None
    edits: list[Edit] = [HeaderChange.delete(authresults.HEADER, n)
                         for n in authresults.forged_indexes(headers, authserv_id(rt))]
    edits.append(authentication_results(rt, spf=spf, dkim=dkim, dmarc=dmarc))
    return CheckResult(NAME, edits=edits)


__all__ = ["NAME", "SYMBOLS", "authserv_id", "check"]
