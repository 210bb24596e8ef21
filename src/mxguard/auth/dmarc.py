"""DMARC (RFC 7489, with RFC 9091's ``np=``): policy discovery and evaluation.

No I/O but DNS through :class:`mxguard.dns.Resolver`. Entry point:
:func:`evaluate` (From header values, the SPF result, the DKIM results ->
:class:`DmarcResult`). Building blocks are public for tests and reports:
:func:`parse_record`, :func:`from_domains`, :class:`OrgDomains`,
:func:`aligned`, :func:`discover`.

Choices where the RFC leaves room (each one is tested):

* **Organizational domain**: the Public Suffix List, ICANN *and* private
  sections (``publicsuffixlist``; a frozen copy can be passed for tests). A
  From domain that is itself a public suffix is its own organizational domain.
* **Record syntax** (§6.3, DKIM tag-list rules): ``v=DMARC1`` must be the first
  tag (records that do not start so are not DMARC records at all, §6.6.3 step
  2). A term without ``=``, a bad tag name or a repeated tag makes the record
  malformed: result ``permerror``, no policy (RFC 8601 registry text). Empty
  terms (``;;``) and unknown tags are ignored. Tag names and keyword values
  are case-insensitive (they are quoted strings in RFC 7489's ABNF); the
  version value ``DMARC1`` is not (written as %x there). A missing or invalid ``p=`` or an
  invalid ``sp=``: with a valid ``rua=`` the record is read as ``p=none``
  (§6.6.3 step 6), otherwise DMARC does not apply (result ``none``). Invalid
  ``pct``/``adkim``/``aspf``/``np`` values fall back to their defaults (a
  warning is kept on the record).
* **Several records** at one name: no policy (result ``none``), no fallback.
* **No From / no usable domain**: ``permerror``, policy ``none`` -- DMARC never
  rejects for that; a malformed From is a matter for header checks.
* **Several From domains** (several mailboxes or From fields, §6.6.1): each
  distinct domain is evaluated; ``multiple_domains="strictest"`` (default)
  reports the strictest outcome (fail > temperror > permerror > none > pass,
  then the stricter disposition); ``"fail"`` turns any multi-domain From into
  ``fail`` with the strictest published policy. Both From parsers of the
  standard library are asked and their domains joined, so a malformed From
  cannot hide a domain from one of them.
* **np=** (RFC 9091): applies when the policy comes from the organizational
  record and the From domain has no A, AAAA or MX records (NXDOMAIN or
  NODATA). The lookup is done only for a failing message; a passing one reports
  ``sp``/``p``.
* **pct=**: a failing message outside the sample gets the next weaker policy
  (§6.6.4); the sampling is a hook (``sample(pct) -> bool``) for tests.
* **temperror**: any DNS temporary failure during discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses
from typing import Any

from publicsuffixlist import PublicSuffixList

from mxguard.dns import DnsTempError, Resolver

POLICIES = ("none", "quarantine", "reject")
RESULTS = ("pass", "fail", "none", "temperror", "permerror")
_POLICY_RANK = {"none": 0, "quarantine": 1, "reject": 2}
_RESULT_RANK = {"pass": 0, "none": 1, "permerror": 2, "temperror": 3, "fail": 4}
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_VERSION = re.compile(r"[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s,!]+(?:![0-9]+[kmgtKMGT]?)?\Z")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?\Z")
_WSP = " \t\r\n"

SampleFn = Callable[[int], bool]


class RecordError(ValueError):
    """A malformed DMARC record (result ``permerror``)."""


class RecordIgnored(ValueError):
    """A record without a usable policy and without rua= (DMARC does not apply)."""


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True, slots=True)
class SpfAuth:
    """The SPF result DMARC uses: MAIL FROM, or HELO when MAIL FROM was null."""

    result: str  # pass | fail | softfail | neutral | none | temperror | permerror
    domain: str  # the SPF-authenticated domain
    identity: str = "mailfrom"  # mailfrom | helo (for Authentication-Results)
    sender: str = ""  # envelope sender address, for smtp.mailfrom
    comment: str = ""  # free text for the A-R comment


@dataclass(frozen=True, slots=True)
class DkimAuth:
    """One verified DKIM signature."""

    result: str  # pass | fail | neutral | policy | temperror | permerror | none
    domain: str  # d=
    selector: str = ""  # s=
    b: str = ""  # b= (A-R shows a unique prefix, RFC 6008)
    identity: str = ""  # i=
    reason: str = ""  # why it failed, for A-R


# ------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: str
    sp: str | None = None
    np: str | None = None
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"
    rf: str = "afrf"
    ri: int = 86400
    raw: str = ""
    p_implied: bool = False  # p=none read because p= was missing/invalid and rua= valid
    warnings: tuple[str, ...] = ()


def is_dmarc_record(text: str) -> bool:
    """True when the TXT record starts with the ``v=DMARC1`` tag (§6.6.3 step 2)."""
    return _VERSION.match(text.lstrip(_WSP)) is not None


def split_tags(text: str) -> dict[str, str]:
    """The tag-list as {lower-case name: value}; raises :class:`RecordError`."""
    tags: dict[str, str] = {}
    for term in text.split(";"):
        term = term.strip(_WSP)
        if not term:
            continue
        name, eq, value = term.partition("=")
        name = name.strip(_WSP)
        if not eq or not _TAG_NAME.match(name):
            raise RecordError(f"malformed term {term[:40]!r}")
        if name.lower() in tags:
            raise RecordError(f"tag {name!r} repeated")
        tags[name.lower()] = value.strip(_WSP)
    return tags


def _uris(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(u.strip(_WSP) for u in value.split(",") if _URI.match(u.strip(_WSP)))


def _policy(value: str | None) -> str | None:
    return value.lower() if value is not None and value.lower() in POLICIES else None


def _policies(tags: dict[str, str]) -> tuple[str, str | None, bool]:
    """(p, sp, implied) per §6.6.3 step 6; raises :class:`RecordIgnored`."""
    p, sp = _policy(tags.get("p")), _policy(tags.get("sp"))
    sp_bad = "sp" in tags and sp is None
    if p is not None and not sp_bad:
        return p, sp, False
    if _uris(tags.get("rua")):
        return "none", None, True
    what = "invalid sp=" if p is not None else "no valid p="
    raise RecordIgnored(f"{what} and no rua=")


def _int_tag(tags: dict[str, str], name: str, default: int, top: int,
             warnings: list[str]) -> int:
    value = tags.get(name)
    if value is None:
        return default
    if value.isdigit() and len(value) < 10 and int(value) <= top:
        return int(value)
    warnings.append(f"invalid {name}={value[:20]}")
    return default


def _mode_tag(tags: dict[str, str], name: str, warnings: list[str]) -> str:
    value = tags.get(name, "r").lower()
    if value in ("r", "s"):
        return value
    warnings.append(f"invalid {name}={value[:20]}")
    return "r"


def parse_record(text: str) -> DmarcRecord:
    """Parse one TXT record; raises :class:`RecordError` / :class:`RecordIgnored`."""
    if not is_dmarc_record(text):
        raise RecordError("not a v=DMARC1 record")
    tags = split_tags(text)
    p, sp, implied = _policies(tags)
    warnings: list[str] = []
    np = _policy(tags.get("np"))
    if "np" in tags and np is None:
        warnings.append(f"invalid np={tags['np'][:20]}")
    return DmarcRecord(
        p=p, sp=sp, np=np, pct=_int_tag(tags, "pct", 100, 100, warnings),
        adkim=_mode_tag(tags, "adkim", warnings), aspf=_mode_tag(tags, "aspf", warnings),
        rua=_uris(tags.get("rua")), ruf=_uris(tags.get("ruf")), fo=tags.get("fo", "0"),
        rf=tags.get("rf", "afrf"), ri=_int_tag(tags, "ri", 86400, 2**31 - 1, warnings),
        raw=text, p_implied=implied, warnings=tuple(warnings))


# ------------------------------------------------------------------ domains


def normalize_domain(domain: str) -> str | None:
    """Lower-case A-label form without trailing dot, or None if not a usable name."""
    name = domain.strip(_WSP).rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii").lower()
        except (UnicodeError, ValueError):
            return None
    if not name or len(name) > 253:
        return None
    if not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


class OrgDomains:
    """Organizational domains from the Public Suffix List (RFC 7489 §3.2)."""

    def __init__(self, psl_file: str | None = None) -> None:
        if psl_file is None:
            self._psl = PublicSuffixList()
        else:
            with open(psl_file, "rb") as fh:
                self._psl = PublicSuffixList(fh)

    def registrable(self, domain: str) -> str | None:
        """The public suffix plus one label, or None (the PSL test-suite semantics)."""
        found: str | None = self._psl.privatesuffix(domain)
        return found

    def organizational(self, domain: str) -> str:
        """The organizational domain; a public suffix is its own (no fallback above it)."""
        return self.registrable(domain) or domain


_DEFAULT_ORG: list[OrgDomains] = []


def default_org_domains() -> OrgDomains:
    """The bundled list, loaded once."""
    if not _DEFAULT_ORG:
        _DEFAULT_ORG.append(OrgDomains())
    return _DEFAULT_ORG[0]


def aligned(auth_domain: str, from_domain: str, mode: str, org: OrgDomains) -> bool:
    """Identifier alignment (§3.1): strict = same name, relaxed = same org domain."""
    auth = normalize_domain(auth_domain)
    if auth is None:
        return False
    if auth == from_domain:
        return True
    return mode != "s" and org.organizational(auth) == org.organizational(from_domain)


_REGISTRY = HeaderRegistry()


# One plain mailbox: an optional display name of atoms or one quoted string
# without escapes, then <local@domain>; or a bare local@domain. Both stdlib
# parsers agree on these by construction, so the slow one (headerregistry, ~0.1
# ms) is skipped; everything else (groups, comments, lists, escapes, encoded
# words) still goes through both.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN_DOMAIN = r"([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_PLAIN_FROM = re.compile(
    r"[ \t]*(?:(?:[A-Za-z0-9_'-]+(?:[ \t.]+[A-Za-z0-9_'-]+)*|\"[^\"\\\r\n]*\")?[ \t]*"
    rf"<{_DOT_ATOM}@{_PLAIN_DOMAIN}>|{_DOT_ATOM}@{_PLAIN_DOMAIN})[ \t]*")


def _domains_of(value: str) -> list[str]:
    """Domains of every mailbox in one From value, by both stdlib parsers."""
    value = value.replace("\r", "").replace("\n", "")
    plain = _PLAIN_FROM.fullmatch(value)
    if plain is not None:
        domain = plain.group(1) or plain.group(2)
        return [domain, domain]  # what the two parsers return for it
    return _domains_by_parsers(value)


def _domains_by_parsers(value: str) -> list[str]:
    found: list[str] = []
    # A parser bug on hostile input must not lose the other parser's answer.
    with contextlib.suppress(Exception):
        found += [addr.rpartition("@")[2] for _, addr in getaddresses([value]) if "@" in addr]
    with contextlib.suppress(Exception):
        header: Any = _REGISTRY("from", value)
        found += [a.domain for a in header.addresses if a.domain]
    return found


@dataclass(frozen=True, slots=True)
class FromDomains:
    domains: tuple[str, ...]  # distinct, normalized, in order of appearance
    fields: int  # From header fields seen
    unusable: int  # mailbox domains that are not usable names


def from_domains(values: Sequence[str]) -> FromDomains:
    """The distinct author domains of the From field(s)."""
    seen: list[str] = []
    unusable = 0
    for value in values:
        for raw in _domains_of(value):
            name = normalize_domain(raw)
            if name is None:
                unusable += 1
            elif name not in seen:
                seen.append(name)
    return FromDomains(tuple(seen), len(values), unusable)


# ------------------------------------------------------------------ discovery


@dataclass(frozen=True, slots=True)
class Discovery:
    record: DmarcRecord | None
    domain: str = ""  # where the record was found
    result: str = "none"  # none | permerror | temperror, when record is None
    reason: str = ""


async def _lookup(resolver: Resolver, domain: str) -> list[str]:
    if len(domain) > 246:  # "_dmarc." + name would not be a valid name
        return []
    answer = await resolver.query(f"_dmarc.{domain}", "TXT")
    return [r for r in answer.records if isinstance(r, str) and is_dmarc_record(r)]


def _parsed(texts: list[str], domain: str) -> Discovery:
    if len(texts) > 1:
        return Discovery(None, domain, "none", f"{len(texts)} DMARC records at _dmarc.{domain}")
    try:
        return Discovery(parse_record(texts[0]), domain)
    except RecordIgnored as exc:
        return Discovery(None, domain, "none", f"record at _dmarc.{domain} ignored: {exc}")
    except RecordError as exc:
        return Discovery(None, domain, "permerror", f"malformed record at _dmarc.{domain}: {exc}")


async def discover(resolver: Resolver, from_domain: str, org_domain: str) -> Discovery:
    """Policy discovery (§6.6.3): the From domain, then its organizational domain."""
    try:
        texts = await _lookup(resolver, from_domain)
        if texts:
            return _parsed(texts, from_domain)
        if org_domain != from_domain:
            texts = await _lookup(resolver, org_domain)
            if texts:
                return _parsed(texts, org_domain)
    except DnsTempError as exc:
        return Discovery(None, "", "temperror", f"DNS: {exc}")
    return Discovery(None, "", "none", "no DMARC record")


async def domain_exists(resolver: Resolver, domain: str) -> bool:
    """RFC 9091 §2.1: a name with A, AAAA or MX records (NXDOMAIN/NODATA: no)."""
    answers = await asyncio.gather(*(resolver.query(domain, t) for t in ("A", "AAAA", "MX")))
    return any(a.records for a in answers)


# ------------------------------------------------------------------ evaluation


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str  # pass | fail | none | temperror | permerror
    policy: str = "none"  # the policy that applies (p, sp or np): none | quarantine | reject
    disposition: str = "none"  # after alignment and pct: none | quarantine | reject
    from_domain: str = ""
    org_domain: str = ""
    record: DmarcRecord | None = None
    record_domain: str = ""  # where the record was found (From or org domain)
    spf_aligned: bool = False
    dkim_aligned: bool = False
    dkim_domain: str = ""  # the d= that aligned
    sampled_out: bool = False  # failed but outside pct=
    reason: str = ""
    policy_tag: str = ""  # which tag gave the policy: p | sp | np ("" without record)
    from_domains: tuple[str, ...] = field(default_factory=tuple)


def _default_sample(pct: int) -> bool:
    return pct >= 100 or random.randrange(100) < pct


@dataclass(frozen=True, slots=True)
class Options:
    org: OrgDomains
    sample: SampleFn = _default_sample
    honour_pct: bool = True
    multiple_domains: str = "strictest"  # strictest | fail


def _alignment(rec: DmarcRecord, from_domain: str, spf: SpfAuth | None,
               dkim: Sequence[DkimAuth], org: OrgDomains) -> tuple[bool, str]:
    """(spf aligned, the aligned DKIM d= or "")."""
    spf_ok = spf is not None and spf.result == "pass" and \
        aligned(spf.domain, from_domain, rec.aspf, org)
    for sig in dkim:
        if sig.result == "pass" and aligned(sig.domain, from_domain, rec.adkim, org):
            return spf_ok, normalize_domain(sig.domain) or sig.domain
    return spf_ok, ""


def _base_policy(rec: DmarcRecord, rec_domain: str, from_domain: str) -> tuple[str, str]:
    """(policy, tag) without the RFC 9091 existence test."""
    if rec_domain == from_domain:
        return rec.p, "p"
    return (rec.sp, "sp") if rec.sp is not None else (rec.p, "p")


async def _policy_for(resolver: Resolver, rec: DmarcRecord, rec_domain: str,
                      from_domain: str) -> tuple[str, str]:
    """(policy, tag) for a failing message; raises DnsTempError (np= lookup)."""
    policy, tag = _base_policy(rec, rec_domain, from_domain)
    if rec_domain != from_domain and rec.np is not None and rec.np != policy \
            and not await domain_exists(resolver, from_domain):
        return rec.np, "np"
    return policy, tag


def _dispose(policy: str, pct: int, opts: Options) -> tuple[str, bool]:
    """(disposition, sampled out) for a failing message (§6.6.4)."""
    if policy == "none" or not opts.honour_pct or opts.sample(pct):
        return policy, False
    return _WEAKER[policy], True


async def _fail(resolver: Resolver, base: DmarcResult, rec: DmarcRecord,
                opts: Options) -> DmarcResult:
    try:
        policy, tag = await _policy_for(resolver, rec, base.record_domain, base.from_domain)
    except DnsTempError as exc:
        return replace(base, result="temperror", reason=f"DNS (np= existence check): {exc}")
    disposition, out = _dispose(policy, rec.pct, opts)
    why = "neither SPF nor DKIM aligned"
    if tag == "np":
        why += "; From domain does not exist: np= applies"
    if out:
        why += f"; outside pct={rec.pct} sample"
    return replace(base, result="fail", policy=policy, policy_tag=tag,
                   disposition=disposition, sampled_out=out, reason=why)


async def evaluate_domain(resolver: Resolver, from_domain: str, spf: SpfAuth | None,
                          dkim: Sequence[DkimAuth], opts: Options) -> DmarcResult:
    """DMARC for one author domain (already normalized)."""
    org = opts.org.organizational(from_domain)
    found = await discover(resolver, from_domain, org)
    base = DmarcResult(found.result, from_domain=from_domain, org_domain=org,
                       record=found.record, record_domain=found.domain, reason=found.reason,
                       from_domains=(from_domain,))
    rec = found.record
    if rec is None:
        return base
    spf_ok, dkim_d = _alignment(rec, from_domain, spf, dkim, opts.org)
    where = "From domain" if found.domain == from_domain else "organizational domain"
    policy, tag = _base_policy(rec, found.domain, from_domain)
    base = replace(base, spf_aligned=spf_ok, dkim_aligned=bool(dkim_d), dkim_domain=dkim_d,
                   policy=policy, policy_tag=tag)
    if spf_ok or dkim_d:
        how = "+".join(n for n, ok in (("SPF", spf_ok), ("DKIM", bool(dkim_d))) if ok)
        return replace(base, result="pass", reason=f"{how} aligned; record of {where}")
    return await _fail(resolver, base, rec, opts)


def _strictness(r: DmarcResult) -> tuple[int, int, int]:
    return (_RESULT_RANK[r.result], _POLICY_RANK[r.disposition], _POLICY_RANK[r.policy])


def combine(results: Sequence[DmarcResult], mode: str = "strictest") -> DmarcResult:
    """One result for several From domains (§6.6.1)."""
    worst = max(results, key=_strictness)
    domains = tuple(r.from_domain for r in results)
    note = f"{len(domains)} From domains ({', '.join(domains)})"
    if mode == "fail" and len(results) > 1 and worst.result != "fail":
        policy = max((r.policy for r in results if r.record), key=_POLICY_RANK.__getitem__,
                     default="none")
        return replace(worst, result="fail", policy=policy, disposition=policy,
                       from_domains=domains, reason=f"{note}: treated as fail")
    if len(results) == 1:
        return worst
    return replace(worst, from_domains=domains, reason=f"{worst.reason}; {note}")


async def evaluate(resolver: Resolver, from_values: Sequence[str], spf: SpfAuth | None,
                   dkim: Sequence[DkimAuth], *, org: OrgDomains | None = None,
                   sample: SampleFn | None = None, honour_pct: bool = True,
                   multiple_domains: str = "strictest") -> DmarcResult:
    """DMARC for a message: its From header values, SPF and DKIM results."""
    opts = Options(org or default_org_domains(), sample or _default_sample, honour_pct,
                   multiple_domains)
    found = from_domains(from_values)
    if not found.domains:
        why = "no From header" if not found.fields else "no usable domain in From"
        return DmarcResult("permerror", reason=why)
    results = await asyncio.gather(
        *(evaluate_domain(resolver, d, spf, dkim, opts) for d in found.domains))
    out = combine(results, multiple_domains)
    if found.fields > 1:
        out = replace(out, reason=f"{out.reason}; {found.fields} From fields")
    return out


__all__ = ["POLICIES", "RESULTS", "DkimAuth", "DmarcRecord", "DmarcResult", "FromDomains",
           "OrgDomains", "RecordError", "RecordIgnored", "SpfAuth", "aligned", "combine",
           "default_org_domains", "discover", "evaluate", "evaluate_domain", "from_domains",
           "is_dmarc_record", "normalize_domain", "parse_record", "split_tags"]
