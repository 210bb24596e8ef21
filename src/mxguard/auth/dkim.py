"""DKIM verification (RFC 6376, RFC 8301, RFC 8463), and the package's API.

Sans-I/O except key lookups, which go through the one async Resolver.
Signing lives in :mod:`mxguard.auth.dkim_sign`, keys in
:mod:`mxguard.auth.dkim_keys`, canonicalization in
:mod:`mxguard.auth.dkim_canon`; the names callers need are re-exported here.

Input is the header as received, ``[(name, value), ...]`` in message order
(value = everything after the colon, folding included; ``str`` values are
taken as UTF-8 with surrogate escapes, like the milter codec gives them), and
the body as bytes, an iterable of chunks or a binary file object (CRLF line
endings). Bodies are hashed chunk by chunk; :class:`Verifier` and
:class:`Signer` also take chunks as they arrive (``feed``).

Verification gives one :class:`DkimResult` per DKIM-Signature, top first, at
most ``max_signatures``: ``pass``, ``fail`` (body hash or signature mismatch),
``policy`` (valid, but ``l=`` leaves part of the body unsigned), ``temperror``
(DNS) or ``permerror`` (malformed signature or key, rsa-sha1 or short keys
refused per RFC 8301, expired, revoked ...), each with a reason. ``neutral``
is not produced today (RFC 8601 reserves it for "could not be processed";
we say permerror). Malformed input never raises.

Choices where RFC 6376 leaves room:

* several TXT records at the key name: each usable one is tried
  (§3.6.2.2 allows that), the signature passes if one key verifies;
* the ``g=`` key tag of RFC 4871 is ignored (RFC 6376 dropped it);
* ``t=`` more than :data:`CLOCK_DRIFT` seconds in the future, ``x=`` in the
  past or before ``t=``: permerror;
* RSA keys are accepted as SubjectPublicKeyInfo or bare RSAPublicKey.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from dataclasses import dataclass, replace
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from mxguard.auth.dkim_canon import (
    BodyHasher,
    BodyInput,
    Header,
    HeaderInput,
    TagListError,
    decode_base64,
    decode_qp,
    header_data,
    iter_body,
    normalize_headers,
    parse_message,
    parse_tag_list,
    split_canonicalization,
)
from mxguard.auth.dkim_keys import (
    DOMAIN_RE,
    DkimKeyError,
    KeyRecord,
    KeyRecordError,
    KeyTable,
    SigningKey,
    check_key_permissions,
    load_private_key,
    parse_key_record,
    public_key_record,
    read_private_key,
)
from mxguard.auth.dkim_sign import DEFAULT_SIGN_HEADERS, Signer, SignOptions, sign
from mxguard.dns import Answer, DnsTempError

__all__ = [
    "DEFAULT_SIGN_HEADERS", "DkimKeyError", "DkimResult", "Header", "KeyRecord", "KeyTable",
    "SignOptions", "Signer", "SigningKey", "Verifier", "check_key_permissions",
    "load_private_key", "parse_message", "public_key_record", "read_private_key", "sign",
    "verify",
]

PASS, FAIL, NEUTRAL, POLICY = "pass", "fail", "neutral", "policy"
TEMPERROR, PERMERROR = "temperror", "permerror"
ALGORITHMS = {"rsa-sha256": ("rsa", "sha256"), "ed25519-sha256": ("ed25519", "sha256")}
HISTORIC_ALGORITHMS = {**ALGORITHMS, "rsa-sha1": ("rsa", "sha1")}
HISTORIC_VERSIONS = ("1", "0.5", None)  # draft-ietf-dkim-base-00..05: v= absent or 0.5
CLOCK_DRIFT = 300
MAX_KEY_RECORDS = 4
MAX_NAME = 253
SIG_NAME = b"dkim-signature"
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_DIGITS = re.compile(r"[0-9]{1,20}\Z")


class TxtResolver(Protocol):
    """What the verifier needs of :class:`mxguard.dns.Resolver`."""

    async def query(self, name: str, rdtype: str) -> Answer: ...


@dataclass(frozen=True)
class DkimResult:
    """The outcome for one DKIM-Signature header field."""

    result: str          # pass | fail | neutral | policy | temperror | permerror
    reason: str = ""     # empty for a clean pass
    domain: str = ""     # d=
    selector: str = ""   # s=
    identity: str = ""   # i= (default "@" + d=)
    algorithm: str = ""  # a=
    header_b: str = ""   # shortest unique prefix of b= (>= 8 chars), for header.b
    key_bits: int = 0
    testing: bool = False  # key record t=y


class _Problem(Exception):
    """Why a signature cannot pass; ``tags`` are what it said (for the result)."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result, self.reason = result, reason
        self.tags: dict[str, str] = {}


# ----------------------------------------------------------- signatures


@dataclass
class Signature:
    """A parsed, syntactically valid DKIM-Signature."""

    index: int
    name: bytes
    raw_value: bytes
    algorithm: str
    key_type: str
    hash_name: str
    b: bytes
    bh: bytes
    b_text: str
    domain: str
    selector: str
    identity: str
    header_canon: str
    body_canon: str
    signed_headers: list[str]
    length: int | None
    timestamp: int | None
    expires: int | None

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def body_key(self) -> tuple[str, str, int | None]:
        return (self.body_canon, self.hash_name, self.length)

    def result(self, result: str, reason: str = "", key: KeyRecord | None = None,
               bits: int = 0) -> DkimResult:
        return DkimResult(result, reason, self.domain, self.selector, self.identity,
                          self.algorithm, self.b_text, key.bits if key else bits,
                          key.testing if key else False)


def _partial_result(tags: dict[str, str], result: str, reason: str) -> DkimResult:
    """A result for a signature that did not parse: report what it said."""
    d = tags.get("d", "")
    return DkimResult(result, reason, d.lower(), tags.get("s", ""), tags.get("i", ""),
                      tags.get("a", ""), re.sub(r"\s+", "", tags.get("b", "")))


def _need(tags: dict[str, str], name: str) -> str:
    if name not in tags:
        raise _Problem(PERMERROR, f"signature has no {name}= tag")
    return tags[name]


def _check_version_and_algorithm(tags: dict[str, str],
                                 historic: bool) -> tuple[str, tuple[str, str]]:
    version = tags.get("v")
    if not (historic and version in HISTORIC_VERSIONS):
        if version is None:
            raise _Problem(PERMERROR, "signature has no v= tag")
        if version != "1":
            raise _Problem(PERMERROR, f"unsupported signature version v={version}")
    algorithm = _need(tags, "a").lower()
    known = HISTORIC_ALGORITHMS if historic else ALGORITHMS
    if algorithm == "rsa-sha1" and not historic:
        raise _Problem(PERMERROR, "rsa-sha1 refused (RFC 8301)")
    if algorithm not in known:
        raise _Problem(PERMERROR, f"unsupported algorithm a={algorithm}")
    return algorithm, known[algorithm]


def _check_domain(value: str, tag: str) -> str:
    text = value.strip().rstrip(".") if tag == "d" else value.strip()
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Problem(PERMERROR, f"invalid {tag}={value}") from None
    if not DOMAIN_RE.match(text):
        raise _Problem(PERMERROR, f"invalid {tag}={value}")
    return text.lower()


def _check_headers(value: str) -> list[str]:
    names = [n.strip(" \t\r\n") for n in value.split(":")]
    if not all(_FIELD_NAME.match(n) for n in names):
        raise _Problem(PERMERROR, "malformed h= list")
    if "from" not in (n.lower() for n in names):
        raise _Problem(PERMERROR, "h= does not include From")
    return names


def _check_identity(tags: dict[str, str], domain: str) -> str:
    if "i" not in tags:
        return "@" + domain
    try:
        identity = decode_qp(tags["i"])
    except ValueError:
        raise _Problem(PERMERROR, "malformed i=") from None
    _, at, idomain = identity.rpartition("@")
    idomain = idomain.rstrip(".").lower()
    if not at or not (idomain == domain or idomain.endswith("." + domain)):
        raise _Problem(PERMERROR, f"i={identity} is not in d={domain} or a subdomain")
    return identity


def _number(tags: dict[str, str], name: str) -> int | None:
    if name not in tags:
        return None
    if not _DIGITS.match(tags[name]):
        raise _Problem(PERMERROR, f"malformed {name}={tags[name]}")
    return int(tags[name])


def _check_times(tags: dict[str, str], now: int) -> tuple[int | None, int | None]:
    t, x = _number(tags, "t"), _number(tags, "x")
    if t is not None and x is not None and x < t:
        raise _Problem(PERMERROR, f"x={x} is before t={t}")
    if x is not None and x < now:
        raise _Problem(PERMERROR, f"signature expired (x={x}, now {now})")
    if t is not None and t > now + CLOCK_DRIFT:
        raise _Problem(PERMERROR, f"signature timestamp t={t} is in the future")
    return t, x


def _check_query_and_canon(tags: dict[str, str], historic: bool) -> tuple[str, str]:
    methods = [m.strip(" \t") for m in tags.get("q", "dns/txt").split(":")]
    if "dns/txt" not in methods and not (historic and "dns" in methods):
        raise _Problem(PERMERROR, f"unsupported query method q={tags['q']}")
    try:
        return split_canonicalization(tags.get("c", "simple/simple"))
    except ValueError:
        raise _Problem(PERMERROR, f"unsupported canonicalization c={tags['c']}") from None


def _decode(tags: dict[str, str], name: str) -> bytes:
    try:
        return decode_base64(tags[name])
    except ValueError:
        raise _Problem(PERMERROR, f"malformed {name}= (not base64)") from None


def parse_signature(index: int, name: bytes, value: bytes, now: int, *,
                    historic: bool = False) -> Signature:
    """Parse and check one DKIM-Signature; :class:`_Problem` when unusable."""
    try:
        tags = parse_tag_list(value.decode("utf-8", "surrogateescape"))
    except TagListError as exc:
        raise _Problem(PERMERROR, f"signature syntax error ({exc})") from None
    try:
        return _build_signature(index, name, value, tags, now, historic)
    except _Problem as exc:
        exc.tags = tags
        raise


def _build_signature(index: int, name: bytes, value: bytes, tags: dict[str, str],
                     now: int, historic: bool) -> Signature:
    algorithm, (kind, hash_name) = _check_version_and_algorithm(tags, historic)
    for required in ("b", "bh", "d", "h", "s"):
        _need(tags, required)
    header_canon, body_canon = _check_query_and_canon(tags, historic)
    domain = _check_domain(tags["d"], "d")
    selector = _check_domain(tags["s"], "s")
    signed = _check_headers(tags["h"])
    identity = _check_identity(tags, domain)
    length = _number(tags, "l")
    timestamp, expires = _check_times(tags, now)
    b, bh = _decode(tags, "b"), _decode(tags, "bh")
    return Signature(index, name, value, algorithm, kind, hash_name, b, bh,
                     re.sub(r"\s+", "", tags["b"]), domain, selector, identity, header_canon,
                     body_canon, signed, length, timestamp, expires)


# ------------------------------------------------------------ header hash


def verify_signature(key: KeyRecord, signature: bytes, data: bytes,
                     hash_name: str = "sha256") -> bool:
    """Does ``signature`` over ``data`` verify with ``key``?"""
    try:
        if isinstance(key.public_key, ed25519.Ed25519PublicKey):
            key.public_key.verify(signature, hashlib.sha256(data).digest())
        else:
            algorithm = hashes.SHA1() if hash_name == "sha1" else hashes.SHA256()
            key.public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# ----------------------------------------------------------- key lookups


async def fetch_keys(resolver: TxtResolver, sig: Signature) -> list[KeyRecord | str]:
    """Key records at the signature's key name; unusable ones as their reason."""
    if len(sig.key_name) > MAX_NAME:
        raise _Problem(PERMERROR, f"key name {sig.key_name[:60]}... is too long for DNS")
    try:
        answer = await resolver.query(sig.key_name, "TXT")
    except DnsTempError as exc:
        raise _Problem(TEMPERROR, f"key lookup failed: {exc}") from None
    if answer.rcode == "NXDOMAIN":
        raise _Problem(PERMERROR, f"no key for signature ({sig.key_name}: NXDOMAIN)")
    if not answer.records:
        raise _Problem(PERMERROR, f"no key for signature ({sig.key_name}: no TXT record)")
    out: list[KeyRecord | str] = []
    for text in answer.records[:MAX_KEY_RECORDS]:
        try:
            out.append(parse_key_record(str(text)))
        except KeyRecordError as exc:
            out.append(str(exc))
    return out


def _usable(key: KeyRecord, sig: Signature, min_rsa_bits: int) -> str:
    """Why ``key`` cannot verify ``sig`` ("" if it can)."""
    if key.key_type != sig.key_type:
        return f"key type k={key.key_type} does not match a={sig.algorithm}"
    if not key.allows_hash(sig.hash_name):
        return f"key h= does not allow {sig.hash_name}"
    if key.key_type == "rsa" and key.bits < min_rsa_bits:
        return f"key too short ({key.bits} bits < {min_rsa_bits})"
    idomain = sig.identity.rpartition("@")[2].rstrip(".").lower()
    if key.strict and idomain != sig.domain:
        return "key has t=s: i= domain must equal d="
    return ""


# ----------------------------------------------------------- verification


class Verifier:
    """Verify every DKIM-Signature of one message, the body fed in chunks.

    ``historic=True`` also accepts rsa-sha1 and the draft versions (``v=``
    absent or ``0.5``). It exists to check the engine against pre-RFC 8301
    corpora; the daemon never sets it.
    """

    def __init__(self, headers: HeaderInput, *, max_signatures: int = 10,
                 min_rsa_bits: int = 1024, now: float | None = None,
                 historic: bool = False) -> None:
        self.headers = normalize_headers(headers)
        self.min_rsa_bits = min_rsa_bits
        self.historic = historic
        self.now = int(time.time() if now is None else now)
        self.hashers: dict[tuple[str, str, int | None], BodyHasher] = {}
        self.slots: list[Signature | DkimResult] = []
        for index, (name, value) in enumerate(self.headers):
            if len(self.slots) >= max_signatures:
                break
            if name.rstrip(b" \t").lower() == SIG_NAME:
                self.slots.append(self._parse(index, name, value))

    def _parse(self, index: int, name: bytes, value: bytes) -> Signature | DkimResult:
        try:
            sig = parse_signature(index, name, value, self.now, historic=self.historic)
        except _Problem as exc:
            return _partial_result(exc.tags, exc.result, exc.reason)
        if sig.body_key not in self.hashers:
            self.hashers[sig.body_key] = BodyHasher(*sig.body_key)
        return sig

    def feed(self, chunk: bytes) -> None:
        for hasher in self.hashers.values():
            hasher.update(chunk)

    async def finish(self, resolver: TxtResolver) -> list[DkimResult]:
        """Look the keys up and give one result per signature, in header order."""
        sigs = [s for s in self.slots if isinstance(s, Signature)]
        looked_up = await asyncio.gather(*(self._keys(resolver, s) for s in sigs))
        keys = dict(zip((s.index for s in sigs), looked_up, strict=True))
        results = [slot if isinstance(slot, DkimResult) else self._check(slot, keys[slot.index])
                   for slot in self.slots]
        return _unique_header_b(results)

    async def _keys(self, resolver: TxtResolver,
                    sig: Signature) -> list[KeyRecord | str] | DkimResult:
        try:
            return await fetch_keys(resolver, sig)
        except _Problem as exc:
            return sig.result(exc.result, exc.reason)

    def _check(self, sig: Signature, keys: list[KeyRecord | str] | DkimResult) -> DkimResult:
        if isinstance(keys, DkimResult):
            return keys
        usable: list[KeyRecord] = []
        reasons: list[str] = []
        for key in keys:
            if isinstance(key, str):
                reasons.append(key)
            elif why := _usable(key, sig, self.min_rsa_bits):
                reasons.append(why)
            else:
                usable.append(key)
        if not usable:
            bits = next((k.bits for k in keys if isinstance(k, KeyRecord)), 0)
            return sig.result(PERMERROR, reasons[0], bits=bits)
        return self._crypto(sig, usable)

    def _crypto(self, sig: Signature, keys: list[KeyRecord]) -> DkimResult:
        hasher = self.hashers[sig.body_key]
        digest = hasher.digest()
        if sig.length is not None and sig.length > hasher.length:
            return sig.result(PERMERROR, f"l={sig.length} exceeds the body length "
                              f"({hasher.length})", keys[0])
        if digest != sig.bh:
            return sig.result(FAIL, "body hash mismatch", keys[0])
        data = header_data(self.headers, sig.signed_headers, sig.header_canon, sig.name,
                           sig.raw_value)
        good = next((k for k in keys if verify_signature(k, sig.b, data, sig.hash_name)), None)
        if good is None:
            return sig.result(FAIL, "signature verification failed", keys[0])
        if sig.length is not None and sig.length < hasher.length:
            return sig.result(POLICY, f"l= covers only part of the body ({sig.length} of "
                              f"{hasher.length} bytes)", good)
        return sig.result(PASS, "", good)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _unique_header_b(results: list[DkimResult]) -> list[DkimResult]:
    """Shorten each ``header_b`` to its shortest prefix (>= 8 characters) that
    no other result shares (RFC 6008); linear after one sort."""
    order = sorted(range(len(results)), key=lambda i: results[i].header_b)
    need = [8] * len(results)
    for left, right in itertools.pairwise(order):
        common = _common_prefix(results[left].header_b, results[right].header_b)
        need[left], need[right] = max(need[left], common + 1), max(need[right], common + 1)
    return [replace(r, header_b=r.header_b[:n]) for r, n in zip(results, need, strict=True)]


async def verify(headers: HeaderInput, body: BodyInput, resolver: TxtResolver, *,
                 max_signatures: int = 10, min_rsa_bits: int = 1024,
                 now: float | None = None, historic: bool = False) -> list[DkimResult]:
    """Verify every DKIM-Signature of a message (at most ``max_signatures``)."""
    verifier = Verifier(headers, max_signatures=max_signatures, min_rsa_bits=min_rsa_bits,
                        now=now, historic=historic)
    if verifier.hashers:
        for chunk in iter_body(body):
            verifier.feed(chunk)
    return await verifier.finish(resolver)
