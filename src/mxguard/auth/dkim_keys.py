"""DKIM keys: private keys for signing, public key records, the key table.

* :func:`load_private_key` reads PEM (PKCS#1 or PKCS#8 RSA, PKCS#8 Ed25519),
  marker-less base64 DER, and the raw base64 Ed25519 seed used by dkimpy's
  test data (RFC 8463 publishes keys that way too).
* :func:`public_key_record` gives the ``v=DKIM1; k=...; p=...`` TXT value.
* :func:`parse_key_record` reads a DNS key record (RFC 6376 §3.6.1, RFC 8463);
  problems raise :class:`KeyRecordError` whose text is the verifier's reason.
* :class:`KeyTable` maps a From address to the keys that sign for it, built
  from ``[dkim] keys`` and ``signing_table``; :func:`check_key_permissions`
  refuses private key files that group or others can read;
  :func:`generate_private_key` and :func:`write_private_key` make new ones.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fnmatch
import functools
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from mxguard.auth.dkim_canon import TagListError, decode_base64, parse_tag_list

if TYPE_CHECKING:
    from mxguard.config import DkimConfig

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey

MIN_SIGNING_RSA_BITS = 1024  # RFC 8301 §3.2
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
DOMAIN_RE = re.compile(rf"(?=[^\s]{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")


class DkimKeyError(ValueError):
    """A signing key or key table entry that cannot be used (message says why)."""


class KeyRecordError(ValueError):
    """A DNS key record that cannot be used; ``str(exc)`` is the reason."""


# ------------------------------------------------------------ private keys


def load_private_key(data: bytes) -> PrivateKey:
    """A private key from PEM, base64 DER, or a base64 32-byte Ed25519 seed."""
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(text, password=None)
        else:
            key = _load_base64_key(text)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DkimKeyError(f"not a usable private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"unsupported key type {type(key).__name__} (RSA or Ed25519 only)")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_SIGNING_RSA_BITS:
        raise DkimKeyError(f"RSA key of {key.key_size} bits: RFC 8301 requires at least "
                           f"{MIN_SIGNING_RSA_BITS}")
    return key


def _load_base64_key(text: bytes) -> PrivateKeyTypes:
    raw = decode_base64(text.decode("ascii", "replace"))
    if len(raw) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    if len(raw) == 64:  # NaCl form: seed followed by public key
        return ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
    return serialization.load_der_private_key(raw, password=None)


def read_private_key(path: str) -> PrivateKey:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise DkimKeyError(f"cannot read DKIM key {path}: {exc.strerror or exc}") from None
    try:
        return load_private_key(data)
    except DkimKeyError as exc:
        raise DkimKeyError(f"DKIM key {path}: {exc}") from None


def generate_private_key(kind: str, bits: int = 2048) -> PrivateKey:
    """A new signing key: Ed25519 for ``kind == "ed25519"``, else RSA of ``bits``."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_private_key(path: str | os.PathLike[str], key: PrivateKey, *,
                      replace: bool = False) -> None:
    """Write ``key`` to ``path`` as PKCS#8 PEM, mode 0600, never through a symlink.

    Without ``replace`` the file is created with ``O_EXCL``: an existing file,
    or a symlink planted at ``path``, is never followed or overwritten
    (FileExistsError). With ``replace`` (``genkey --force``) a symlink at
    ``path`` is refused (OSError) and the key is written to a new temporary
    file beside it (``O_EXCL``, 0600) that then replaces ``path`` atomically.
    Other failures raise OSError."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    target = os.fspath(path)
    if not replace:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(pem)
        return
    if os.path.islink(target):
        raise OSError(errno.ELOOP, "refusing to replace a symlink", target)
    fd, tmp = tempfile.mkstemp(prefix=".mxguard-key-", dir=os.path.dirname(target) or ".")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(pem)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_key_permissions(path: str) -> None:
    """Raise :class:`DkimKeyError` if group or others may read or write ``path``."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise DkimKeyError(f"cannot stat DKIM key {path}: {exc.strerror or exc}") from None
    if mode & 0o066:
        raise DkimKeyError(f"DKIM private key {path} is accessible by group or others "
                           f"(mode {mode:04o}); fix: chmod 600 {path}")


def key_type(key: PrivateKey | PublicKey) -> str:
    return "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) \
        else "rsa"


def public_key_record(key: PrivateKey) -> str:
    """The DNS TXT value publishing ``key``'s public half."""
    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@dataclass(frozen=True)
class SigningKey:
    """One private key and where its public half is published."""

    domain: str
    selector: str
    key: PrivateKey
    path: str = ""

    @property
    def key_type(self) -> str:
        return key_type(self.key)

    @property
    def algorithm(self) -> str:
        return f"{self.key_type}-sha256"

    @property
    def bits(self) -> int:
        return self.key.key_size if isinstance(self.key, rsa.RSAPrivateKey) else 256

    def sign(self, data: bytes, digest: bytes) -> bytes:
        """Sign canonical header ``data`` (RSA) / its SHA-256 ``digest`` (Ed25519, RFC 8463)."""
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(digest)
        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def public_record(self) -> str:
        return public_key_record(self.key)


# ------------------------------------------------------- public key records


@dataclass(frozen=True)
class KeyRecord:
    """A parsed DNS key record."""

    key_type: str                      # "rsa" | "ed25519"
    public_key: PublicKey
    bits: int
    hashes: frozenset[str] | None      # h=; None: any
    testing: bool                      # t=y
    strict: bool                       # t=s: i= domain must equal d=

    def allows_hash(self, name: str) -> bool:
        return self.hashes is None or name in self.hashes


def _colon_list(value: str) -> list[str]:
    return [part.strip(" \t") for part in value.split(":")]


@functools.lru_cache(maxsize=256)  # one sender's key, message after message: loaded once
def parse_key_record(text: str) -> KeyRecord:
    """Parse a key record; :class:`KeyRecordError` carries the reason (a bad
    record raises every time: errors are not remembered). The result is
    immutable, so the same record text may share one."""
    try:
        tags = parse_tag_list(text)
    except TagListError as exc:
        raise KeyRecordError(f"key record syntax error ({exc})") from None
    if "v" in tags and (next(iter(tags)) != "v" or tags["v"] != "DKIM1"):
        raise KeyRecordError(f"unsupported key record version v={tags['v']}")
    if "p" not in tags:
        raise KeyRecordError("key record has no p=")
    if not tags["p"].strip(" \t"):
        raise KeyRecordError("key revoked (empty p=)")
    services = _colon_list(tags.get("s", "*"))
    if "*" not in services and "email" not in services:
        raise KeyRecordError(f"key not for email (s={tags['s']})")
    kind = tags.get("k", "rsa")
    public, bits = _public_key(kind, tags["p"])
    flags = _colon_list(tags.get("t", ""))
    hash_list = frozenset(_colon_list(tags["h"])) if "h" in tags else None
    return KeyRecord(kind, public, bits, hash_list, "y" in flags, "s" in flags)


def _public_key(kind: str, p_value: str) -> tuple[PublicKey, int]:
    try:
        raw = decode_base64(p_value)
    except ValueError:
        raise KeyRecordError("bad key encoding (p= is not base64)") from None
    if kind == "ed25519":
        if len(raw) != 32:
            raise KeyRecordError(f"invalid ed25519 key ({len(raw)} bytes, 32 expected)")
        try:
            return ed25519.Ed25519PublicKey.from_public_bytes(raw), 256
        except ValueError:
            raise KeyRecordError("invalid ed25519 key") from None
    if kind != "rsa":
        raise KeyRecordError(f"unknown key type k={kind}")
    try:  # SubjectPublicKeyInfo, or a bare PKCS#1 RSAPublicKey
        key = serialization.load_der_public_key(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyRecordError("bad RSA key data in p=") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyRecordError("p= is not an RSA key (k=rsa)")
    return key, key.key_size


# --------------------------------------------------------------- key table


def _domain(text: str) -> str:
    return text.strip().rstrip(".").lower()


def parse_key_entry(entry: str) -> tuple[str, str, str]:
    """``"domain:selector:/path"`` -> (domain, selector, path)."""
    parts = entry.split(":", 2)
    if len(parts) != 3 or not parts[2].strip():
        raise DkimKeyError(f'[dkim] keys entry {entry!r}: expected "domain:selector:/path"')
    domain, selector, path = _domain(parts[0]), parts[1].strip().lower(), parts[2].strip()
    if not DOMAIN_RE.match(domain) or not DOMAIN_RE.match(selector):
        raise DkimKeyError(f"[dkim] keys entry {entry!r}: bad domain or selector")
    return domain, selector, path


def parse_signing_entry(entry: str) -> tuple[str, str]:
    """``"*@example.com example.com"`` -> (pattern, key domain)."""
    parts = entry.split()
    if len(parts) != 2:
        raise DkimKeyError(f'[dkim] signing_table entry {entry!r}: expected "pattern domain"')
    return parts[0].lower(), _domain(parts[1])


class KeyTable:
    """Which keys sign mail from which address.

    ``signing_table`` (pattern, key domain) pairs are tried in order, the
    first whose pattern matches wins; a pattern with ``@`` is a glob over the
    whole address (``*@*.example.com``), one without ``@`` over its domain.
    With no signing table the From domain, or its nearest parent that has a
    key, signs. All keys of the chosen domain sign (dual signing).
    """

    def __init__(self, keys: Sequence[SigningKey] = (),
                 signing_table: Sequence[tuple[str, str]] = ()) -> None:
        self.keys = list(keys)
        self.by_domain: dict[str, list[SigningKey]] = {}
        for key in self.keys:
            self.by_domain.setdefault(key.domain.lower(), []).append(key)
        self.signing_table = [(pattern.lower(), _domain(dom)) for pattern, dom in signing_table]
        for pattern, dom in self.signing_table:
            if dom not in self.by_domain:
                raise DkimKeyError(f"[dkim] signing_table: no key for domain {dom} "
                                   f"(pattern {pattern})")

    @classmethod
    def from_config(cls, cfg: DkimConfig, *, check_permissions: bool = True) -> KeyTable:
        """Load every key of ``cfg.keys``; :class:`DkimKeyError` on the first problem."""
        keys: list[SigningKey] = []
        for entry in cfg.keys:
            domain, selector, path = parse_key_entry(entry)
            if check_permissions:
                check_key_permissions(path)
            keys.append(SigningKey(domain, selector, read_private_key(path), path))
        table = [parse_signing_entry(entry) for entry in cfg.signing_table]
        return cls(keys, table)

    def __len__(self) -> int:
        return len(self.keys)

    def keys_for(self, address: str) -> list[SigningKey]:
        """The keys that sign mail from ``address`` (``local@domain`` or a domain)."""
        address = address.strip().strip("<>").rstrip(".").lower()
        domain = address.rpartition("@")[2]
        if self.signing_table:
            for pattern, key_domain in self.signing_table:
                subject = address if "@" in pattern else domain
                if fnmatch.fnmatchcase(subject, pattern):
                    return list(self.by_domain[key_domain])
            return []
        labels = domain.split(".")
        for i in range(len(labels)):
            keys = self.by_domain.get(".".join(labels[i:]))
            if keys:
                return list(keys)
        return []
