"""One message's verdict in plain words (``mxguard explain``, the dashboard).

The first line says what happened and why, worded for the deciding check::

    rejected: SPF fail for example.com from 192.0.2.7; the domain allows only the
        hosts its SPF record lists (matched -all)
    accepted, spam score 7.2 of 5 (X-Spam-Flag added): BAYES_99 5, URIBL_BLACK 2.2
    deferred: greylisted, first time this client network, sender and recipient
        were seen; a retry after 300s is accepted

(each one line).
Then the reply sent, one line per symbol (score and detail, strongest first),
the per-check milliseconds and what observe mode held back. It reads only the
record (and, for the score thresholds, ``[actions]``): old records explain too.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from mxguard.store.history import HistoryRecord

ACTION_WORDS = {"reject": "rejected", "defer": "deferred", "defer_if_permit": "deferred",
                "quarantine": "quarantined", "accept": "accepted"}
TOP_SYMBOLS = 5

_SPF_DETAIL = re.compile(r"^(?P<domain>\S*)(?: from (?P<ip>\S+))?(?: \((?P<how>.*)\))?$")
_DMARC_DETAIL = re.compile(r"^(?P<domain>\S+) p=(?P<policy>\S+) aligned=(?P<aligned>\S+)$")

SPF_MEANING = {
    "fail": "the domain allows only the hosts its SPF record lists",
    "softfail": "the domain says this host is probably not allowed to send for it",
    "neutral": "the domain makes no statement about this host",
    "none": "the domain publishes no SPF record",
    "permerror": "the domain's SPF record is broken",
    "temperror": "its SPF record could not be looked up now",
}
HELO_MEANING = {
    "HELO_INVALID": "is not a valid hostname",
    "HELO_NOT_FQDN": "is not a fully-qualified hostname",
    "HELO_BARE_IP": "is a bare IP address, not a hostname",
    "HELO_UNKNOWN": "has no A, AAAA or MX record",
    "HELO_DNS_TEMPFAIL": "could not be looked up (temporary DNS failure)",
}
GREYLIST_MEANING = {
    "new": "first time this client network, sender and recipient were seen",
    "early": "retried before the greylisting delay was over",
}


def _sym(rec: HistoryRecord, *prefixes: str) -> dict[str, Any] | None:
    """The strongest symbol whose name starts with one of ``prefixes``."""
    found = [s for s in rec.symbols if str(s.get("name", "")).startswith(prefixes)]
    return max(found, key=lambda s: float(s.get("score", 0))) if found else None


def _reply_text(rec: HistoryRecord) -> str:
    """The text of the SMTP reply, without action word, code and enhanced code."""
    text = rec.reply
    text = re.sub(r"^(?:REJECT|DEFER_IF_PERMIT|DEFER|450|550|451|DUNNO)\s+", "", text)
    text = re.sub(r"^\d{3}\s+", "", text)
    return re.sub(r"^\d\.\d{1,3}\.\d{1,3}\s+", "", text).strip()


def _score_list(rec: HistoryRecord, limit: int = TOP_SYMBOLS) -> str:
    scored = sorted((s for s in rec.symbols if float(s.get("score", 0))),
                    key=lambda s: (-float(s.get("score", 0)), str(s.get("name"))))
    return ", ".join(f"{s['name']} {float(s['score']):g}" for s in scored[:limit])


def _spf(rec: HistoryRecord, word: str, actions: Any) -> str:
    sym = _sym(rec, "SPF_HELO_FAIL", "SPF_FAIL", "SPF_SOFTFAIL", "SPF_PERMERROR",
               "SPF_TEMPERROR", "SPF_HELO")
    if sym is None:
        return _generic(rec, word, actions)
    name = str(sym["name"])
    result = name.removeprefix("SPF_").removeprefix("HELO_").lower()
    m = _SPF_DETAIL.match(str(sym.get("detail", "")))
    domain = (m.group("domain") if m else "") or "the sender's domain"
    ip = (m.group("ip") if m else None) or rec.client_address or "this client"
    how = m.group("how") if m else None
    identity = "HELO " if "HELO" in name else ""
    meaning = SPF_MEANING.get(result, "")
    text = f"{word}: SPF {identity}{result} for {domain} from {ip}"
    if meaning:
        text += f"; {meaning}"
    return text + (f" ({how})" if how else "")


def _dmarc(rec: HistoryRecord, word: str, actions: Any) -> str:
    sym = _sym(rec, "DMARC_")
    if sym is None:
        return _generic(rec, word, actions)
    detail = str(sym.get("detail", ""))
    m = _DMARC_DETAIL.match(detail)
    if sym["name"] == "DMARC_TEMPERROR" or rec.action.startswith("defer"):
        domain = m.group("domain") if m else detail or "the From domain"
        return f"{word}: DMARC of {domain} could not be checked now (DNS temporary error)"
    if m is None:
        return f"{word}: DMARC fail for {detail or 'the From domain'}"
    aligned = m.group("aligned")
    why = ("neither SPF nor DKIM passed for the From domain" if aligned == "none"
           else f"only {aligned} aligned")
    return f"{word}: DMARC fail for {m.group('domain')} (policy p={m.group('policy')}): {why}"


def _greylist(rec: HistoryRecord, word: str, actions: Any) -> str:
    sym = _sym(rec, "GREYLIST_DEFERRED")
    detail = str(sym.get("detail", "")) if sym else ""
    reason, _, left = detail.partition(", ")
    text = f"{word}: greylisted"
    meaning = GREYLIST_MEANING.get(reason)
    if meaning:
        text += f", {meaning}"
    seconds = left.removesuffix(" left") if left.endswith(" left") else ""
    if seconds:
        text += f"; a retry after {seconds} is accepted"
    elif detail and not meaning:
        text += f" ({detail})"
    return text


def _helo(rec: HistoryRecord, word: str, actions: Any) -> str:
    sym = _sym(rec, "HELO_")
    if sym is None:
        return _generic(rec, word, actions)
    meaning = HELO_MEANING.get(str(sym["name"]), "was refused")
    name = rec.helo or str(sym.get("detail", ""))
    return f"{word}: HELO name {name!r} {meaning}"


def _content(rec: HistoryRecord, word: str, actions: Any) -> str:
    required = {"reject": "reject", "defer": "greylist", "defer_if_permit": "greylist",
                "quarantine": "reject"}.get(rec.action, "add_header")
    threshold = float(getattr(actions, required, 0) or 0)
    of = f" of {threshold:g}" if threshold else ""
    top = _score_list(rec)
    flag = " (X-Spam-Flag added)" if rec.action == "accept" and rec.spam else ""
    return f"{word}, spam score {rec.score:g}{of}{flag}" + (f": {top}" if top else "")


def _accept(rec: HistoryRecord, word: str, actions: Any) -> str:
    if rec.spam:
        return _content(rec, word, actions)
    if rec.door == "policy":
        return f"{word}: no check objected at the policy stage"
    threshold = float(getattr(actions, "add_header", 0) or 0)
    below = f" (spam from {threshold:g})" if threshold else ""
    top = _score_list(rec)
    return f"{word}, score {rec.score:g}{below}" + (f": {top}" if top else "")


def _generic(rec: HistoryRecord, word: str, actions: Any) -> str:
    by = rec.decided_by or "a check"
    text = _reply_text(rec)
    return f"{word} by {by}" + (f": {text}" if text else "")


DECIDERS: dict[str, Callable[[HistoryRecord, str, Any], str]] = {
    "spf": _spf, "dmarc": _dmarc, "greylist": _greylist, "helo": _helo, "actions": _content,
}


def headline(rec: HistoryRecord, actions: Any = None) -> str:
    """The first line: what happened and why."""
    if actions is None:
        from mxguard.config import Config

        actions = Config().actions
    word = ACTION_WORDS.get(rec.action, rec.action)
    if rec.action == "accept" or not rec.decided_by:
        return _accept(rec, word, actions) if rec.action == "accept" else \
            _generic(rec, word, actions)
    return DECIDERS.get(rec.decided_by, _generic)(rec, word, actions)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def explain(rec: HistoryRecord, actions: Any = None) -> str:
    """The verdict of one record in plain words: the headline, then the details."""
    lines = [headline(rec, actions)]
    rcpts = ", ".join(rec.recipients) or "-"
    what = "milter message" if rec.door == "milter" else f"{rec.door} request"
    lines.append(f"  {what}{' ' + rec.queue_id if rec.queue_id else ''} (record {rec.id}) "
                 f"on {rec.host or '-'} at {_when(rec.time)}")
    client = rec.client_address or "-"
    if rec.client_name and rec.client_name != "unknown":
        client += f" ({rec.client_name})"
    lines.append(f"  client {client}, HELO {rec.helo or '-'}; from <{rec.sender}> to {rcpts}")
    if rec.door == "milter":
        lines.append(f"  From: {rec.from_ or '-'}; Subject: {rec.subject or '-'}; "
                     f"Message-ID: {rec.message_id or '-'}; {rec.size} bytes")
    if rec.reply:
        lines.append(f"  answer: {rec.reply}")
    if rec.decided_by:
        lines.append(f"  decided by: {rec.decided_by}")
    lines.append(f"  score {rec.score:g}" + ("; spam" if rec.spam else ""))
    if rec.symbols:
        lines.append("  symbols:")
        width = max(len(str(s.get("name", ""))) for s in rec.symbols)
        for s in sorted(rec.symbols, key=lambda s: (-float(s.get("score", 0)),
                                                    str(s.get("name")))):
            detail = str(s.get("detail", ""))
            name = str(s.get("name", ""))
            lines.append(f"    {name:<{width}} {float(s.get('score', 0)):6.2f}"
                         + (f"  {detail}" if detail else ""))
    if rec.timings:
        total = sum(rec.timings.values())
        parts = ", ".join(f"{k} {v:.1f}" for k, v in rec.timings.items())
        lines.append(f"  timings (ms): {parts}; total {total:.1f}")
    if rec.headers_added:
        lines.append("  headers added: " + ", ".join(n for n, _ in rec.headers_added))
    for held in rec.observed:
        lines.append(f"  observe mode held back: {held}")
    if rec.kept:
        lines.append("  raw message kept (for learning from the dashboard)")
    return "\n".join(lines)


__all__ = ["explain", "headline"]
