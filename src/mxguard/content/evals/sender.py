"""``eval:`` functions on signs of a legitimate bulk sender (negative rules).

Companies that send newsletters through a mailing service keep one identity
across the envelope and the headers, and bounce handling gives every copy
its own bounce address (VERP: ``bounce-1234-5678@news.example.com``, or the
recipient encoded after a ``=``). Spam of every year in the corpus rarely
does either: it forges the From, sends from throw-away freemail accounts
whose envelope sender *is* the From address, or has no bounce handling at
all. Measured on MANIFEST's train half only (bench/README.md, "accuracy").

``mxg_links_sender_domain`` (most links go to From's own domain) is for
users' own rules: the built-in set leaves it out because spam linking to
its own domain shows it too -- on the train half, at -0.5 it cost 19 caught
spam for 1 false positive saved.

The envelope sender is the SMTP ``MAIL FROM`` in the milter, ``Return-Path``
in ``mxguard scan`` (:func:`envelope_sender`). Both are the sender's to
choose, so the rules of ``mxguard.cf`` that use these evals count only when
SPF or DKIM vouches for the message, or when no authentication result is
known (``mxguard scan``).
"""

from __future__ import annotations

import re

from mxguard.content.evals.base import (
    ScanContext,
    address,
    domain_of,
    in_domain_list,
    num,
    org_domain,
    register,
)

# a per-message bounce address: a run of digits or an encoded recipient
_VERP_LOCAL = re.compile(r"\d{4,}|=")
_LIST_UNSUB_HOSTS = re.compile(r"(?:@|://)([A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,63})")


def _company_from(ctx: ScanContext) -> tuple[str, str]:
    """(From address, its registrable domain), or ('', '') for no address or freemail."""
    sender = address(ctx.msg.first("From"))
    domain = domain_of(sender)
    if not domain or in_domain_list(domain, ctx.lists.freemail_domains):
        return "", ""
    return sender, org_domain(domain)


def envelope_sender(ctx: ScanContext) -> str:
    """MAIL FROM (lower case), else the Return-Path header's address (``mxguard
    scan`` has no SMTP envelope); '' for the null sender."""
    return (ctx.envelope_from.strip("<> ").lower()
            or address(ctx.msg.first("Return-Path")))


@register("mxg_bulk_bounce_same_org")
def bulk_bounce_same_org(ctx: ScanContext) -> bool:
    """A per-message bounce address (VERP) in the From address' own domain.

    The envelope sender differs from From, shares its registrable domain,
    and its local part carries a run of 4+ digits or an ``=`` (an encoded
    recipient); From is not a freemail address."""
    sender, org = _company_from(ctx)
    env = envelope_sender(ctx)
    if not org or not env or env == sender:
        return False
    env_domain = domain_of(env)
    if not env_domain or org_domain(env_domain) != org:
        return False
    return _VERP_LOCAL.search(env.rpartition("@")[0]) is not None


@register("mxg_list_unsubscribe_from_domain")
def list_unsubscribe_from_domain(ctx: ScanContext) -> bool:
    """List-Unsubscribe names a mailbox or web page in From's own domain
    (From not freemail)."""
    _, org = _company_from(ctx)
    if not org:
        return False
    for value in ctx.msg.get("List-Unsubscribe"):
        for host in _LIST_UNSUB_HOSTS.findall(value[:2000]):
            if org_domain(host.lower()) == org:
                return True
    return False


_WEB_HOST = re.compile(r"^https?://(?:[^/?#@]*@)?([^/?#:]+)", re.I)
MAX_LINKS = 64  # links looked at


@register("mxg_links_sender_domain")
def links_sender_domain(ctx: ScanContext, share: str = "0.5") -> bool:
    """At least ``share`` of the web links (and one) go to From's registrable
    domain; From is not freemail. A company links to its own site; spam links
    to wherever it sells, under whatever From it forged."""
    _, org = _company_from(ctx)
    if not org:
        return False
    hosts = [m.group(1).lower() for m in (_WEB_HOST.match(u.url) for u in ctx.msg.uris[:MAX_LINKS])
             if m is not None]
    if not hosts:
        return False
    own = sum(1 for h in hosts if org_domain(h) == org)
    return own > 0 and own >= num(share, 0.5) * len(hosts)


__all__ = ["bulk_bounce_same_org", "envelope_sender", "links_sender_domain",
           "list_unsubscribe_from_domain"]
