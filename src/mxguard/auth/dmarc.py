"""DMARC (RFC 9989; RFC 7489 with RFC 9091's ``np=`` on request): policy
discovery and evaluation.

``rfc="9989"`` (the default, ``[dmarc] rfc``): policy discovery and the
organizational domain come from the DNS tree walk (§4.10, at most 8 queries
per walk: the name itself, then from at most 7 labels up to the top-level
label), ``psd=`` marks public suffix domains (§4.10.2), ``np=`` applies to
From domains that do not exist (NXDOMAIN; a name with any record, NODATA,
exists), ``t=y`` applies reject as quarantine and quarantine as none, and the
removed tags ``pct``, ``rf`` and ``ri`` are ignored like unknown tags (§4.7).
``rfc="7489"`` keeps the old behaviour where the two differ (the Public
Suffix List, ``pct=`` sampling, RFC 9091's A/AAAA/MX existence test); the
choices below describe that mode unless they say otherwise.

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
RFCS = ("9989", "7489")
REMOVED_TAGS = ("pct", "rf", "ri")  # RFC 9989 Appendix: removed from RFC 7489
MAX_WALK = 8  # RFC 9989 §4.10: queries of one tree walk
_SHORTCUT = 7  # labels the walk jumps to from a longer name


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
    psd: str = "u"  # RFC 9989 §4.7: y | n | u (7489 mode: always u)
    t: bool = False  # RFC 9989 §4.7 test mode (7489 mode: always False)
    removed: tuple[str, ...] = ()  # tags RFC 9989 removed that the record still has


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


def _policies(tags: dict[str, str], rfc: str) -> tuple[str, str | None, bool]:
    """(p, sp, implied) per RFC 7489 §6.6.3 step 6 / RFC 9989 §4.7 and §4.10.1;
    raises :class:`RecordIgnored`. RFC 9989: a record without p= reads as p=none;
    an invalid np= counts like an invalid sp=."""
    p, sp = _policy(tags.get("p")), _policy(tags.get("sp"))
    bad = [n for n in ("sp", "np") if n in tags and _policy(tags[n]) is None] \
        if rfc == "9989" else (["sp"] if "sp" in tags and sp is None else [])
    if rfc == "9989" and "p" not in tags and not bad:
        return "none", sp, True
    if p is not None and not bad:
        return p, sp, False
    if _uris(tags.get("rua")):
        return "none", None, True
    what = f"invalid {bad[0]}=" if p is not None else "no valid p="
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


def _yn(tags: dict[str, str], name: str, allowed: str, default: str,
        warnings: list[str]) -> str:
    value = tags.get(name)
    if value is None:
        return default
    if len(value) == 1 and value.lower() in allowed:
        return value.lower()
    warnings.append(f"invalid {name}={value[:20]}")
    return default


def parse_record(text: str, rfc: str = "9989") -> DmarcRecord:
    """Parse one TXT record; raises :class:`RecordError` / :class:`RecordIgnored`.

    RFC 9989 (§4.7): ``pct``, ``rf`` and ``ri`` are not DMARC tags any more and
    are ignored (named in ``removed``, defaults kept); ``psd`` and ``t`` are
    read. RFC 7489: those two are unknown tags, ignored."""
    if not is_dmarc_record(text):
        raise RecordError("not a v=DMARC1 record")
    tags = split_tags(text)
    p, sp, implied = _policies(tags, rfc)
    warnings: list[str] = []
    np = _policy(tags.get("np"))
    if "np" in tags and np is None:
        warnings.append(f"invalid np={tags['np'][:20]}")
    common: dict[str, Any] = dict(
        p=p, sp=sp, np=np, adkim=_mode_tag(tags, "adkim", warnings),
        aspf=_mode_tag(tags, "aspf", warnings), rua=_uris(tags.get("rua")),
        ruf=_uris(tags.get("ruf")), fo=tags.get("fo", "0"), raw=text, p_implied=implied)
    if rfc == "9989":
        psd = _yn(tags, "psd", "ynu", "u", warnings)
        t = _yn(tags, "t", "yn", "n", warnings) == "y"
        removed = tuple(n for n in REMOVED_TAGS if n in tags)
        return DmarcRecord(**common, psd=psd, t=t, removed=removed, warnings=tuple(warnings))
    return DmarcRecord(
        **common, pct=_int_tag(tags, "pct", 100, 100, warnings),
        rf=tags.get("rf", "afrf"), ri=_int_tag(tags, "ri", 86400, 2**31 - 1, warnings),
        warnings=tuple(warnings))


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


class _NoOrg(OrgDomains):
    """RFC 9989 mode needs no list: an OrgDomains that loads none."""

    def __init__(self) -> None:  # the list is never read
        pass

    def registrable(self, domain: str) -> str | None:
        raise RuntimeError("RFC 9989 mode uses the DNS tree walk, not the PSL")


_NO_ORG = _NoOrg()


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


def _parsed(texts: list[str], domain: str, rfc: str = "7489") -> Discovery:
    if len(texts) > 1:
        return Discovery(None, domain, "none", f"{len(texts)} DMARC records at _dmarc.{domain}")
    try:
        return Discovery(parse_record(texts[0], rfc), domain)
    except RecordIgnored as exc:
        return Discovery(None, domain, "none", f"record at _dmarc.{domain} ignored: {exc}")
    except RecordError as exc:
        return Discovery(None, domain, "permerror", f"malformed record at _dmarc.{domain}: {exc}")


async def discover(resolver: Resolver, from_domain: str, org_domain: str) -> Discovery:
    """RFC 7489 policy discovery (§6.6.3): the From domain, then its organizational
    domain (from the PSL)."""
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


async def domain_exists(resolver: Resolver, domain: str, rfc: str = "7489") -> bool:
    """RFC 7489 mode, RFC 9091 §2.1: a name with A, AAAA or MX records
    (NXDOMAIN/NODATA: no). RFC 9989 mode: only NXDOMAIN means the name does not
    exist -- a name with any record (NODATA for A) exists."""
    if rfc == "9989":
        return (await resolver.query(domain, "A")).rcode != "NXDOMAIN"
    answers = await asyncio.gather(*(resolver.query(domain, t) for t in ("A", "AAAA", "MX")))
    return any(a.records for a in answers)


# ------------------------------------------------------------------ RFC 9989 tree walk


def walk_names(domain: str) -> list[str]:
    """The names one DNS tree walk asks (RFC 9989 §4.10), longest first: the
    name itself; then, from a name of 8 or more labels, straight to its last 7
    labels; then one label less each step down to the top-level label. At most
    :data:`MAX_WALK` names."""
    labels = domain.split(".")
    names = [domain]
    n = _SHORTCUT if len(labels) >= MAX_WALK else len(labels) - 1
    names += [".".join(labels[-k:]) for k in range(n, 0, -1)]
    return names


class TreeWalk:
    """The ``_dmarc`` TXT answers of one evaluation: each name asked once, shared
    by policy discovery and every organizational-domain walk (§4.10)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._texts: dict[str, list[str]] = {}
        self._orgs: dict[str, str] = {}
        self._psd: dict[str, str] = {}

    async def texts(self, name: str) -> list[str]:
        """DMARC records at ``_dmarc.name``; raises DnsTempError."""
        if name not in self._texts:
            self._texts[name] = await _lookup(self.resolver, name)
        return self._texts[name]

    async def record(self, name: str) -> DmarcRecord | None:
        """The one valid record at ``_dmarc.name``, or None."""
        texts = await self.texts(name)
        if len(texts) != 1:
            return None
        try:
            return parse_record(texts[0], "9989")
        except (RecordError, RecordIgnored):
            return None

    async def discover(self, from_domain: str) -> Discovery:
        """Policy discovery (§4.10.1): the record of the From domain, else of its
        organizational domain (§4.10.2), else of its public suffix domain (the
        psd=y record the walk met)."""
        try:
            texts = await self.texts(from_domain)
            if texts:
                return _parsed(texts, from_domain, "9989")
            org = await self.org(from_domain)
            if org != from_domain:
                texts = await self.texts(org)
                if texts:
                    return _parsed(texts, org, "9989")
            psd = self._psd.get(from_domain)
            if psd:
                return _parsed(await self.texts(psd), psd, "9989")
        except DnsTempError as exc:
            return Discovery(None, "", "temperror", f"DNS: {exc}")
        return Discovery(None, "", "none", "no DMARC record")

    def psd(self, domain: str) -> str:
        """The public suffix domain (psd=y) the walk for ``domain`` met, or ""."""
        return self._psd.get(domain, "")

    async def org(self, domain: str) -> str:
        """The organizational domain (§4.10.2); raises DnsTempError. Walking up:
        a record with psd=n makes its name the organizational domain; psd=y
        (not at the name the walk started from) makes it the name one label
        below; else the record of the fewest labels; no record: the name."""
        if domain in self._orgs:
            return self._orgs[domain]
        labels = domain.split(".")
        found = domain
        for i, name in enumerate(walk_names(domain)):
            rec = await self.record(name)
            if rec is None:
                continue
            if rec.psd == "n":
                found = name
                break
            if rec.psd == "y" and i > 0:
                found = ".".join(labels[-(name.count(".") + 2):])
                self._psd[domain] = name
                break
            found = name
        self._orgs[domain] = found
        return found

    async def aligned(self, auth_domain: str, from_domain: str, mode: str) -> bool:
        """Identifier alignment (§4.4) on tree-walk organizational domains;
        raises DnsTempError."""
        auth = normalize_domain(auth_domain)
        if auth is None:
            return False
        if auth == from_domain:
            return True
        if mode == "s" or auth.rpartition(".")[2] != from_domain.rpartition(".")[2]:
            return False  # strict, or not even the top-level label in common
        return await self.org(auth) == await self.org(from_domain)


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
    sampled_out: bool = False  # failed but outside pct= (RFC 7489 mode)
    reason: str = ""
    policy_tag: str = ""  # which tag gave the policy: p | sp | np ("" without record)
    from_domains: tuple[str, ...] = field(default_factory=tuple)
    testing: bool = False  # RFC 9989 t=y: the disposition was weakened one step
    rfc: str = "9989"  # the rules it was evaluated under: 9989 | 7489


def _default_sample(pct: int) -> bool:
    return pct >= 100 or random.randrange(100) < pct


@dataclass(frozen=True, slots=True)
class Options:
    org: OrgDomains
    sample: SampleFn = _default_sample
    honour_pct: bool = True
    multiple_domains: str = "strictest"  # strictest | fail
    rfc: str = "9989"  # 9989 | 7489


def _alignment(rec: DmarcRecord, from_domain: str, spf: SpfAuth | None,
               dkim: Sequence[DkimAuth], org: OrgDomains) -> tuple[bool, str]:
    """(spf aligned, the aligned DKIM d= or "")."""
    spf_ok = spf is not None and spf.result == "pass" and \
        aligned(spf.domain, from_domain, rec.aspf, org)
    for sig in dkim:
        if sig.result == "pass" and aligned(sig.domain, from_domain, rec.adkim, org):
            return spf_ok, normalize_domain(sig.domain) or sig.domain
    return spf_ok, ""


def _base_policy(rec: DmarcRecord, rec_domain: str, from_domain: str,
                 policy_domain: str = "") -> tuple[str, str]:
    """(policy, tag) without the existence test. ``policy_domain``: the name the
    record speaks for, when not its own (RFC 9989: a PSD's record found for an
    organizational domain without one -- p= applies to that domain, sp= below)."""
    if from_domain in (rec_domain, policy_domain):
        return rec.p, "p"
    return (rec.sp, "sp") if rec.sp is not None else (rec.p, "p")


async def _policy_for(resolver: Resolver, rec: DmarcRecord, rec_domain: str,
                      from_domain: str, rfc: str, policy_domain: str) -> tuple[str, str]:
    """(policy, tag) for a failing message; raises DnsTempError (np= lookup)."""
    policy, tag = _base_policy(rec, rec_domain, from_domain, policy_domain)
    if rec_domain != from_domain and rec.np is not None and rec.np != policy \
            and not await domain_exists(resolver, from_domain, rfc):
        return rec.np, "np"
    return policy, tag


def _dispose(policy: str, rec: DmarcRecord, opts: Options) -> tuple[str, bool]:
    """(disposition, weakened) for a failing message: RFC 9989 §4.7 t=y applies
    reject as quarantine and quarantine as none; RFC 7489 §6.6.4 pct=
    sampling (a message outside the sample gets the next weaker policy)."""
    if opts.rfc == "9989":
        return (_WEAKER[policy], policy != "none") if rec.t else (policy, False)
    if policy == "none" or not opts.honour_pct or opts.sample(rec.pct):
        return policy, False
    return _WEAKER[policy], True


async def _fail(resolver: Resolver, base: DmarcResult, rec: DmarcRecord,
                opts: Options) -> DmarcResult:
    try:
        policy, tag = await _policy_for(resolver, rec, base.record_domain, base.from_domain,
                                        opts.rfc, _speaks_for(base))
    except DnsTempError as exc:
        return replace(base, result="temperror", reason=f"DNS (np= existence check): {exc}")
    disposition, weaker = _dispose(policy, rec, opts)
    why = "neither SPF nor DKIM aligned"
    if tag == "np":
        why += "; From domain does not exist: np= applies"
    if weaker and opts.rfc == "9989":
        why += f"; t=y: {policy} applied as {disposition}"
    elif weaker:
        why += f"; outside pct={rec.pct} sample"
    return replace(base, result="fail", policy=policy, policy_tag=tag,
                   disposition=disposition, sampled_out=weaker and opts.rfc == "7489",
                   testing=rec.t, reason=why)


async def _alignment_walk(walk: TreeWalk, rec: DmarcRecord, from_domain: str,
                          spf: SpfAuth | None,
                          dkim: Sequence[DkimAuth]) -> tuple[bool, str, str]:
    """(spf aligned, the aligned DKIM d= or "", DNS error text) by the tree walk.
    A DNS failure on one identifier does not hide another one that aligns."""
    error = ""

    async def ok(domain: str, mode: str) -> bool:
        nonlocal error
        try:
            return await walk.aligned(domain, from_domain, mode)
        except DnsTempError as exc:
            error = str(exc)
            return False

    spf_ok = spf is not None and spf.result == "pass" and await ok(spf.domain, rec.aspf)
    for sig in dkim:
        if sig.result == "pass" and await ok(sig.domain, rec.adkim):
            return spf_ok, normalize_domain(sig.domain) or sig.domain, ""
    return spf_ok, "", "" if spf_ok else error


async def _found_9989(walk: TreeWalk, from_domain: str) -> tuple[Discovery, str]:
    found = await walk.discover(from_domain)
    try:
        org = await walk.org(from_domain)
    except DnsTempError as exc:
        if found.record is None:
            return found, ""
        return Discovery(None, "", "temperror", f"DNS (organizational domain): {exc}"), ""
    return found, org


async def evaluate_domain(resolver: Resolver, from_domain: str, spf: SpfAuth | None,
                          dkim: Sequence[DkimAuth], opts: Options,
                          walk: TreeWalk | None = None) -> DmarcResult:
    """DMARC for one author domain (already normalized)."""
    if opts.rfc == "9989":
        walk = walk or TreeWalk(resolver)
        found, org = await _found_9989(walk, from_domain)
    else:
        org = opts.org.organizational(from_domain)
        found = await discover(resolver, from_domain, org)
    base = DmarcResult(found.result, from_domain=from_domain, org_domain=org,
                       record=found.record, record_domain=found.domain, reason=found.reason,
                       from_domains=(from_domain,), rfc=opts.rfc)
    rec = found.record
    if rec is None:
        return base
    if walk is not None:
        spf_ok, dkim_d, error = await _alignment_walk(walk, rec, from_domain, spf, dkim)
        if error and not (spf_ok or dkim_d):
            return replace(base, result="temperror", reason=f"DNS (alignment): {error}")
    else:
        spf_ok, dkim_d = _alignment(rec, from_domain, spf, dkim, opts.org)
    where = "From domain" if found.domain == from_domain else "organizational domain"
    policy, tag = _base_policy(rec, found.domain, from_domain, _speaks_for(base))
    base = replace(base, spf_aligned=spf_ok, dkim_aligned=bool(dkim_d), dkim_domain=dkim_d,
                   policy=policy, policy_tag=tag)
    if spf_ok or dkim_d:
        how = "+".join(n for n, ok in (("SPF", spf_ok), ("DKIM", bool(dkim_d))) if ok)
        return replace(base, result="pass", reason=f"{how} aligned; record of {where}")
    return await _fail(resolver, base, rec, opts)


def _speaks_for(res: DmarcResult) -> str:
    """The organizational domain a PSD's record stands in for (RFC 9989), or ""."""
    rec = res.record
    if res.rfc == "9989" and rec is not None and rec.psd == "y" \
            and res.record_domain not in (res.from_domain, res.org_domain):
        return res.org_domain
    return ""


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
                   multiple_domains: str = "strictest", rfc: str = "9989") -> DmarcResult:
    """DMARC for a message: its From header values, SPF and DKIM results.
    ``rfc``: "9989" (tree walk; ``org``, ``sample`` and ``honour_pct`` unused)
    or "7489" (Public Suffix List ``org``, pct= sampling)."""
    if rfc not in RFCS:
        raise ValueError(f"rfc must be one of {', '.join(RFCS)}, not {rfc!r}")
    if rfc == "7489":
        org = org or default_org_domains()
    opts = Options(org or _NO_ORG, sample or _default_sample, honour_pct, multiple_domains, rfc)
    found = from_domains(from_values)
    if not found.domains:
        why = "no From header" if not found.fields else "no usable domain in From"
        return DmarcResult("permerror", reason=why, rfc=rfc)
    walk = TreeWalk(resolver) if rfc == "9989" else None
    results = await asyncio.gather(
        *(evaluate_domain(resolver, d, spf, dkim, opts, walk) for d in found.domains))
    out = combine(results, multiple_domains)
    if found.fields > 1:
        out = replace(out, reason=f"{out.reason}; {found.fields} From fields")
    return out


__all__ = ["MAX_WALK", "POLICIES", "REMOVED_TAGS", "RESULTS", "RFCS", "DkimAuth", "DmarcRecord",
           "DmarcResult", "FromDomains", "OrgDomains", "RecordError", "RecordIgnored", "SpfAuth",
           "TreeWalk", "aligned", "combine", "default_org_domains", "discover", "evaluate",
           "evaluate_domain", "from_domains", "is_dmarc_record", "normalize_domain",
           "parse_record", "split_tags", "walk_names"]
