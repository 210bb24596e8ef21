"""The message parsed once per transaction, for every check that reads content
(blocklists' URIs, Bayes tokens, rules), bounded by ``[milter] max_scan_size``
and ``[content] max_parts``; a larger message is scanned partially (logged)."""

from __future__ import annotations

import logging

from mxguard.content.mime import ParsedMessage, parse_message
from mxguard.core.runtime import Runtime, off_loop
from mxguard.core.transaction import Transaction

log = logging.getLogger("mxguard")


def parse_tx_message(tx: Transaction, rt: Runtime) -> ParsedMessage:
    """The transaction's message parsed within the configured bounds."""
    msg = tx.message
    max_bytes = rt.config.milter.max_scan_size
    max_parts = rt.config.content.max_parts
    if msg is None:
        return parse_message(b"", max_parts=max_parts, max_bytes=max_bytes)
    parsed = parse_message((list(msg.headers), msg.body_file()), max_parts=max_parts,
                           max_bytes=max_bytes)
    if parsed.truncated:
        log.info("content: partial scan queue_id=%s size=%d max_scan_size=%d parts=%d "
                 "problems=%s", tx.queue_id or "-", parsed.size, max_bytes, parsed.entities,
                 ";".join(parsed.problems[:3]).replace(" ", "_"))
    return parsed


async def parsed(tx: Transaction, rt: Runtime) -> ParsedMessage:
    """``tx.parsed``, parsed on first use (in a thread for a big message)."""
    if tx.parsed is None:
        tx.parsed = await off_loop(tx.size, parse_tx_message, tx, rt)
    result: ParsedMessage = tx.parsed
    return result


__all__ = ["parse_tx_message", "parsed"]
