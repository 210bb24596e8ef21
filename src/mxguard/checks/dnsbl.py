"""DNS blocklists at end of message: the client IP and the message's URI hosts.

Config: ``[dnsbl] mode, client_zones, uri_zones, timeout, max_uris``.
Symbols: ``RBL_<ZONE>`` / ``URIBL_<ZONE>``, one per listing zone, scored by the
zone's ``=score`` (or ``[scores]``).
"""

from __future__ import annotations

from mxguard.content import dnsbl
from mxguard.content.message import parsed
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import CheckResult, Transaction

NAME = "dnsbl"
SYMBOLS = ("RBL_<ZONE>", "URIBL_<ZONE>")


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    cfg = rt.config.dnsbl
    if not (cfg.client_zones or cfg.uri_zones):
        return None
    message = await parsed(tx, rt) if cfg.uri_zones else None
    return await dnsbl.check(tx, rt, message)


__all__ = ["NAME", "SYMBOLS", "check"]
