"""What the dashboard does besides showing records: learn, greylist lookups and
whitelisting, the redacted config. The same code paths as the CLI
(``mxguard learn``, ``mxguard greylist ...``, ``mxguard config show``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mxguard import config
from mxguard.checks.greylist_lists import (
    client_network,
    hashed_key,
    normalize_recipient,
    normalize_sender,
    parse_ip,
    triplet_text,
)
from mxguard.core.runtime import Runtime
from mxguard.redact import MASK, redact

log = logging.getLogger("mxguard")

LEARN_KINDS = ("spam", "ham", "forget")
TRIPLET_SCAN = 2000  # most recent triplets searched by a partial greylist lookup
TRIPLETS_SHOWN = 100


class ActionError(Exception):
    """Why an action cannot be done, in words for the page (``status``: HTTP code)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(...)`` awaited when it is a coroutine function, else in a thread (a
    SQLite query must not stall the loop the doors run on)."""
    if asyncio.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if asyncio.iscoroutine(result):
        return await result
    return result


# ------------------------------------------------------------ learning


async def learn(rt: Runtime, record_id: str, kind: str) -> str:
    """Learn the kept raw message of ``record_id`` as spam / ham, or forget it.
    Returns the outcome in words; :class:`ActionError` when it cannot be done."""
    from mxguard.cli.learn import Item, Summary, learn_items

    if kind not in LEARN_KINDS:
        raise ActionError(f"kind must be one of {', '.join(LEARN_KINDS)}")
    store = rt.services.get("history_store")
    if store is None:
        raise ActionError("history is off ([history] enabled = false)", 409)
    classifier = rt.services.get("bayes")
    if classifier is None:
        raise ActionError("Bayes is off ([bayes] enabled, [content] mode) or its store is "
                          "unusable", 409)
    record = await call(store.get, record_id)
    if record is None:
        raise ActionError(f"no message {record_id!r} in the history", 404)
    raw = await call(store.get_raw, str(record.id))
    if not raw:
        raise ActionError("the message itself was not kept (set [web] keep_messages to keep "
                          "the last N messages for learning)", 409)
    summary = Summary(forget=kind == "forget")
    await learn_items(classifier, iter([Item(f"history:{record.id}", bytes(raw))]),
                      spam=kind == "spam", forget=kind == "forget",
                      max_parts=rt.config.content.max_parts, summary=summary)
    if summary.errors:
        raise ActionError("the kept message could not be read", 500)
    if kind == "forget":
        return "forgotten" if summary.done else "was not learned"
    if summary.moved:
        return f"learned as {kind} (moved from the other class)"
    return f"learned as {kind}" if summary.done else f"already learned as {kind}"


async def bayes_counts(rt: Runtime) -> tuple[int, int] | None:
    classifier = rt.services.get("bayes")
    if classifier is None:
        return None
    st = await classifier.stats()
    return int(st.nspam), int(st.nham)


# ------------------------------------------------------------ greylist


@dataclass
class GreylistLookup:
    client: str = ""
    sender: str = ""
    recipient: str = ""
    network: str = ""
    client_whitelisted: str = ""  # the matching entry
    recipient_whitelisted: str = ""
    client_count: int | None = None  # deliveries counted for the auto-whitelist
    auto_whitelisted: bool = False
    triplet: dict[str, Any] | None = None  # the exact triplet, when all three were given
    triplets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _triplet_dict(rec: Any) -> dict[str, Any]:
    parts = rec.key.split("\t")
    if len(parts) != 3:
        parts = [rec.key, "-", "-"]
    return {"client": parts[0], "sender": parts[1] or "<>", "recipient": parts[2],
            "first_seen": rec.first_seen, "last_seen": rec.last_seen,
            "passed_at": rec.passed_at, "expires": rec.expires, "passed": rec.passed}


async def greylist_lookup(rt: Runtime, client: str, sender: str, recipient: str
                          ) -> GreylistLookup:
    """What greylisting knows of a client / sender / recipient (any may be empty)."""
    g = rt.services.get("greylist")
    if g is None:
        raise ActionError("greylisting is off", 409)
    out = GreylistLookup(client.strip(), sender.strip(), recipient.strip())
    gc = g.cfg
    await g.refresh_dynamic(force=True)
    secret = getattr(g, "_secret", None)
    if out.client:
        ip = parse_ip(out.client)
        if ip is None:
            out.notes.append(f"{out.client!r} is not an IP address: whitelist checked by "
                             "name only")
        for lists in (g.lists, g.dynamic):
            hit = lists.clients.match(ip, out.client.lower() if ip is None else "")
            if hit is not None:
                out.client_whitelisted = hit
                break
        if ip is not None:
            out.network = client_network(out.client, gc.ipv4_prefix, gc.ipv6_prefix,
                                         gc.lookup_by_host)
            ckey = out.network
            if gc.privacy and secret is not None:
                ckey = hashed_key(secret, "client\t" + out.network)
            rec = await g.store.get_client(ckey)
            if rec is not None:
                out.client_count = int(rec.count)
                out.auto_whitelisted = bool(gc.auto_whitelist_clients and
                                            rec.count >= gc.auto_whitelist_clients)
    if out.recipient:
        for lists in (g.lists, g.dynamic):
            hit = lists.recipients.match(normalize_recipient(out.recipient))
            if hit is not None:
                out.recipient_whitelisted = hit
                break
    if out.network and out.sender and out.recipient:
        text = triplet_text(out.network, normalize_sender(out.sender),
                            normalize_recipient(out.recipient))
        key = hashed_key(secret, text) if gc.privacy and secret is not None else text
        rec = await g.store.get_triplet(key)
        out.triplet = _triplet_dict(rec) if rec is not None else None
    if gc.privacy:
        out.notes.append("[greylist] privacy is on: triplets are stored as hashes, so only "
                         "an exact client + sender + recipient lookup can find one")
        return out
    wanted = [(0, out.network or out.client.lower()),
              (1, normalize_sender(out.sender) if out.sender else ""),
              (2, normalize_recipient(out.recipient) if out.recipient else "")]
    for rec in await g.store.list_triplets(TRIPLET_SCAN):
        parts = rec.key.split("\t")
        if len(parts) == 3 and all(not w or w in parts[i] for i, w in wanted):
            out.triplets.append(_triplet_dict(rec))
            if len(out.triplets) >= TRIPLETS_SHOWN:
                break
    return out


async def whitelist_client(rt: Runtime, entry: str, comment: str) -> bool:
    """Add a client entry to the dynamic whitelist (as ``mxguard greylist whitelist
    add --client``); True when new. A bad entry is an :class:`ActionError`."""
    from mxguard.checks.greylist_lists import WhitelistError

    g = rt.services.get("greylist")
    if g is None:
        raise ActionError("greylisting is off", 409)
    entry = entry.strip()
    if not entry:
        raise ActionError("give a client: IP address, CIDR, domain or /regex/")
    try:
        return bool(await g.add_whitelist(entry, "client", comment.strip()[:200]))
    except WhitelistError as exc:
        raise ActionError(str(exc)) from None


# ------------------------------------------------------------ config


def redacted_config(cfg: config.Config) -> str:
    """``mxguard config show`` without docs, every secret masked."""
    web = cfg.web
    if web.password_hash:
        cfg = dataclasses.replace(cfg, web=dataclasses.replace(web, password_hash=MASK))
    return redact(config.dump(cfg, docs=False))


__all__ = ["LEARN_KINDS", "ActionError", "GreylistLookup", "bayes_counts", "call",
           "greylist_lookup", "learn", "redacted_config", "whitelist_client"]
