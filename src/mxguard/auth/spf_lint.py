"""SPF record linting: what ``mxguard spf lint``, ``mxguard dns check`` and
``mxguard doctor`` report about a domain's SPF record.

:func:`lint_domain` fills a :class:`Lint` with one ``PASS`` / ``WARN`` /
``FAIL`` line per finding (each problem followed by its fix): the SPF
record(s) found, syntax errors term by term, the DNS-querying terms counted
through include: and redirect= (limit 10), the void lookups (limit 2), the
policy of the all term, and whether an address passes. It returns the record
to publish (:func:`suggestion`): the recommended policy :data:`RECOMMENDED`,
plus the address when the domain's MX hosts do not cover it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from mxguard import config
from mxguard.auth import spf as engine
from mxguard.auth.spf import PermError, Record, Token
from mxguard.dns import Answer, DnsTempError, Resolver

RECOMMENDED = "v=spf1 mx -all"  # the recommended policy: only the domain's MX hosts send
LINT_IP = "192.0.2.1"  # stands in for the client when a lint expands a macro
MAX_WALK_TERMS = 60  # the lint stops following include:/redirect= past this many terms


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass
class Lint:
    """Findings of one lint, printed as they come."""

    fails: int = 0
    warns: int = 0
    lines: list[str] = field(default_factory=list)

    def say(self, level: str, text: str, fix: str = "") -> None:
        if level == "FAIL":
            self.fails += 1
        elif level == "WARN":
            self.warns += 1
        self.lines.append(f"{level:5s} {printable(text)}")
        if fix:
            self.lines.append(f"      fix: {printable(fix)}")

    def note(self, text: str) -> None:
        self.lines.append(f"      {printable(text)}")


_FIXES = [
    ("unknown or malformed mechanism", "the mechanisms are all, include:, a, mx, ptr, ip4:, "
     "ip6:, exists:; modifiers are written name=value (redirect=, exp=)"),
    ("unknown term", "each term is [+-~?]mechanism or name=value"),
    ("CIDR", "prefix lengths are /0../32 (IPv4) and //0..//128 (IPv6), without leading zeros"),
    ("ip4 address", "write a dotted quad with an optional prefix: ip4:192.0.2.0/24"),
    ("ip6 address", "write an IPv6 address with an optional prefix: ip6:2001:db8::/32"),
    ("ip4 network", "write a dotted quad with an optional prefix: ip4:192.0.2.0/24"),
    ("ip6 network", "write an IPv6 address with an optional prefix: ip6:2001:db8::/32"),
    ("macro", "macros are %{letter[digits][r][delimiters]} with letters s l o d i p h v "
     "(c r t only in exp text); write %% for a literal %"),
    ("domain-spec", "a target needs two or more labels and a top label that is not all "
     "digits, e.g. include:_spf.example.com"),
    ("character", "records are printable ASCII; separate terms with single spaces"),
    ("more than once", "keep one redirect= and one exp="),
]


def fix_for(problem: str) -> str:
    for needle, fix in _FIXES:
        if needle in problem:
            return fix
    return "see RFC 7208 §4.6.1 and §5 for the term syntax"


def _terms(text: str) -> list[str]:
    return [t for t in text.split(" ")[1:] if t]


@dataclass
class _Walk:
    """The worst-case count: every DNS-querying term of the record and of every
    record it includes or redirects to (a client that matches nothing)."""

    resolver: Resolver
    lint: Lint
    ip: str
    root: str
    terms: list[str] = field(default_factory=list)  # "domain: term"
    voids: list[str] = field(default_factory=list)
    stopped: bool = False  # not every term was followed
    loop: str = ""  # "a -> b -> a" when include:/redirect= loop

    async def query(self, name: str, rdtype: str) -> Answer | None:
        try:
            return await self.resolver.query(name, rdtype)
        except DnsTempError as exc:
            self.lint.say("WARN", f"DNS error: {exc} (not counted)",
                          "check the name servers of that zone; receivers get temperror")
            return None

    def target(self, tokens: tuple[Token, ...] | None, domain: str) -> str:
        if tokens is None:
            return domain
        values = engine.macro_values(engine.client_ip(self.ip), f"postmaster@{self.root}",
                                     domain, self.root)
        return engine.truncate_domain(engine.expand(tokens, values))

    async def record(self, domain: str, via: str) -> Record | None:
        """The parsed SPF record of an include:/redirect= target; problems reported."""
        answer = await self.query(domain, "TXT")
        if answer is None:
            return None
        found = [t for t in answer.records if engine.is_spf_record(t)]
        if len(found) != 1:
            what = "no SPF record" if not found else f"{len(found)} SPF records"
            self.lint.say("FAIL", f"{via}: {domain} has {what}: every receiver gets permerror",
                          f"ask the owner of {domain} to publish one record, or remove {via}")
            return None
        try:
            return engine.parse_record(found[0])
        except PermError as exc:
            self.lint.say("FAIL", f"{via}: the record of {domain} is invalid: {exc}",
                          f"ask the owner of {domain} to fix it, or remove {via}")
            return None

    async def walk(self, domain: str, record: Record, stack: tuple[str, ...]) -> None:
        has_all = any(m.kind == "all" for m in record.mechanisms)
        for mech in record.mechanisms:
            if mech.kind in ("all", "ip4", "ip6"):
                continue
            if len(self.terms) >= MAX_WALK_TERMS:
                self.stopped = True
                return
            self.terms.append(f"{domain}: {mech.text}")
            target = self.target(mech.domain, domain)
            if mech.kind == "include":
                await self.follow(target, f"include:{target}", stack)
            elif mech.kind in ("a", "exists"):
                await self.count_void(target, "A", mech.text, domain)
            elif mech.kind == "mx":
                answer = await self.count_void(target, "MX", mech.text, domain)
                if answer is not None and len(answer.records) > engine.MAX_NAMES:
                    self.lint.say("FAIL", f"{domain}: {mech.text}: {target} has "
                                  f"{len(answer.records)} MX hosts (limit 10): permerror",
                                  "use ip4:/ip6: ranges for the outbound hosts instead of mx")
        if record.redirect is not None and not has_all:
            if len(self.terms) >= MAX_WALK_TERMS:
                self.stopped = True
                return
            target = self.target(record.redirect, domain)
            self.terms.append(f"{domain}: redirect={target}")
            await self.follow(target, f"redirect={target}", stack)

    async def follow(self, target: str, via: str, stack: tuple[str, ...]) -> None:
        if target.lower() in stack:
            self.loop = self.loop or " -> ".join((*stack, target.lower()))
            self.stopped = True
            return
        if not engine.queryable(target):
            self.lint.say("FAIL", f"{via}: {target!r} is no valid domain name", f"fix {via}")
            return
        record = await self.record(target, via)
        if record is not None:
            await self.walk(target, record, (*stack, target.lower()))

    async def count_void(self, target: str, rdtype: str, term: str,
                         domain: str) -> Answer | None:
        if not engine.queryable(target):
            return None
        answer = await self.query(target, rdtype)
        if answer is not None and not answer.records:
            self.voids.append(f"{domain}: {term} ({target} {rdtype}: {answer.rcode})")
        return answer


async def lint_domain(cfg: config.Config, domain: str, ip: str | None, lint: Lint) -> str:
    """Fill ``lint``; return the record to publish."""
    resolver = Resolver(cfg.dns)
    try:
        answer = await resolver.query(domain, "TXT")
    except DnsTempError as exc:
        lint.say("FAIL", f"DNS error: {exc}", "check [dns] nameservers and the domain's "
                 "name servers; receivers get temperror meanwhile")
        return await suggestion(resolver, domain, ip)
    if answer.rcode == "NXDOMAIN":
        lint.say("FAIL", f"{domain} does not exist in DNS (NXDOMAIN)",
                 "check the spelling, or create the zone")
        return await suggestion(resolver, domain, ip)
    records = [t for t in answer.records if engine.is_spf_record(t)]
    for txt in answer.records:
        if txt[:5].lower() == "v=spf" and not engine.is_spf_record(txt):
            lint.say("WARN", f"TXT record {txt[:60]!r} is no SPF record: receivers ignore it",
                     'start the record with exactly "v=spf1" and a space')
    if not records:
        lint.say("FAIL", f"no SPF record at {domain}: receivers get none",
                 "publish the record below")
    elif len(records) > 1:
        lint.say("FAIL", f"{len(records)} SPF records at {domain}: receivers get permerror",
                 "merge them into one record and delete the others")
        for text in records:
            lint.note(f"record: {text}")
    else:
        await lint_record(resolver, lint, domain, records[0], ip)
    if ip is not None:
        await lint_ip(resolver, cfg, lint, domain, ip)
    return await suggestion(resolver, domain, ip)


async def lint_record(resolver: Resolver, lint: Lint, domain: str, text: str,
                       ip: str | None) -> None:
    lint.say("PASS", f"one SPF record found: {text}")
    size = len(text.encode("utf-8", "surrogateescape"))
    if size > 450:
        lint.say("WARN", f"the record is {size} bytes: with the rest of the answer it may "
                 "pass 512 bytes and need DNS over TCP", "shorten it, e.g. with one include: "
                 "of a provider's record instead of long ip4: lists")
    if not text.isascii():
        lint.say("FAIL", "the record contains non-ASCII characters: permerror",
                 "use A-labels (xn--...) for international names; remove other 8-bit text")
        return
    good: list[str] = []
    for term in _terms(text):
        try:
            engine.parse_record("v=spf1 " + term)
        except PermError as exc:
            lint.say("FAIL", f"term {term!r}: {exc}: receivers give permerror",
                     fix_for(str(exc)))
            continue
        good.append(term)
        name, eq, _ = term.partition("=")
        if eq and ":" not in name and "/" not in name and name.lower() not in (
                "redirect", "exp"):
            lint.say("WARN", f"unknown modifier {name}=: receivers ignore it",
                     "a typo of redirect= or exp=? otherwise remove it")
    errors = len(_terms(text)) - len(good)
    try:
        record = engine.parse_record("v=spf1 " + " ".join(good))
        if not errors:
            record = engine.parse_record(text)
    except PermError as exc:
        lint.say("FAIL", f"{exc}: receivers give permerror", fix_for(str(exc)))
        return
    if errors:
        lint.note("(the checks below use the terms without errors)")
    else:
        lint.say("PASS", f"syntax: {len(good)} terms, no errors")
    lint_policy(lint, record)
    walk = _Walk(resolver, lint, ip or LINT_IP, domain)
    await walk.walk(domain, record, (domain.lower(),))
    count = len(walk.terms)
    shown = f"{count}{'+' if walk.stopped else ''} of {engine.MAX_DNS_TERMS}"
    if walk.loop:
        lint.say("FAIL", f"DNS-querying terms: no end: include/redirect loop {walk.loop}; "
                 "receivers count to the limit and give permerror",
                 f"remove the include:/redirect= that leads back to {walk.loop.split()[0]}")
    elif count > engine.MAX_DNS_TERMS:
        lint.say("FAIL", f"DNS-querying terms (through include/redirect): {shown}: a client "
                 "that matches none of the earlier terms gets permerror",
                 "replace include:s you do not need, and a/mx of fixed hosts, by ip4:/ip6: "
                 "ranges (RFC 7208 §4.6.4)")
    elif count >= engine.MAX_DNS_TERMS - 1:
        lint.say("WARN", f"DNS-querying terms (through include/redirect): {shown}: close to "
                 "the limit", "one more include at a provider makes it a permerror: "
                 "replace some terms by ip4:/ip6: ranges")
    else:
        lint.say("PASS", f"DNS-querying terms (through include/redirect): {shown}")
    for term in walk.terms:
        lint.note(term)
    voids = len(walk.voids)
    if voids > engine.MAX_VOID_LOOKUPS:
        lint.say("FAIL", f"void lookups: {voids} of {engine.MAX_VOID_LOOKUPS}: receivers give "
                 "permerror", "remove the terms whose names do not exist or have no records")
    elif voids:
        lint.say("WARN", f"void lookups: {voids} of {engine.MAX_VOID_LOOKUPS}",
                 "remove the terms whose names do not exist or have no records")
    else:
        lint.say("PASS", f"void lookups: 0 of {engine.MAX_VOID_LOOKUPS}")
    for void in walk.voids:
        lint.note(void)


def lint_policy(lint: Lint, record: Record) -> None:
    mechs = record.mechanisms
    alls = [i for i, m in enumerate(mechs) if m.kind == "all"]
    for mech in mechs:
        if mech.kind == "ptr":
            lint.say("WARN", f"{mech.text}: slow and unreliable, RFC 7208 §5.5 says not to use "
                     "it; many receivers skip it", "list the hosts with ip4:/ip6: or a:")
    if alls and alls[0] < len(mechs) - 1:
        later = " ".join(m.text for m in mechs[alls[0] + 1:])
        lint.say("WARN", f"terms after {mechs[alls[0]].text} are never used: {later}",
                 "move them before the all term")
    if alls and record.redirect is not None:
        lint.say("WARN", "redirect= is ignored when the record has an all term",
                 "remove one of them")
    if not alls:
        if record.redirect is None:
            lint.say("WARN", "no all term and no redirect=: mail from other hosts gets "
                     "neutral", 'end the record with "-all"')
        return
    result = mechs[alls[0]].result
    if result == "pass":
        lint.say("FAIL", f"{mechs[alls[0]].text}: every host on the internet passes",
                 'end the record with "-all" (or "~all" while testing)')
    elif result == "neutral":
        lint.say("WARN", f"{mechs[alls[0]].text}: mail from other hosts gets neutral",
                 'end the record with "-all" once all senders are listed')
    elif result == "softfail":
        lint.say("WARN", f"{mechs[alls[0]].text}: mail from other hosts only softfails "
                 "(most receivers accept it)", 'switch to "-all" once all senders are listed')
    else:
        lint.say("PASS", f"{mechs[alls[0]].text}: mail from other hosts fails SPF")


async def lint_ip(resolver: Resolver, cfg: config.Config, lint: Lint, domain: str,
                   ip: str) -> None:
    res = await engine.check_host(resolver, ip, domain, f"postmaster@{domain}", domain,
                                  timeout=cfg.spf.timeout)
    if res.result == "pass":
        lint.say("PASS", f"{ip} passes (mechanism {res.mechanism})")
        return
    why = f" ({res.problem})" if res.problem else (
        f" (mechanism {res.mechanism})" if res.mechanism else "")
    term = f"ip{engine.client_ip(ip).version}:{ip}"
    lint.say("FAIL", f"{ip} gets {res.result}{why}",
             f"add {term} before the all term" if res.result in ("fail", "softfail",
                                                                  "neutral", "none")
             else "fix the problems above first")


async def suggestion(resolver: Resolver, domain: str, ip: str | None) -> str:
    """The recommended record, plus the --ip address when the MX hosts do not cover it."""
    if ip is None:
        return RECOMMENDED
    addr = engine.client_ip(ip)
    covered = False
    try:
        mx = await resolver.query(domain, "MX")
        hosts = [h for _, h in sorted(mx.records)[:engine.MAX_NAMES] if engine.queryable(h)]
        rdtype = "A" if addr.version == 4 else "AAAA"
        for host in hosts:
            for a in (await resolver.query(host, rdtype)).records:
                covered = covered or ipaddress.ip_address(a) == addr
    except (DnsTempError, ValueError):
        covered = False
    return RECOMMENDED if covered else f"v=spf1 mx ip{addr.version}:{addr} -all"


__all__ = ["LINT_IP", "MAX_WALK_TERMS", "RECOMMENDED", "Lint", "fix_for", "lint_domain",
           "lint_ip", "lint_policy", "lint_record", "printable", "suggestion"]
