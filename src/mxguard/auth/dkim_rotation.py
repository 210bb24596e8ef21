"""The DKIM key lifecycle that ``mxguard dkim rotate`` drives, and what the
daemon and ``mxguard dns`` read of it.

A key is **pending** until its record is published, **active** while it
signs, **retired** once a newer key signs (its record stays listed for
removal until the grace period is over), **removed** once DNS no longer
serves it.

State: ``<state dir>/dkim-rotation.json`` (JSON, see :class:`RotationState`);
new keys are ``<state dir>/dkim/<domain>.<selector>.key`` (mode 0600, created
with ``O_EXCL`` so nothing planted there is followed; owned by the state
dir's owner, so a daemon running as ``mxguard`` can read them when the
command runs as root).

The daemon signs with :func:`active_keys` (``[dkim] keys`` entries): the
configured keys, without those the rotation has made pending or retired,
plus the rotation's active keys. :func:`published_keys` lists every key
whose record DNS should serve; :func:`check_record` looks one up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from mxguard.auth.dkim_keys import (
    DOMAIN_RE,
    DkimKeyError,
    KeyRecordError,
    PrivateKey,
    generate_private_key,
    key_type,
    parse_key_entry,
    parse_key_record,
    read_private_key,
    write_private_key,
)
from mxguard.dns import DnsTempError, Resolver

if TYPE_CHECKING:
    from mxguard.config import Config

STATE_FILE = "dkim-rotation.json"
KEY_DIR = "dkim"
DEFAULT_GRACE_DAYS = 7
DAY = 86400
PENDING, ACTIVE, RETIRED, REMOVED = "pending", "active", "retired", "removed"


class RotationError(ValueError):
    """A state file that cannot be used; the message names it and the fix."""


# ------------------------------------------------------------------ state


@dataclass
class KeyState:
    selector: str
    path: str
    state: str
    created: float
    activated: float | None = None
    retired: float | None = None
    remove_after: float | None = None
    removed: float | None = None


@dataclass
class RotationState:
    """``{"version": 1, "domains": {"example.com": [KeyState, ...]}}``."""

    path: Path
    domains: dict[str, list[KeyState]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> RotationState:
        p = Path(path)
        try:
            raw = p.read_text()
        except FileNotFoundError:
            return cls(p)
        except OSError as exc:
            raise RotationError(f"cannot read {p}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
            domains = {str(dom): [KeyState(**k) for k in keys]
                       for dom, keys in data["domains"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RotationError(f"{p} is not a DKIM rotation state file ({exc}); restore it "
                                "from a backup or move it away") from None
        return cls(p, domains)

    def save(self) -> None:
        data = {"version": 1,
                "domains": {d: [asdict(k) for k in keys] for d, keys in self.domains.items()}}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        # Written as root into a directory the daemon user may write: never follow a
        # planted symlink (unlink, then O_EXCL|O_NOFOLLOW; mode and owner on the fd).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fd, 0o640)
            _own_fd_like(fd, self.path.parent)
            fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def keys(self, domain: str) -> list[KeyState]:
        return self.domains.setdefault(domain, [])

    def find(self, domain: str, selector: str) -> KeyState | None:
        for k in self.domains.get(domain, []):
            if k.selector == selector:
                return k
        return None


def state_dir_of(cfg: Config, state_dir: str | None = None) -> Path:
    return Path(state_dir or cfg.state_dir)


def load_state(cfg: Config, state_dir: str | None = None) -> RotationState:
    return RotationState.load(state_dir_of(cfg, state_dir) / STATE_FILE)


def active_keys(cfg: Config, state_dir: str | None = None) -> list[str]:
    """The ``[dkim] keys`` entries to sign with, rotation applied.

    For the daemon's KeyTable: ``KeyTable.from_config(dataclasses.replace(cfg.dkim,
    keys=active_keys(cfg)))``. Raises :class:`RotationError` (a ValueError) for a
    corrupt state file, :class:`DkimKeyError` for a bad ``[dkim] keys`` entry.
    """
    return _active_entries(cfg, load_state(cfg, state_dir), strict=True)


def _active_entries(cfg: Config, state: RotationState, *, strict: bool) -> list[str]:
    """Configured keys the rotation has not made pending/retired, plus its active keys.
    ``strict``: a bad ``[dkim] keys`` entry raises; otherwise it is skipped."""
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for entry in cfg.dkim.keys:
        try:
            domain, selector, _ = parse_key_entry(entry)
        except DkimKeyError:
            if strict:
                raise
            continue
        known = state.find(domain, selector)
        if known is not None and known.state != ACTIVE:
            continue
        out.append(entry)
        seen.add((domain, selector))
    for domain, keys in state.domains.items():
        for k in keys:
            if k.state == ACTIVE and (domain, k.selector) not in seen:
                out.append(f"{domain}:{k.selector}:{k.path}")
                seen.add((domain, k.selector))
    return out


@dataclass(frozen=True)
class DomainKey:
    """A key whose record belongs in DNS: active, pending, or retired in its grace period."""

    domain: str
    selector: str
    path: str
    state: str


def published_keys(cfg: Config, domain: str | None = None,
                   state_dir: str | None = None) -> list[DomainKey]:
    """Every key of ``domain`` (or all domains) whose DNS record should be served."""
    try:
        state = load_state(cfg, state_dir)
    except RotationError:
        state = RotationState(Path(STATE_FILE))
    out: list[DomainKey] = []
    for entry in _active_entries(cfg, state, strict=False):
        dom, sel, path = parse_key_entry(entry)
        out.append(DomainKey(dom, sel, path, ACTIVE))
    now = time.time()
    for dom, keys in state.domains.items():
        for k in keys:
            if k.state == PENDING or (k.state == RETIRED and (k.remove_after or 0) > now):
                out.append(DomainKey(dom, k.selector, k.path, k.state))
    return [k for k in out if domain is None or k.domain == domain]


# ------------------------------------------------------------------ DNS


@dataclass(frozen=True)
class RecordCheck:
    """What DNS serves for one selector. ``status``: ok | missing | mismatch |
    invalid | error (temporary DNS failure) | nokey (local key unreadable)."""

    status: str
    name: str
    text: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _spki(key: Any) -> bytes:
    out: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return out


async def check_record(resolver: Resolver, domain: str, selector: str,
                       key: PrivateKey | str) -> RecordCheck:
    """Is ``selector._domainkey.domain`` published and the public half of ``key``
    (a key or a key file path)?"""
    name = f"{selector}._domainkey.{domain}"
    if isinstance(key, str):
        try:
            key = read_private_key(key)
        except DkimKeyError as exc:
            return RecordCheck("nokey", name, str(exc))
    try:
        answer = await resolver.query(name, "TXT")
    except DnsTempError as exc:
        return RecordCheck("error", name, f"DNS error: {exc}")
    if not answer.records:
        what = "the name does not exist" if answer.rcode == "NXDOMAIN" else "no TXT record"
        return RecordCheck("missing", name, f"{name}: not published ({what})")
    if len(answer.records) > 1:
        return RecordCheck("invalid", name, f"{name}: {len(answer.records)} TXT records; "
                           "verifiers may use any of them")
    try:
        record = parse_key_record(answer.records[0])
    except KeyRecordError as exc:
        return RecordCheck("invalid", name, f"{name}: {exc}")
    if _spki(record.public_key) != _spki(key.public_key()):
        return RecordCheck("mismatch", name, f"{name}: the published key is not the public "
                           "half of the local private key")
    testing = " (t=y: verifiers treat failures as testing)" if record.testing else ""
    return RecordCheck("ok", name, f"{name}: published, matches the local key "
                       f"({record.key_type}, {record.bits} bits){testing}")


async def check_records(resolver: Resolver, domain: str,
                        keys: Sequence[KeyState]) -> dict[str, RecordCheck]:
    """:func:`check_record` of each key, concurrently, by selector."""
    found = await asyncio.gather(*(check_record(resolver, domain, k.selector, k.path)
                                   for k in keys))
    return {k.selector: c for k, c in zip(keys, found, strict=True)}


# ------------------------------------------------------------------ key files


def _own_like(path: Path, ref: Path) -> None:
    """Give ``path`` the owner of ``ref`` when we are root (daemon user reads it)."""
    if os.geteuid() != 0:
        return
    try:
        st = ref.stat()
        os.chown(path, st.st_uid, st.st_gid)
    except OSError:
        pass


def _own_fd_like(fd: int, ref: Path) -> None:
    """:func:`_own_like` on an open file (no path, so no symlink to follow)."""
    if os.geteuid() != 0:
        return
    try:
        st = ref.stat()
        os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        pass


def next_selector(taken: set[str], now: float | None = None) -> str:
    """``YYYYMM`` of now, then ``YYYYMMb``, ``YYYYMMc`` ... when taken."""
    base = time.strftime("%Y%m", time.gmtime(now))
    if base not in taken:
        return base
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if base + letter not in taken:
            return base + letter
    raise RotationError(f"too many rotations in {base}: give --selector")


def write_key(path: Path, key: PrivateKey, state_dir: Path) -> None:
    """A new key file (never over an existing file or symlink), owned like ``state_dir``."""
    write_private_key(path, key)
    _own_like(path, state_dir)


def make_key_dir(state_dir: Path) -> Path:
    """``state_dir/dkim`` (mode 0700, owned like ``state_dir``), made when missing."""
    state_dir.mkdir(parents=True, exist_ok=True)
    keys = state_dir / KEY_DIR
    if not keys.exists():
        keys.mkdir(mode=0o700)
        _own_like(keys, state_dir)
    return keys


def import_configured(cfg: Config, state: RotationState, domain: str) -> None:
    """The first rotation of a domain takes over its ``[dkim] keys`` as active."""
    keys = state.keys(domain)
    for entry in cfg.dkim.keys:
        dom, sel, path = parse_key_entry(entry)
        if dom == domain and state.find(dom, sel) is None:
            keys.append(KeyState(sel, path, ACTIVE, created=0.0, activated=0.0))


# ------------------------------------------------------------------ transitions


def new_key(state: RotationState, domain: str, state_dir: Path, selector: str,
            kind: str | None, bits: int) -> KeyState:
    """Generate the next key of ``domain`` as pending under ``state_dir``.

    ``kind`` None: the type of the newest active key, else rsa. RotationError
    for a selector already used or not a label, or a key file that cannot be
    written."""
    keys = state.keys(domain)
    if selector in {k.selector for k in keys} or not DOMAIN_RE.match(selector):
        raise RotationError(f"selector {selector!r} is already used for {domain} or not a "
                            "valid label")
    if kind is None:
        current = [k for k in keys if k.state == ACTIVE]
        kind = "rsa"
        if current:
            with contextlib.suppress(DkimKeyError):
                kind = key_type(read_private_key(current[-1].path))
    path = make_key_dir(state_dir) / f"{domain}.{selector}.key"
    try:
        write_key(path, generate_private_key(kind, bits), state_dir)
    except FileExistsError:
        raise RotationError(f"{path} exists: give another --selector") from None
    except OSError as exc:
        raise RotationError(f"cannot write {path}: {exc.strerror or exc}") from None
    ks = KeyState(selector, str(path), PENDING, created=time.time())
    keys.append(ks)
    return ks


def activate(state: RotationState, domain: str, new: KeyState, grace_days: int,
             now: float | None = None) -> list[KeyState]:
    """``new`` signs from now on; the keys active until now are retired, their
    records kept ``grace_days``. Returns the retired keys."""
    now = time.time() if now is None else now
    old = [k for k in state.keys(domain) if k.state == ACTIVE]
    for k in old:
        k.state, k.retired, k.remove_after = RETIRED, now, now + grace_days * DAY
    new.state, new.activated = ACTIVE, now
    return old


__all__ = [
    "ACTIVE", "DAY", "DEFAULT_GRACE_DAYS", "KEY_DIR", "PENDING", "REMOVED", "RETIRED",
    "STATE_FILE", "DomainKey", "KeyState", "RecordCheck", "RotationError", "RotationState",
    "activate", "active_keys", "check_record", "check_records", "import_configured",
    "load_state", "make_key_dir", "new_key", "next_selector", "published_keys",
    "state_dir_of", "write_key",
]
