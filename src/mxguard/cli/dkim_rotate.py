"""``mxguard dkim rotate``: the DKIM key lifecycle, without cron scripts.

    mxguard dkim rotate example.com             # make the next key (pending), print its record
    mxguard dkim rotate example.com --status    # every selector, its state, what to do next
    mxguard dkim rotate example.com --advance   # once DNS serves it: sign with the new key

A key is **pending** until its record is published, **active** while it
signs, **retired** once a newer key signs. ``--advance`` switches only when
the pending key's record is served (looked up through the configured
Resolver, ``[dns]``) and matches the private key; the old record stays
listed "for removal" until the grace period (``--grace-days``, 7) is over --
mail signed with the old key may still be in flight or queued -- and is
shown as removed once DNS no longer serves it.

State: ``<state dir>/dkim-rotation.json`` (JSON, see :class:`RotationState`);
new keys are ``<state dir>/dkim/<domain>.<selector>.key`` (mode 0600; owned
by the state dir's owner, so a daemon running as ``mxguard`` can read them
when the command runs as root). The state dir is ``[server] state_dir``
unless ``--state-dir`` is given.

The daemon signs with :func:`active_keys` (``[dkim] keys`` entries): the
configured keys, without those the rotation has made pending or retired,
plus the rotation's active keys. It reads the state at start and on SIGHUP,
so ``--advance`` ends with "reload mxguard".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography.hazmat.primitives import serialization

from mxguard.auth.dkim_keys import (
    DOMAIN_RE,
    DkimKeyError,
    KeyRecordError,
    PrivateKey,
    key_type,
    parse_key_entry,
    parse_key_record,
    public_key_record,
    read_private_key,
)
from mxguard.cli.common import config_option, fail, load_or_exit
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
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o640)
        _own_like(tmp, self.path.parent)
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


def next_selector(taken: set[str], now: float | None = None) -> str:
    """``YYYYMM`` of now, then ``YYYYMMb``, ``YYYYMMc`` ... when taken."""
    base = time.strftime("%Y%m", time.gmtime(now))
    if base not in taken:
        return base
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if base + letter not in taken:
            return base + letter
    raise RotationError(f"too many rotations in {base}: give --selector")


def _write_key(path: Path, key: PrivateKey, state_dir: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(pem)
    _own_like(path, state_dir)


def _make_dirs(state_dir: Path) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    keys = state_dir / KEY_DIR
    if not keys.exists():
        keys.mkdir(mode=0o700)
        _own_like(keys, state_dir)
    return keys


def _import_configured(cfg: Config, state: RotationState, domain: str) -> None:
    """The first rotation of a domain takes over its ``[dkim] keys`` as active."""
    keys = state.keys(domain)
    for entry in cfg.dkim.keys:
        dom, sel, path = parse_key_entry(entry)
        if dom == domain and state.find(dom, sel) is None:
            keys.append(KeyState(sel, path, ACTIVE, created=0.0, activated=0.0))


# ------------------------------------------------------------------ CLI


def _date(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _record_lines(domain: str, k: KeyState) -> list[str]:
    from mxguard.cli.dkim import zone_line

    try:
        return [zone_line(domain, k.selector, public_key_record(read_private_key(k.path)))]
    except DkimKeyError as exc:
        return [f"; cannot read the key: {exc}"]


def _new_key(cfg: Config, state: RotationState, domain: str, sdir: Path, selector: str | None,
             kind: str | None, bits: int) -> KeyState:
    from mxguard.cli.dkim import _new_key as generate

    keys = state.keys(domain)
    taken = {k.selector for k in keys}
    if selector is None:
        selector = next_selector(taken)
    elif selector in taken or not DOMAIN_RE.match(selector):
        fail(f"selector {selector!r} is already used for {domain} or not a valid label")
    if kind is None:
        current = [k for k in keys if k.state == ACTIVE]
        kind = "rsa"
        if current:
            with contextlib.suppress(DkimKeyError):
                kind = key_type(read_private_key(current[-1].path))
    key_dir = _make_dirs(sdir)
    path = key_dir / f"{domain}.{selector}.key"
    try:
        _write_key(path, generate(kind, bits), sdir)
    except FileExistsError:
        fail(f"{path} exists: give another --selector")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    ks = KeyState(selector, str(path), PENDING, created=time.time())
    keys.append(ks)
    return ks


async def _checks(cfg: Config, domain: str,
                  keys: list[KeyState]) -> dict[str, RecordCheck]:
    resolver = Resolver(cfg.dns)
    found = await asyncio.gather(*(check_record(resolver, domain, k.selector, k.path)
                                   for k in keys))
    return {k.selector: c for k, c in zip(keys, found, strict=True)}


def _status(cfg: Config, state: RotationState, domain: str) -> None:
    keys = [k for k in state.keys(domain) if k.state != REMOVED]
    if not keys:
        click.echo(f"{domain}: no keys under rotation; `mxguard dkim rotate {domain}` makes "
                   "the first")
        return
    checks = asyncio.run(_checks(cfg, domain, keys))
    now = time.time()
    for k in keys:
        check = checks[k.selector]
        click.echo(f"{k.selector:10s} {k.state:8s} {k.path}")
        if k.state == PENDING:
            click.echo(f"           DNS: {check.text}")
            click.echo("           next: " + (f"mxguard dkim rotate {domain} --advance"
                                             if check.ok else "publish the record:"))
            if not check.ok:
                for line in _record_lines(domain, k):
                    click.echo(f"           {line}")
        elif k.state == ACTIVE:
            since = f"since {_date(k.activated)}" if k.activated else "(from [dkim] keys)"
            click.echo(f"           signing {since}; DNS: {check.text}")
        elif k.state == RETIRED:
            if check.status in ("missing",):
                k.state, k.removed = REMOVED, now
                click.echo("           record removed from DNS: done (the key file may be "
                           "deleted)")
            elif (k.remove_after or 0) <= now:
                click.echo(f"           remove now: {check.name} TXT (grace period over)")
            else:
                click.echo(f"           keep {check.name} until {_date(k.remove_after)}, "
                           "then remove it (mail signed with it may still be in flight)")


@click.command("rotate")
@click.argument("domain")
@config_option("mxguard TOML config ([dkim] keys, [dns], [server] state_dir)")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="where keys and the rotation state live (default: [server] state_dir)")
@click.option("--status", "show_status", is_flag=True, help="show the keys and what to do next")
@click.option("--advance", is_flag=True,
              help="sign with the pending key once DNS serves its record; retire the old one")
@click.option("--selector", default=None, help="selector of the new key (default: YYYYMM)")
@click.option("--type", "kind", type=click.Choice(["rsa", "ed25519"]), default=None,
              help="key type (default: that of the active key, else rsa)")
@click.option("--bits", type=click.IntRange(1024, 8192), default=2048, show_default=True)
@click.option("--grace-days", type=click.IntRange(0, 365), default=DEFAULT_GRACE_DAYS,
              show_default=True, help="days the retired key's record stays published")
def rotate(domain: str, config_path: str | None, state_dir: str | None, show_status: bool,
           advance: bool, selector: str | None, kind: str | None, bits: int,
           grace_days: int) -> None:
    """Make the next DKIM key of DOMAIN; switch to it once its record is published."""
    if show_status and advance:
        raise click.UsageError("--status and --advance exclude each other")
    domain = domain.strip().rstrip(".").lower()
    if not DOMAIN_RE.match(domain):
        raise click.BadParameter(f"not a domain name: {domain!r}", param_hint="DOMAIN")
    cfg = load_or_exit(config_path)
    sdir = state_dir_of(cfg, state_dir)
    try:
        state = load_state(cfg, state_dir)
        _import_configured(cfg, state, domain)
    except (RotationError, DkimKeyError) as exc:
        fail(str(exc))
    if show_status:
        _status(cfg, state, domain)
        _save(state, sdir)
        return
    if advance:
        code = _advance(cfg, state, domain, grace_days)
        _save(state, sdir)
        sys.exit(code)
    pending = [k for k in state.keys(domain) if k.state == PENDING]
    if pending:
        k = pending[-1]
        click.echo(f"{domain}: key {k.selector} is already pending ({k.path}); publish:")
    else:
        k = _new_key(cfg, state, domain, sdir, selector, kind, bits)
        _save(state, sdir)
        click.echo(f"{domain}: new key {k.selector} written to {k.path} (mode 0600); publish:")
    for line in _record_lines(domain, k):
        click.echo(line)
    click.echo(f"then, once DNS serves it: mxguard dkim rotate {domain} --advance"
               + (f" --state-dir {sdir}" if state_dir else ""))


def _save(state: RotationState, sdir: Path) -> None:
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        state.save()
    except OSError as exc:
        fail(f"cannot write {state.path}: {exc.strerror or exc}")


def _advance(cfg: Config, state: RotationState, domain: str, grace_days: int) -> int:
    keys = state.keys(domain)
    pending = [k for k in keys if k.state == PENDING]
    if not pending:
        click.echo(f"{domain}: no key is pending (make one with `mxguard dkim rotate "
                   f"{domain}`)")
        _status(cfg, state, domain)
        return 0
    new = pending[-1]
    check = asyncio.run(_checks(cfg, domain, [new]))[new.selector]
    if not check.ok:
        click.echo(f"{domain}: not switching to {new.selector}: {check.text}")
        click.echo("publish this record, wait for its TTL, then run --advance again:")
        for line in _record_lines(domain, new):
            click.echo(f"  {line}")
        return 1
    now = time.time()
    old = [k for k in keys if k.state == ACTIVE]
    for k in old:
        k.state, k.retired, k.remove_after = RETIRED, now, now + grace_days * DAY
    new.state, new.activated = ACTIVE, now
    click.echo(f"{domain}: {check.text}")
    click.echo(f"{domain}: signing switches to {new.selector} when mxguard reloads: "
               "systemctl reload mxguard (or kill -HUP <pid>)")
    for k in old:
        click.echo(f"{domain}: {k.selector} retired; remove {k.selector}._domainkey.{domain} "
                   f"TXT after {_date(k.remove_after)} (mxguard dkim rotate {domain} --status "
                   "tells you when)")
    return 0


__all__ = ["RecordCheck", "RotationError", "RotationState", "active_keys", "check_record",
           "published_keys", "rotate"]
