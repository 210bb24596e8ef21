"""``eval:`` functions on the message's URIs: link text vs target, IP hosts,
shorteners, listed hosts."""

from __future__ import annotations

import re

from mxguard.content.evals.base import ScanContext, in_domain_list, org_domain, register

# ------------------------------------------------------------------ URIs


def _looks_like_host(text: str) -> str:
    """The host a link text shows ("www.bank.com", "https://bank.com/x"), or ''."""
    m = re.match(r"^\s*(?:https?://)?((?:[a-z0-9-]+\.)+[a-z]{2,}|\d{1,3}(?:\.\d{1,3}){3})"
                 r"(?::\d+)?(?:[/?#]\S*)?\s*$", text.lower())
    return m.group(1).rstrip(".") if m else ""


@register("check_https_ip_mismatch")
def https_ip_mismatch(ctx: ScanContext) -> bool:
    for uri in ctx.msg.uris:
        if uri.tag == "a" and uri.is_ip and uri.text.lower().startswith("https://"):
            return True
    return False


@register("check_https_http_mismatch")
def https_http_mismatch(ctx: ScanContext) -> bool:
    for uri in ctx.msg.uris:
        if (uri.tag == "a" and uri.scheme == "http" and uri.text.lower().startswith("https://")
                and _looks_like_host(uri.text) and
                org_domain(_looks_like_host(uri.text)) != org_domain(uri.host)):
            return True
    return False


@register("mxg_link_text_mismatch")
def link_text_mismatch(ctx: ScanContext) -> bool:
    """An <a> whose text shows one domain and whose href goes to another."""
    for uri in ctx.msg.uris:
        if uri.tag != "a" or not uri.host:
            continue
        shown = _looks_like_host(uri.text)
        if shown and org_domain(shown) != org_domain(uri.host):
            return True
    return False


@register("check_uri_host_listed")
def uri_host_listed(ctx: ScanContext, listname: str) -> bool:
    hosts = ctx.lists.uri_host_lists.get(listname, frozenset())
    return any(in_domain_list(u.host, hosts) for u in ctx.msg.uris)


@register("short_url")
@register("mxg_uri_shortener")
def short_url(ctx: ScanContext) -> bool:
    short = ctx.lists.url_shorteners
    return any(u.tag in ("a", "text") and in_domain_list(u.host, short) for u in ctx.msg.uris)


@register("check_uri_truncated")
def uri_truncated(ctx: ScanContext) -> bool:
    return any(len(u.url) > 8192 for u in ctx.msg.uris)


@register("mxg_uri_ip_literal")
def uri_ip_literal(ctx: ScanContext) -> bool:
    return any(u.is_ip and u.tag in ("a", "text", "form") for u in ctx.msg.uris)
