"""Logging set-up and the one key=value line per decision.

``[log] target`` sends lines to stderr or syslog (facility and socket from
config). Decision lines look like::

    action=defer_if_permit reply="450 4.2.0 Greylisted, see ..." stage=RCPT
    client=192.0.2.1[mail.example.org] helo=mail.example.org sender=a@b.example
    recipient=c@d.example queue_id=- reason=greylist:new symbols=GREYLIST_DEFERRED delay=300
"""

from __future__ import annotations

import logging
import logging.handlers
import socket
import sys

from mxguard.config import LogConfig, split_hostport
from mxguard.transaction import Transaction, Verdict

log = logging.getLogger("mxguard")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup(cfg: LogConfig) -> None:
    """(Re)configure the ``mxguard`` logger from ``[log]``."""
    handler: logging.Handler
    if cfg.target == "syslog":
        address: str | tuple[str, int] = cfg.syslog_address
        if not cfg.syslog_address.startswith("/"):
            address = split_hostport(cfg.syslog_address, 514)
        facility = logging.handlers.SysLogHandler.facility_names[cfg.syslog_facility]
        try:
            handler = logging.handlers.SysLogHandler(address=address, facility=facility,
                                                     socktype=socket.SOCK_DGRAM)
        except OSError as exc:
            handler = logging.StreamHandler(sys.stderr)
            print(f"mxguard: cannot open syslog at {cfg.syslog_address} ({exc.strerror}); "
                  "logging to stderr", file=sys.stderr)
        handler.setFormatter(logging.Formatter("mxguard[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s mxguard[%(process)d] "
                                               "%(levelname)s %(message)s"))
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(_LEVELS[cfg.level])
    log.propagate = False


def kv(value: str) -> str:
    """A log value: quoted when it has spaces, quotes or is empty."""
    if not value:
        return "-"
    if any(c in value for c in ' "=\t\n\r') or not value.isprintable():
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")\
            .replace("\r", "\\r") + '"'
    return value


def decision_line(tx: Transaction, verdict: Verdict, action: str) -> str:
    symbols = ",".join(f"{s.name}({s.score:g})" if s.score else s.name for s in verdict.symbols)
    parts = [
        f"action={kv(verdict.action.value)}",
        f"reply={kv(action)}",
        f"stage={tx.stage.name}",
        f"client={kv(tx.client_address)}[{kv(tx.client_name)}]",
        f"helo={kv(tx.helo)}",
        f"sender={kv(tx.sender or '<>')}",
        f"recipient={kv(tx.recipient)}",
        f"queue_id={kv(tx.queue_id)}",
        f"reason={kv(';'.join(verdict.reasons))}",
        f"symbols={kv(symbols)}",
        f"score={verdict.score:g}",
    ]
    if tx.sasl_username:
        parts.append(f"sasl_username={kv(tx.sasl_username)}")
    for key, value in verdict.extra.items():
        parts.append(f"{key}={kv(value)}")
    if verdict.observed:
        parts.append(f"observe={kv('; '.join(verdict.observed))}")
    return " ".join(parts)
