"""``eval:`` functions on headers and addresses: missing and counted headers,
dates, 8-bit and all-caps text, From/To/Reply-To comparisons, FreeMail."""

from __future__ import annotations

import email.utils
import re
from datetime import datetime

from mxguard.content.evals.base import (
    ScanContext,
    address,
    display_name,
    domain_of,
    in_domain_list,
    num,
    org_domain,
    register,
)

# ------------------------------------------------------------------ headers


@register("check_for_missing_to_header")
def missing_to(ctx: ScanContext) -> bool:
    return not ctx.msg.get("To") and not ctx.msg.get("Apparently-To")


@register("check_header_count_range")
def header_count_range(ctx: ScanContext, name: str, lo: str, hi: str) -> bool:
    return num(lo) <= len(ctx.msg.get(name)) <= num(hi, float("inf"))


def _date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    try:
        return parsed.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def received_time(ctx: ScanContext) -> float:
    """When we got the message: the top Received date, else now."""
    for value in ctx.msg.get("Received"):
        stamp = _date(value.rpartition(";")[2])
        if stamp is not None:
            return stamp
    return ctx.now


@register("check_for_shifted_date")
def shifted_date(ctx: ScanContext, lo: str = "undef", hi: str = "undef") -> bool:
    """Date header minus receive time, in hours, within [lo, hi) ("undef": open)."""
    value = ctx.msg.first("Date")
    stamp = _date(value) if value else None
    if stamp is None:
        return False
    hours = (stamp - received_time(ctx)) / 3600.0
    low = float("-inf") if lo == "undef" else num(lo)
    high = float("inf") if hi == "undef" else num(hi)
    return low <= hours < high


@register("check_illegal_chars")
def illegal_chars(ctx: ScanContext, name: str, ratio: str, count: str) -> bool:
    """Share (and number) of 8-bit characters in the raw header above the limits."""
    values = (ctx.msg.raw_headers if name == "ALL" else
              [(n, v) for n, v in ctx.msg.raw_headers if n.lower() == name.lower()])
    # Subject and From legitimately carry 8-bit text in much mail.
    text = "".join(v for n, v in values if n.lower() not in ("subject", "from"))
    if not text:
        return False
    high = sum(1 for ch in text if ord(ch) > 127)
    return high > num(count) and high / len(text) > num(ratio)


def _caps(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    words = re.findall(r"[^\W\d_]{2,}", text)
    return len(letters) >= 10 and len(words) >= 2 and all(c.isupper() for c in letters)


@register("subject_is_all_caps")
def subject_all_caps(ctx: ScanContext) -> bool:
    return _caps(ctx.msg.subject)


@register("check_for_to_in_subject")
def to_in_subject(ctx: ScanContext, test: str = "address") -> bool:
    addr = address(ctx.msg.first("To"))
    subject = ctx.msg.subject.lower()
    if not addr or not subject:
        return False
    local = addr.partition("@")[0]
    return addr in subject if test != "user" else bool(local) and local in subject


@register("check_equal_from_domains")
def equal_from_domains(ctx: ScanContext) -> bool:
    """True when envelope-from and From: registrable domains differ."""
    env = domain_of(ctx.envelope_from)
    hdr = domain_of(address(ctx.msg.first("From")))
    return bool(env and hdr) and org_domain(env) != org_domain(hdr)


@register("check_for_matching_env_and_hdr_from")
def matching_env_hdr_from(ctx: ScanContext) -> bool:
    env = ctx.envelope_from.lower()
    return bool(env) and env == address(ctx.msg.first("From"))


@register("check_fromname_equals_to")
def fromname_equals_to(ctx: ScanContext) -> bool:
    name = display_name(ctx.msg.first("From")).lower()
    return bool(name) and name == address(ctx.msg.first("To"))


@register("check_fromname_equals_replyto")
def fromname_equals_replyto(ctx: ScanContext) -> bool:
    name = display_name(ctx.msg.first("From")).lower()
    return "@" in name and address(name) == address(ctx.msg.first("Reply-To"))


@register("check_fromname_spoof")
@register("mxg_fromname_spoof")
def fromname_spoof(ctx: ScanContext) -> bool:
    """The display name carries an address whose domain is not the sender's."""
    value = ctx.msg.first("From")
    name = display_name(value)
    shown = re.search(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)", name)
    if shown is None:
        return False
    real = domain_of(address(value))
    return bool(real) and org_domain(shown.group(1).lower()) != org_domain(real)


@register("check_unresolved_template")
def unresolved_template(ctx: ScanContext) -> bool:
    return any(re.search(r"%[A-Z][A-Z_-]{2,}%", v) for _, v in ctx.msg.headers)


@register("check_messageid_not_usable")
def messageid_not_usable(ctx: ScanContext) -> bool:
    return not ctx.msg.get("Message-Id")


@register("check_ratware_envelope_from")
def ratware_envelope_from(ctx: ScanContext) -> bool:
    to_domain = domain_of(address(ctx.msg.first("To")))
    env = ctx.envelope_from
    return bool(to_domain) and env.startswith("bounce-") and to_domain in env


# ------------------------------------------------------------------ FreeMail


def _freemail(ctx: ScanContext, value: str) -> bool:
    return in_domain_list(domain_of(address(value)), ctx.lists.freemail_domains)


@register("check_freemail_from")
def freemail_from(ctx: ScanContext, regex: str = "") -> bool:
    return _freemail(ctx, ctx.msg.first("From"))


@register("check_freemail_header")
def freemail_header(ctx: ScanContext, name: str, regex: str = "") -> bool:
    return any(_freemail(ctx, v) for v in ctx.msg.get(name))


@register("check_freemail_replyto")
def freemail_replyto(ctx: ScanContext, option: str = "replyto") -> bool:
    """Reply-To is a freemail address different from a (freemail) From."""
    reply = address(ctx.msg.first("Reply-To"))
    sender = address(ctx.msg.first("From"))
    if not reply or reply == sender or not _freemail(ctx, reply):
        return False
    return option != "freemail" or _freemail(ctx, sender)


@register("mxg_replyto_other_domain")
def replyto_other_domain(ctx: ScanContext) -> bool:
    reply = domain_of(address(ctx.msg.first("Reply-To")))
    sender = domain_of(address(ctx.msg.first("From")))
    return bool(reply and sender) and org_domain(reply) != org_domain(sender)


@register("mxg_replyto_freemail_from_not")
def replyto_freemail_from_not(ctx: ScanContext) -> bool:
    """Replies go to a freemail mailbox although From is not freemail."""
    return bool(_freemail(ctx, ctx.msg.first("Reply-To"))
                and not _freemail(ctx, ctx.msg.first("From"))
                and replyto_other_domain(ctx))


# ------------------------------------------------------------------ mxguard's own


@register("mxg_mid_rcpt_domain")
def mid_rcpt_domain(ctx: ScanContext) -> bool:
    """Message-ID made up with the recipient's domain by a sender from elsewhere."""
    mid = ctx.msg.first("Message-Id")
    m = re.search(r"@([^>\s]+)>?\s*$", mid)
    to_domain = domain_of(address(ctx.msg.first("To")))
    from_domain = domain_of(address(ctx.msg.first("From")))
    if m is None or not to_domain or not from_domain:
        return False
    mid_domain = m.group(1).lower().rstrip(".")
    return (org_domain(mid_domain) == org_domain(to_domain)
            and org_domain(from_domain) != org_domain(to_domain))


@register("mxg_date_invalid")
def date_invalid(ctx: ScanContext) -> bool:
    value = ctx.msg.first("Date")
    return bool(value) and _date(value) is None


@register("mxg_date_year_odd")
def date_year_odd(ctx: ScanContext) -> bool:
    stamp = _date(ctx.msg.first("Date"))
    if stamp is None:
        return False
    year = datetime.fromtimestamp(max(0.0, min(stamp, 4e10))).year
    return year < 1995


@register("mxg_subject_all_caps")
def mxg_subject_caps(ctx: ScanContext, min_letters: str = "10") -> bool:
    letters = [c for c in ctx.msg.subject if c.isalpha()]
    return len(letters) >= num(min_letters, 10) and _caps(ctx.msg.subject)
