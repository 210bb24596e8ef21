"""``eval:`` functions of rules, and the :class:`ScanContext` they read.

An eval is ``fn(ctx, *args) -> bool | int`` registered in :data:`EVALS` under
its rule-file name. Arguments arrive as strings (quotes removed). An eval
must not raise on odd input; if it does, the engine logs it once and counts
the rule as not hit.

SpamAssassin evals implemented (same names, so their rule files work):

* headers: ``check_for_missing_to_header``, ``check_header_count_range``,
  ``check_for_shifted_date``, ``check_illegal_chars``, ``subject_is_all_caps``,
  ``check_for_to_in_subject``, ``check_equal_from_domains``,
  ``check_for_matching_env_and_hdr_from``, ``check_fromname_equals_to``,
  ``check_fromname_equals_replyto``, ``check_fromname_spoof``,
  ``check_unresolved_template``, ``check_messageid_not_usable``,
  ``check_ratware_envelope_from``;
* MIME and body: ``check_for_mime``, ``check_for_mime_html``,
  ``check_for_mime_html_only``, ``check_mime_multipart_ratio``,
  ``check_msg_parse_flags``, ``check_base64_length``, ``check_ma_non_text``,
  ``check_for_uppercase``, ``check_body_8bits``, ``check_body_length``,
  ``check_blank_line_ratio``, ``check_microsoft_executable``,
  ``check_abundant_unicode_ratio``, ``check_for_ascii_text_illegal``;
* HTML: ``html_tag_exists``, ``html_image_only``, ``html_image_ratio``,
  ``html_title_subject_ratio``, ``check_iframe_src``, ``html_text_match``;
* URIs: ``check_https_ip_mismatch``, ``check_https_http_mismatch``,
  ``check_uri_host_listed``, ``short_url``, ``check_uri_truncated``;
* FreeMail: ``check_freemail_from``, ``check_freemail_replyto``,
  ``check_freemail_header``;
* authentication (results the milter computed; absent in ``mxguard scan``):
  ``check_for_spf_*`` and ``check_for_spf_helo_*``, ``check_dkim_signed``,
  ``check_dkim_valid``, ``check_dkim_valid_author_sig``, ``check_dmarc_*``;
* Bayes: ``check_bayes(min, max)`` with the probability the scan was given.

mxguard's own (``mxg_*``) evals back the built-in ruleset ``mxguard.cf``.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mxguard.content.mime import ParsedMessage, rendered_body

EvalFn = Callable[..., bool | int]
EVALS: dict[str, EvalFn] = {}
# Evals that need the network (DNS blocklists, Razor, Pyzor, DCC): never run here.
NET_EVALS = frozenset((
    "check_rbl", "check_rbl_sub", "check_rbl_txt", "check_uridnsbl", "check_rbl_from_host",
    "check_rbl_from_domain", "check_rbl_envfrom", "check_rbl_headers", "check_rbl_ns_from",
    "check_razor2", "check_razor2_range", "check_pyzor", "check_dcc", "check_dcc_reputation_range",
    "check_dns_sender", "check_askdns", "check_uri_host_in_blocklist", "check_hashbl_bodyre",
))


def register(name: str) -> Callable[[EvalFn], EvalFn]:
    def deco(fn: EvalFn) -> EvalFn:
        EVALS[name] = fn
        return fn
    return deco


@dataclass
class RuleLists:
    """List settings from the rule files that evals use."""

    url_shorteners: frozenset[str] = frozenset()
    freemail_domains: frozenset[str] = frozenset()
    uri_host_lists: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass
class ScanContext:
    """One message being scanned: parsed MIME, the transaction (or None in
    ``mxguard scan``), the clock, a Bayes probability if known, caches."""

    msg: ParsedMessage
    tx: Any = None
    now: float = field(default_factory=time.time)
    bayes_prob: float | None = None
    lists: RuleLists = field(default_factory=RuleLists)
    cache: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    @property
    def body(self) -> str:
        value: str = self.memo("body", lambda: rendered_body(self.msg))
        return value

    def result(self, check: str) -> Any:
        results = getattr(self.tx, "results", None) or {}
        return results.get(check)

    def result_extra(self, check: str, key: str) -> str:
        res = self.result(check)
        extra = getattr(res, "extra", None) or {}
        return str(extra.get(key, "")).lower()

    @property
    def envelope_from(self) -> str:
        sender = getattr(self.tx, "sender", None)
        if sender is not None and self.tx is not None:
            return str(sender)
        rp = self.msg.first("Return-Path")
        return address(rp) if rp else ""


# ------------------------------------------------------------------ helpers


def address(value: str) -> str:
    """The first address of a header value (lower case), '' if none."""
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        return ""
    for _, addr in pairs:
        if "@" in addr:
            return addr.strip().lower()
    return ""


def display_name(value: str) -> str:
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        return ""
    return pairs[0][0].strip() if pairs else ""


def domain_of(addr: str) -> str:
    return addr.rpartition("@")[2].strip().rstrip(".>").lower() if "@" in addr else ""


def org_domain(host: str) -> str:
    """Registrable domain via the public suffix list (the last two labels if
    the list cannot be loaded)."""
    host = host.strip(".").lower()
    if not host or host.replace(".", "").isdigit() or ":" in host:
        return host
    psl = _psl()
    if psl is not None:
        value: str | None = psl.privatesuffix(host)
        if value:
            return value
    return ".".join(host.split(".")[-2:])


_PSL: list[Any] = []


def _psl() -> Any:
    if not _PSL:
        try:
            from publicsuffixlist import PublicSuffixList

            _PSL.append(PublicSuffixList())
        except Exception:
            _PSL.append(None)
    return _PSL[0]


def _num(value: str, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def in_domain_list(domain: str, domains: frozenset[str]) -> bool:
    """``domain`` or a parent listed; ``*.example`` entries match subdomains."""
    if not domain:
        return False
    labels = domain.split(".")
    for i in range(len(labels)):
        candidate = ".".join(labels[i:])
        if candidate in domains or (i and "*." + candidate in domains):
            return True
    return False


# ------------------------------------------------------------------ headers


@register("check_for_missing_to_header")
def missing_to(ctx: ScanContext) -> bool:
    return not ctx.msg.get("To") and not ctx.msg.get("Apparently-To")


@register("check_header_count_range")
def header_count_range(ctx: ScanContext, name: str, lo: str, hi: str) -> bool:
    return _num(lo) <= len(ctx.msg.get(name)) <= _num(hi, float("inf"))


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
    low = float("-inf") if lo == "undef" else _num(lo)
    high = float("inf") if hi == "undef" else _num(hi)
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
    return high > _num(count) and high / len(text) > _num(ratio)


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


# ------------------------------------------------------------------ MIME / body


def _mime_stats(ctx: ScanContext) -> dict[str, float]:
    def build() -> dict[str, float]:
        msg = ctx.msg
        html = sum(1 for p in msg.parts if p.is_html)
        plain = sum(1 for p in msg.parts if p.content_type == "text/plain")
        ctypes = [v.lower() for v in msg.get("Content-Type")]
        return {
            "mime_body_html_count": html, "mime_body_text_count": plain,
            "mime_multipart_alternative": float(any("multipart/alternative" in c
                                                    for c in ctypes)),
            "mime_missing_boundary": float(any("without a closing boundary" in p
                                               for p in msg.problems)),
            "mime_html_only": float(html > 0 and plain == 0),
        }
    value: dict[str, float] = ctx.memo("mime_stats", build)
    return value


@register("check_for_mime")
def for_mime(ctx: ScanContext, test: str) -> bool:
    return bool(_mime_stats(ctx).get(test, 0.0))


@register("check_for_mime_html")
def mime_html(ctx: ScanContext) -> bool:
    return any(p.is_html for p in ctx.msg.parts)


@register("check_for_mime_html_only")
@register("mxg_html_only")
def mime_html_only(ctx: ScanContext) -> bool:
    return bool(_mime_stats(ctx)["mime_html_only"])


@register("check_mime_multipart_ratio")
def multipart_ratio(ctx: ScanContext, lo: str, hi: str) -> bool:
    """Text length of the plain part over the HTML part's rendering."""
    plain = sum(len(p.text) for p in ctx.msg.parts if p.content_type == "text/plain")
    html = sum(len(p.text) for p in ctx.msg.parts if p.is_html)
    if not plain or not html:
        return False
    return _num(lo) <= plain / html < _num(hi)


@register("check_msg_parse_flags")
def msg_parse_flags(ctx: ScanContext, flag: str) -> bool:
    if flag == "truncated":
        return ctx.msg.truncated
    if flag == "missing_head_body_separator":
        return any("not ended by an empty line" in p for p in ctx.msg.problems)
    return False


@register("check_base64_length")
def base64_length(ctx: ScanContext, lo: str, hi: str = "inf") -> bool:
    lines = [len(line) for line in ctx.msg.raw_body.split("\n")
             if len(line) > 40 and re.fullmatch(r"[A-Za-z0-9+/=]+", line)]
    return bool(lines) and _num(lo) <= max(lines) <= _num(hi, float("inf"))


@register("check_ma_non_text")
def ma_non_text(ctx: ScanContext) -> bool:
    ctypes = " ".join(v.lower() for v in ctx.msg.get("Content-Type"))
    return "multipart/alternative" in ctypes and not ctx.msg.parts


@register("check_for_uppercase")
def for_uppercase(ctx: ScanContext, lo: str, hi: str) -> bool:
    """Share of upper-case letters in the body (percent) within [lo, hi)."""
    def ratio() -> float:
        body = ctx.body.partition("\n")[2]
        letters = [c for c in body if c.isalpha()]
        if len(letters) < 200:
            return 0.0
        return 100.0 * sum(1 for c in letters if c.isupper()) / len(letters)
    value: float = ctx.memo("uppercase", ratio)
    return _num(lo) <= value < _num(hi, 101)


@register("check_body_8bits")
def body_8bits(ctx: ScanContext) -> bool:
    return bool(re.search(r"[\x80-\xff]{20,}", ctx.msg.raw_body))


@register("check_body_length")
def body_length(ctx: ScanContext, maximum: str) -> bool:
    return len(ctx.body.partition("\n")[2]) <= _num(maximum)


@register("check_blank_line_ratio")
def blank_line_ratio(ctx: ScanContext, lo: str, hi: str, minlines: str = "1") -> bool:
    lines = ctx.msg.text.split("\n")
    if len(lines) < _num(minlines, 1):
        return False
    blank = sum(1 for line in lines if not line.strip())
    return _num(lo) <= 100.0 * blank / len(lines) < _num(hi, 101)


@register("check_microsoft_executable")
def microsoft_executable(ctx: ScanContext) -> bool:
    return any(a.magic == "pe" for a in ctx.msg.attachments)


@register("check_abundant_unicode_ratio")
def abundant_unicode(ctx: ScanContext, ratio: str = "0.02") -> bool:
    text = ctx.msg.raw_body
    if not text:
        return False
    found = len(re.findall(r"&#x?[0-9a-fA-F]{3,};|=[Ee][0-9A-F]=", text))
    return found / len(text) > _num(ratio)


@register("check_for_ascii_text_illegal")
def ascii_text_illegal(ctx: ScanContext) -> bool:
    for part in ctx.msg.parts:
        if part.charset in ("ascii", "us-ascii") and re.search(r"[\x80-\xff]", part.raw):
            return True
    return False


# ------------------------------------------------------------------ HTML


@register("html_tag_exists")
def html_tag_exists(ctx: ScanContext, tag: str) -> bool:
    pat = re.compile(rf"(?i)<{re.escape(tag)}\b")
    return any(pat.search(p.raw) for p in ctx.msg.html_parts)


@register("html_image_only")
def html_image_only(ctx: ScanContext, lo: str, hi: str) -> bool:
    """HTML with images and only lo..hi characters of text."""
    html = ctx.msg.html_parts
    if not html or not any(u.tag == "img" for u in ctx.msg.uris):
        return False
    chars = sum(len("".join(p.text.split())) for p in html)
    return _num(lo) <= chars <= _num(hi)


@register("html_image_ratio")
def html_image_ratio(ctx: ScanContext, lo: str, hi: str) -> bool:
    html = ctx.msg.html_parts
    images = sum(1 for u in ctx.msg.uris if u.tag == "img")
    chars = sum(len(p.text) for p in html)
    if not html or not chars:
        return False
    return _num(lo) <= images * 1000.0 / chars < _num(hi, float("inf"))


@register("html_title_subject_ratio")
def html_title_subject_ratio(ctx: ScanContext, ratio: str) -> bool:
    for part in ctx.msg.html_parts:
        m = re.search(r"(?is)<title>(.*?)</title>", part.raw)
        subject = ctx.msg.subject
        if m and subject and m.group(1).strip():
            return len(m.group(1).strip()) / len(subject) > _num(ratio)
    return False


@register("check_iframe_src")
def iframe_src(ctx: ScanContext) -> bool:
    return any(u.tag == "iframe" for u in ctx.msg.uris)


@register("html_text_match")
def html_text_match(ctx: ScanContext, what: str, pattern: str) -> bool:
    try:
        pat = re.compile(pattern)
    except re.error:
        return False
    return any(pat.search(p.text) for p in ctx.msg.html_parts)


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


# ------------------------------------------------------------------ authentication


def _spf(ctx: ScanContext, helo: bool = False) -> str:
    return ctx.result_extra("spf", "spf_helo" if helo else "spf")


def _register_spf() -> None:
    for res in ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"):
        EVALS[f"check_for_spf_{res}"] = (lambda r: lambda ctx: _spf(ctx) == r)(res)
        EVALS[f"check_for_spf_helo_{res}"] = (lambda r: lambda ctx: _spf(ctx, True) == r)(res)


_register_spf()


@register("mxg_spf_result")
def mxg_spf(ctx: ScanContext, *wanted: str) -> bool:
    return _spf(ctx) in wanted


def _dkim_results(ctx: ScanContext) -> list[Any]:
    res = ctx.result("dkim_verify")
    data = getattr(res, "data", None)
    return list(data) if isinstance(data, list | tuple) else []


@register("check_dkim_signed")
def dkim_signed(ctx: ScanContext, *domains: str) -> bool:
    if ctx.result("dkim_verify") is not None:
        found = _dkim_results(ctx)
        return bool(found) and (not domains or any(r.domain in domains for r in found))
    return bool(ctx.msg.get("DKIM-Signature")) and not domains


@register("check_dkim_valid")
def dkim_valid(ctx: ScanContext, *domains: str) -> bool:
    return any(r.result == "pass" and (not domains or r.domain in domains)
               for r in _dkim_results(ctx))


@register("check_dkim_valid_author_sig")
def dkim_valid_author(ctx: ScanContext, *domains: str) -> bool:
    author = domain_of(address(ctx.msg.first("From")))
    return any(r.result == "pass" and r.domain.lower() == author for r in _dkim_results(ctx))


@register("mxg_dkim_result")
def mxg_dkim(ctx: ScanContext, *wanted: str) -> bool:
    """'pass', 'fail' (any signature failed and none passed), 'none' (unsigned)."""
    if ctx.result("dkim_verify") is None:
        return False
    found = {r.result for r in _dkim_results(ctx)}
    state = "pass" if "pass" in found else "fail" if found else "none"
    return state in wanted


def _dmarc(ctx: ScanContext) -> tuple[str, str]:
    return ctx.result_extra("dmarc", "dmarc"), ctx.result_extra("dmarc", "dmarc_policy")


@register("mxg_dmarc_result")
def mxg_dmarc(ctx: ScanContext, *wanted: str) -> bool:
    """'pass', 'fail', 'none' (no record), or 'fail_reject' / 'fail_quarantine'."""
    result, policy = _dmarc(ctx)
    return bool(result) and (result in wanted or f"{result}_{policy}" in wanted)


def _register_dmarc() -> None:
    EVALS["check_dmarc_pass"] = lambda ctx, *a: _dmarc(ctx)[0] == "pass"
    EVALS["check_dmarc_reject"] = lambda ctx, *a: _dmarc(ctx) == ("fail", "reject")
    EVALS["check_dmarc_quarantine"] = lambda ctx, *a: _dmarc(ctx) == ("fail", "quarantine")
    EVALS["check_dmarc_none"] = lambda ctx, *a: _dmarc(ctx) == ("fail", "none")
    EVALS["check_dmarc_missing"] = lambda ctx, *a: _dmarc(ctx)[0] == "none"


_register_dmarc()


@register("mxg_auth_known")
def mxg_auth_known(ctx: ScanContext) -> bool:
    """SPF or DKIM results exist for this message (false in ``mxguard scan``)."""
    return ctx.result("spf") is not None or ctx.result("dkim_verify") is not None


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


@register("mxg_helo_symbol")
def mxg_helo(ctx: ScanContext, *names: str) -> bool:
    """One of the HELO check's symbols (HELO_NOT_FQDN ...) was emitted."""
    res = ctx.result("helo")
    return any(s.name in names for s in getattr(res, "symbols", []) or [])


# ------------------------------------------------------------------ Bayes


@register("check_bayes")
def bayes(ctx: ScanContext, lo: str, hi: str) -> bool:
    prob = ctx.bayes_prob
    return prob is not None and _num(lo) <= prob < _num(hi, 1.01)


# ------------------------------------------------------------------ mxguard's own


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
    return len(letters) >= _num(min_letters, 10) and _caps(ctx.msg.subject)


@register("mxg_attachment_ext")
def attachment_ext(ctx: ScanContext, extensions: str) -> bool:
    """An attachment (or a zip member) whose name ends in one of the
    comma-separated extensions, or a Windows executable by its first bytes."""
    wanted = {e.strip().lower().lstrip(".") for e in extensions.split(",") if e.strip()}
    return any(att.extension in wanted for att in ctx.msg.attachments)


@register("mxg_archive_member_ext")
def archive_member_ext(ctx: ScanContext, extensions: str) -> bool:
    wanted = {e.strip().lower().lstrip(".") for e in extensions.split(",") if e.strip()}
    for att in ctx.msg.attachments:
        for name in att.inner_names:
            base = name.rstrip(". ").lower()
            if "." in base and base.rpartition(".")[2] in wanted:
                return True
    return False


@register("mxg_double_extension")
def double_extension(ctx: ScanContext) -> bool:
    """"invoice.pdf.exe": a document extension hiding an executable one."""
    pat = re.compile(r"(?i)\.(?:pdf|docx?|xlsx?|jpe?g|png|txt|zip)\s*\.(?:exe|scr|com|pif|"
                     r"bat|cmd|js|vbs|jar|lnk|hta)$")
    return any(pat.search(a.filename) for a in ctx.msg.attachments)


@register("mxg_executable_magic")
def executable_magic(ctx: ScanContext) -> bool:
    return any(a.magic in ("pe", "elf") for a in ctx.msg.attachments)


@register("mxg_mime_problem")
def mime_problem(ctx: ScanContext, what: str) -> bool:
    return any(what in p for p in ctx.msg.problems)


__all__ = ["EVALS", "NET_EVALS", "RuleLists", "ScanContext", "address", "domain_of",
           "org_domain", "register"]
