"""DMARC aggregate reports we *receive*: sans-I/O parsing, bounded.

Reports arrive from strangers, so every step is bounded and nothing reaches
outside the bytes handed in:

* :func:`decompress` turns one attachment (gzip, zip or plain XML, found by
  its magic bytes, not its name) into XML documents, stopping at
  ``Limits.max_xml_bytes`` of *output* whatever the archive claims (gzip and
  zip bombs), at most ``Limits.max_members`` XML members per zip;
* :func:`parse_report` reads one XML document with expat: a DTD
  (``<!DOCTYPE``, hence any entity declaration) is refused outright, external
  entities are never fetched, the nesting depth, the element count and the
  number of ``<record>`` elements are capped;
* :func:`report_attachments` finds the report parts of a mail message
  (``application/gzip``, ``application/zip``, ``text/xml`` and their
  ``x-``/alias types, or ``.xml``, ``.xml.gz``, ``.gz``, ``.zip`` names) and
  :func:`reports_from_bytes` accepts either a message or a bare XML / gzip /
  zip file.

Both formats are read: RFC 9990 (namespace ``urn:ietf:params:xml:ns:dmarc-2.0``,
§3 and appendix A: ``np``, ``testing``, ``discovery_method``, ``generator``,
no ``pct``) and the older RFC 7489 appendix C one that most reporters still
send (``pct``, no namespace). Unknown elements (extensions, RFC 9990 §3.1.1)
are ignored. :func:`summarize` groups stored reports per sending source.
"""

from __future__ import annotations

import datetime as dt
import email.message
import email.parser
import email.policy
import io
import ipaddress
import json
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any
from xml.parsers import expat

NS_RFC9990 = "urn:ietf:params:xml:ns:dmarc-2.0"
RFC9990 = "rfc9990"
RFC7489 = "rfc7489"

REPORT_TYPES = frozenset({
    "application/gzip", "application/x-gzip", "application/gzip-compressed",
    "application/zip", "application/x-zip-compressed", "application/x-zip",
    "text/xml", "application/xml",
})
REPORT_NAME = re.compile(r"\.(xml|xml\.gz|gz|zip)$", re.IGNORECASE)


class ReportError(ValueError):
    """A report (or attachment) that is refused; the text says why, in one line."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one received report may cost."""

    max_xml_bytes: int = 32 * 1024 * 1024  # one XML document, once decompressed
    max_records: int = 100_000
    max_depth: int = 16  # the formats nest 5 deep; extensions get some room
    max_members: int = 16  # XML files inside one zip
    max_message_bytes: int = 64 * 1024 * 1024  # one mail message


# ------------------------------------------------------------------ model


@dataclass(frozen=True, slots=True)
class ReportRecord:
    """One ``<record>``: ``count`` messages from one source with the same results."""

    source_ip: str
    count: int
    disposition: str = "none"  # none | pass (RFC 9990) | quarantine | reject
    dkim: str = ""  # policy_evaluated: the DKIM *aligned* result, pass | fail
    spf: str = ""  # policy_evaluated: the SPF *aligned* result, pass | fail
    reasons: tuple[tuple[str, str], ...] = ()  # (type, comment) policy overrides
    header_from: str = ""
    envelope_from: str = ""
    envelope_to: str = ""
    dkim_results: tuple[tuple[str, str, str], ...] = ()  # (domain, selector, result)
    spf_results: tuple[tuple[str, str, str], ...] = ()  # (domain, scope, result)

    @property
    def dmarc_pass(self) -> bool:
        """DMARC passes when either aligned identifier passed (RFC 9989 §4.4)."""
        return self.dkim == "pass" or self.spf == "pass"


@dataclass(frozen=True, slots=True)
class AggregateReport:
    """One aggregate report as its reporter sent it."""

    format: str  # RFC9990 | RFC7489
    org_name: str
    email: str
    report_id: str
    begin: int  # UNIX seconds, UTC
    end: int
    domain: str  # policy_published/domain
    p: str = ""
    sp: str = ""
    np: str = ""
    adkim: str = ""
    aspf: str = ""
    pct: str = ""  # RFC 7489 only
    fo: str = ""
    testing: str = ""  # RFC 9990 only (t=)
    discovery_method: str = ""  # RFC 9990 only: psl | treewalk
    generator: str = ""
    extra_contact_info: str = ""
    errors: tuple[str, ...] = ()
    records: tuple[ReportRecord, ...] = ()

    @property
    def messages(self) -> int:
        return sum(r.count for r in self.records)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> AggregateReport:
        raw = json.loads(text)
        records = tuple(
            ReportRecord(**{**r, "reasons": tuple(tuple(x) for x in r["reasons"]),
                            "dkim_results": tuple(tuple(x) for x in r["dkim_results"]),
                            "spf_results": tuple(tuple(x) for x in r["spf_results"])})
            for r in raw.pop("records"))
        return cls(**{**raw, "errors": tuple(raw["errors"]), "records": records})


# ------------------------------------------------------------------ XML


@dataclass(slots=True)
class _Node:
    tag: str
    text: list[str] = field(default_factory=list)
    children: list[_Node] = field(default_factory=list)

    def get(self, tag: str) -> _Node | None:
        for child in self.children:
            if child.tag == tag:
                return child
        return None

    def all(self, tag: str) -> Iterator[_Node]:
        return (c for c in self.children if c.tag == tag)

    def value(self, tag: str) -> str:
        child = self.get(tag)
        return "".join(child.text).strip() if child is not None else ""


def _local(name: str) -> str:
    """``urn:...dmarc-2.0 feedback`` (expat with a separator) or ``ns:feedback`` -> ``feedback``."""
    return name.rsplit(" ", 1)[-1].rsplit(":", 1)[-1]


_XML_DECL_ENC = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_EXPAT_ENCODINGS = {"utf-8", "utf8", "utf-16", "utf16", "us-ascii", "ascii", "iso-8859-1",
                    "latin-1", "latin1"}


def _tree(data: bytes, limits: Limits) -> tuple[_Node, str]:
    """The element tree of ``data`` and the root's namespace ("" for none)."""
    if len(data) > limits.max_xml_bytes:
        raise ReportError(f"XML of {len(data)} bytes refused (limit {limits.max_xml_bytes})")
    m = _XML_DECL_ENC.match(data[:200])
    forced: str | None = None
    if m is not None and m.group(1).decode().lower() not in _EXPAT_ENCODINGS:
        try:  # e.g. windows-1252, which expat does not know: decode here, feed UTF-8
            data = data.decode(m.group(1).decode()).encode("utf-8")
        except (LookupError, UnicodeDecodeError):
            raise ReportError(f"XML in unknown or invalid encoding "
                              f"{m.group(1).decode()[:40]!r}") from None
        forced = "utf-8"
    parser = expat.ParserCreate(encoding=forced, namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[_Node] = []
    root: list[_Node] = []
    namespace = [""]
    elements = [0]
    max_elements = limits.max_records * 64 + 1024

    def refuse_dtd(*_args: Any) -> None:
        raise ReportError("XML with a DTD (<!DOCTYPE>) refused: reports never need one")

    def refuse_entity(*_args: Any) -> None:
        raise ReportError("XML with an entity declaration refused")

    def refuse_external(*_args: Any) -> int:
        raise ReportError("XML with an external entity refused")

    def start(name: str, _attrs: Any) -> None:
        elements[0] += 1
        if elements[0] > max_elements:
            raise ReportError(f"XML with more than {max_elements} elements refused")
        if len(stack) >= limits.max_depth:
            raise ReportError(f"XML nested deeper than {limits.max_depth} elements refused")
        node = _Node(_local(name))
        if stack:
            stack[-1].children.append(node)
        else:
            root.append(node)
            namespace[0] = name.rsplit(" ", 1)[0] if " " in name else ""
        stack.append(node)

    def end(_name: str) -> None:
        stack.pop()

    def text(chars: str) -> None:
        if stack and not stack[-1].children:
            stack[-1].text.append(chars)

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_entity
    parser.UnparsedEntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_external
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise ReportError(f"not well-formed XML: {expat.ErrorString(exc.code)} "
                          f"(line {exc.lineno})") from None
    if not root:
        raise ReportError("no XML element")
    return root[0], namespace[0]


def _int(node: _Node, tag: str, what: str) -> int:
    text = node.value(tag)
    try:
        return int(text)
    except ValueError:
        raise ReportError(f"{what}: {tag} {text[:40]!r} is not a number") from None


def _domain(text: str) -> str:
    return text.strip().lower().rstrip(".")


def _record(node: _Node, n: int) -> ReportRecord:
    row = node.get("row")
    if row is None:
        raise ReportError(f"record {n}: no <row>")
    ip_text = row.value("source_ip")
    try:
        ip = str(ipaddress.ip_address(ip_text))
    except ValueError:
        raise ReportError(f"record {n}: source_ip {ip_text[:60]!r} is not an IP address") \
            from None
    count = _int(row, "count", f"record {n}")
    if count < 0:
        raise ReportError(f"record {n}: negative count {count}")
    pe = row.get("policy_evaluated") or _Node("policy_evaluated")
    reasons = tuple((r.value("type").lower(), r.value("comment")[:200])
                    for r in pe.all("reason"))
    ids = node.get("identifiers") or _Node("identifiers")
    auth = node.get("auth_results") or _Node("auth_results")
    dkim = tuple((_domain(d.value("domain")), d.value("selector"), d.value("result").lower())
                 for d in auth.all("dkim"))
    spf = tuple((_domain(s.value("domain")), s.value("scope").lower() or "mfrom",
                 s.value("result").lower()) for s in auth.all("spf"))
    return ReportRecord(
        source_ip=ip, count=count, disposition=pe.value("disposition").lower() or "none",
        dkim=pe.value("dkim").lower(), spf=pe.value("spf").lower(), reasons=reasons,
        header_from=_domain(ids.value("header_from")),
        envelope_from=_domain(ids.value("envelope_from")),
        envelope_to=_domain(ids.value("envelope_to")), dkim_results=dkim, spf_results=spf)


def parse_report(data: bytes, limits: Limits = Limits()) -> AggregateReport:
    """One aggregate report from its XML (RFC 9990 §3 / appendix A, or RFC 7489
    appendix C); ReportError when it is refused or is not one."""
    root, namespace = _tree(data, limits)
    if root.tag != "feedback":
        raise ReportError(f"not a DMARC aggregate report (root element <{root.tag[:40]}>)")
    meta = root.get("report_metadata")
    policy = root.get("policy_published")
    if meta is None or policy is None:
        raise ReportError("not a DMARC aggregate report (no report_metadata or "
                          "policy_published)")
    org, report_id = meta.value("org_name"), meta.value("report_id")
    if not org or not report_id:
        raise ReportError("report without org_name or report_id")
    dr = meta.get("date_range")
    if dr is None:
        raise ReportError(f"report {report_id[:60]!r}: no date_range")
    domain = _domain(policy.value("domain"))
    if not domain:
        raise ReportError(f"report {report_id[:60]!r}: no policy_published domain")
    nodes = list(root.all("record"))
    if len(nodes) > limits.max_records:
        raise ReportError(f"report with {len(nodes)} records refused "
                          f"(limit {limits.max_records})")
    return AggregateReport(
        format=RFC9990 if namespace == NS_RFC9990 else RFC7489,
        org_name=org[:200], email=meta.value("email")[:200], report_id=report_id[:200],
        begin=_int(dr, "begin", "date_range"), end=_int(dr, "end", "date_range"),
        domain=domain, p=policy.value("p").lower(), sp=policy.value("sp").lower(),
        np=policy.value("np").lower(), adkim=policy.value("adkim").lower(),
        aspf=policy.value("aspf").lower(), pct=policy.value("pct"), fo=policy.value("fo"),
        testing=policy.value("testing").lower(),
        discovery_method=policy.value("discovery_method").lower(),
        generator=meta.value("generator")[:200],
        extra_contact_info=meta.value("extra_contact_info")[:200],
        errors=tuple("".join(e.text).strip()[:200] for e in meta.all("error")),
        records=tuple(_record(node, i) for i, node in enumerate(nodes, 1)))


# ------------------------------------------------------------------ containers


def _gunzip(data: bytes, limits: Limits) -> bytes:
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limits.max_xml_bytes + 1)
    except zlib.error as exc:
        raise ReportError(f"broken gzip data: {exc}") from None
    if len(out) > limits.max_xml_bytes or d.unconsumed_tail:
        raise ReportError(f"gzip data expands beyond {limits.max_xml_bytes} bytes: refused")
    if not d.eof:
        raise ReportError("broken gzip data: truncated")
    return out


def _unzip(data: bytes, limits: Limits) -> list[bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ReportError(f"broken zip data: {exc}") from None
    xml = [i for i in infos if i.filename.lower().endswith(".xml")] or infos
    if len(xml) > limits.max_members:
        raise ReportError(f"zip with {len(xml)} members refused (limit {limits.max_members})")
    out: list[bytes] = []
    for info in xml:
        if info.file_size > limits.max_xml_bytes:
            raise ReportError(f"zip member {info.filename[:80]!r} of {info.file_size} bytes "
                              f"refused (limit {limits.max_xml_bytes})")
        try:
            with zf.open(info) as fh:  # the declared size may lie: count what comes out
                body = fh.read(limits.max_xml_bytes + 1)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError,
                RuntimeError, EOFError, zlib.error) as exc:
            raise ReportError(f"zip member {info.filename[:80]!r}: {exc}") from None
        if len(body) > limits.max_xml_bytes:
            raise ReportError(f"zip member {info.filename[:80]!r} expands beyond "
                              f"{limits.max_xml_bytes} bytes: refused")
        out.append(body)
    return out


def container(data: bytes) -> str:
    """``gzip``, ``zip``, ``xml`` or ``""`` by the first bytes of ``data``."""
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"PK\x03\x04":
        return "zip"
    head = data[:64].lstrip(b"\xef\xbb\xbf\xff\xfe\x00 \t\r\n")
    if head.startswith((b"<?xml", b"<feedback", b"<")) and not head.startswith(b"<!DOCTYPE"):
        return "xml"
    if head.startswith(b"<!DOCTYPE"):
        return "xml"  # parse_report refuses it with the reason
    return ""


def decompress(data: bytes, limits: Limits = Limits()) -> list[bytes]:
    """The XML documents of one attachment or file (gzip, zip or plain XML)."""
    kind = container(data)
    if kind == "gzip":
        return [_gunzip(data, limits)]
    if kind == "zip":
        return _unzip(data, limits)
    if kind == "xml":
        return [data]
    raise ReportError("neither XML, gzip nor zip data")


# ------------------------------------------------------------------ mail


@dataclass(frozen=True, slots=True)
class Found:
    """One report found (``report``) or refused (``error``), and where."""

    where: str
    report: AggregateReport | None = None
    error: str = ""


def _is_report_part(part: email.message.Message) -> bool:
    if part.is_multipart():
        return False
    name = part.get_filename() or part.get_param("name") or ""
    if isinstance(name, tuple):  # an RFC 2231 triple
        name = str(name[2])
    return part.get_content_type().lower() in REPORT_TYPES or \
        bool(REPORT_NAME.search(str(name)))


def report_attachments(message: bytes, limits: Limits = Limits()) -> list[tuple[str, bytes]]:
    """(name, decoded body) of each report-like part of a mail message; ``[]`` for a
    message without one. At most 64 parts are looked at."""
    if len(message) > limits.max_message_bytes:
        raise ReportError(f"message of {len(message)} bytes refused "
                          f"(limit {limits.max_message_bytes})")
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(message)
    out: list[tuple[str, bytes]] = []
    for n, part in enumerate(msg.walk()):
        if n > 64:
            break
        if not _is_report_part(part):
            continue
        body = part.get_payload(decode=True)
        if isinstance(body, bytes) and body.strip():
            out.append((str(part.get_filename() or part.get_content_type()), body))
    return out


def reports_from_bytes(data: bytes, where: str = "-",
                       limits: Limits = Limits()) -> list[Found]:
    """Every report in ``data``: a bare XML / gzip / zip file, or a mail message with
    report attachments. A message without one gives ``[]`` (not a report mail)."""
    if container(data):
        parts = [(where, data)]
    else:
        try:
            parts = [(f"{where}:{name}", body) for name, body in
                     report_attachments(data, limits)]
        except ReportError as exc:
            return [Found(where, error=str(exc))]
    found: list[Found] = []
    for name, body in parts:
        try:
            docs = decompress(body, limits)
        except ReportError as exc:
            found.append(Found(name, error=str(exc)))
            continue
        for doc in docs:
            try:
                found.append(Found(name, parse_report(doc, limits)))
            except ReportError as exc:
                found.append(Found(name, error=str(exc)))
    return found


# ------------------------------------------------------------------ summary


@dataclass(slots=True)
class SourceSummary:
    """What one sending source did with one of our domains, summed over reports."""

    source_ip: str
    name: str = ""  # the source's reverse DNS name, when looked up (summary --resolve)
    messages: int = 0
    dmarc_pass: int = 0
    dmarc_fail: int = 0
    dkim_aligned: int = 0
    spf_aligned: int = 0
    dispositions: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    header_from: Counter[str] = field(default_factory=Counter)
    reporters: set[str] = field(default_factory=set)

    def as_dict(self, top: int = 3) -> dict[str, Any]:
        return {"source_ip": self.source_ip, "name": self.name, "messages": self.messages,
                "dmarc_pass": self.dmarc_pass, "dmarc_fail": self.dmarc_fail,
                "dkim_aligned": self.dkim_aligned, "spf_aligned": self.spf_aligned,
                "dispositions": dict(sorted(self.dispositions.items())),
                "top_failures": [{"reason": r, "messages": n}
                                 for r, n in self.failures.most_common(top)],
                "header_from": sorted(self.header_from),
                "reporters": sorted(self.reporters)}


def failure_reasons(rec: ReportRecord) -> list[str]:
    """Why a record failed DMARC, in words: the raw DKIM / SPF results behind a
    failed alignment, and the reporter's override reasons (RFC 9990 §3 reason)."""
    out: list[str] = []
    if rec.dkim != "pass":
        if not rec.dkim_results:
            out.append("no DKIM signature")
        for domain, _sel, result in rec.dkim_results:
            if result == "pass" and domain and rec.header_from:
                out.append(f"DKIM pass for {domain} not aligned with {rec.header_from}")
            else:
                out.append(f"DKIM {result or 'none'} for {domain or '?'}")
    if rec.spf != "pass":
        if not rec.spf_results:
            out.append("no SPF result")
        for domain, _scope, result in rec.spf_results:
            if result == "pass" and domain and rec.header_from:
                out.append(f"SPF pass for {domain} not aligned with {rec.header_from}")
            else:
                out.append(f"SPF {result or 'none'} for {domain or '?'}")
    out.extend(f"override {kind}" for kind, _comment in rec.reasons if kind)
    return out


def summarize(reports: Iterable[AggregateReport], domain: str | None = None,
              since: dt.date | None = None) -> list[SourceSummary]:
    """Per source IP, most messages first: messages, DMARC pass/fail (either
    aligned identifier passing, RFC 9989 §4.4), aligned counts, dispositions and
    failure reasons. ``domain`` keeps reports of that policy domain (and its
    subdomains' header From); ``since`` keeps reports whose range ends on or after it."""
    want = _domain(domain) if domain else None
    start = dt.datetime.combine(since, dt.time(), dt.UTC).timestamp() if since else None
    by_ip: dict[str, SourceSummary] = {}
    for rep in reports:
        if want is not None and rep.domain != want:
            continue
        if start is not None and rep.end < start:
            continue
        for rec in rep.records:
            s = by_ip.get(rec.source_ip)
            if s is None:
                s = by_ip[rec.source_ip] = SourceSummary(rec.source_ip)
            s.messages += rec.count
            s.reporters.add(rep.org_name)
            if rec.header_from:
                s.header_from[rec.header_from] += rec.count
            s.dispositions[rec.disposition] += rec.count
            s.dkim_aligned += rec.count if rec.dkim == "pass" else 0
            s.spf_aligned += rec.count if rec.spf == "pass" else 0
            if rec.dmarc_pass:
                s.dmarc_pass += rec.count
            else:
                s.dmarc_fail += rec.count
                for reason in failure_reasons(rec):
                    s.failures[reason] += rec.count
    return sorted(by_ip.values(), key=lambda s: (-s.messages, s.source_ip))


__all__ = ["NS_RFC9990", "RFC7489", "RFC9990", "AggregateReport", "Found", "Limits",
           "ReportError", "ReportRecord", "SourceSummary", "container", "decompress",
           "failure_reasons", "parse_report", "report_attachments", "reports_from_bytes",
           "summarize"]
