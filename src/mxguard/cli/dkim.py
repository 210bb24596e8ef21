"""``mxguard dkim ...``: make keys, sign and verify messages by hand.

* ``genkey -d DOMAIN -s SELECTOR [--type rsa|ed25519] [--bits 2048] [--dir DIR]``
  writes ``DIR/DOMAIN.SELECTOR.key`` (PKCS#8 PEM, mode 0600), prints the DNS
  record as a zone-file line (strings of at most 255 bytes) and the
  ``[dkim] keys`` line for the config.
* ``sign -d DOMAIN -s SELECTOR -k KEYFILE`` reads a message on stdin and
  prints it with a DKIM-Signature on top.
* ``verify [--config FILE]`` reads a message on stdin and prints one line per
  signature; exit 0 if one passes, 1 otherwise. Keys are looked up through
  the config's ``[dns] nameservers``.
* ``rotate DOMAIN [--status | --advance]``: the key lifecycle, without cron
  scripts (below; the state and its transitions are
  :mod:`mxguard.auth.dkim_rotation`).

Errors are one line on stderr, exit 2.

``mxguard dkim rotate``::

    mxguard dkim rotate example.com             # make the next key (pending), print its record
    mxguard dkim rotate example.com --status    # every selector, its state, what to do next
    mxguard dkim rotate example.com --advance   # once DNS serves it: sign with the new key

A key is **pending** until its record is published, **active** while it
signs, **retired** once a newer key signs. ``--advance`` switches only when
the pending key's record is served (looked up through the configured
Resolver, ``[dns]``) and matches the private key; the old record stays
listed "for removal" until the grace period (``--grace-days``, 7) is over --
mail signed with the old key may still be in flight or queued -- and is
shown as removed once DNS no longer serves it. The state dir is
``[server] state_dir`` unless ``--state-dir`` is given. The daemon reads the
state at start and on SIGHUP, so ``--advance`` ends with "reload mxguard".
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import click

from mxguard import config
from mxguard.auth.dkim import (
    DkimKeyError,
    DkimResult,
    SigningKey,
    parse_message,
    public_key_record,
    read_private_key,
    sign,
    verify,
)
from mxguard.auth.dkim_keys import (
    DOMAIN_RE,
    PrivateKey,
    generate_private_key,
    write_private_key,
)
from mxguard.auth.dkim_rotation import (
    ACTIVE,
    DEFAULT_GRACE_DAYS,
    PENDING,
    REMOVED,
    RETIRED,
    KeyState,
    RotationError,
    RotationState,
    activate,
    check_records,
    import_configured,
    load_state,
    new_key,
    next_selector,
    state_dir_of,
)
from mxguard.cli.common import config_option, fail, load_or_exit
from mxguard.dns import Resolver

TXT_STRING_MAX = 255


def _name(value: str, what: str) -> str:
    text = value.strip().rstrip(".").lower()
    if not DOMAIN_RE.match(text):
        raise click.BadParameter(f"not a valid {what}: {value!r}")
    return text


def zone_line(domain: str, selector: str, record: str) -> str:
    """``sel._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; " "p=..." )``."""
    head, sep, key = record.partition("p=")
    parts = [head] if head else []
    rest = sep + key
    parts += [rest[i:i + TXT_STRING_MAX] for i in range(0, len(rest), TXT_STRING_MAX)]
    strings = " ".join(f'"{part}"' for part in parts)
    return f"{selector}._domainkey.{domain}. IN TXT ( {strings} )"


def _write_private(path: str, key: PrivateKey, force: bool) -> None:
    try:
        write_private_key(path, key, replace=force)
    except FileExistsError:
        fail(f"{path} exists (use --force to replace it)")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")


@click.group("dkim")
def dkim() -> None:
    """DKIM keys, signing and verification by hand."""


@dkim.command("genkey")
@click.option("-d", "--domain", required=True, help="signing domain (d=)")
@click.option("-s", "--selector", required=True, help="selector (s=)")
@click.option("--type", "key_type", type=click.Choice(["rsa", "ed25519"]), default="rsa",
              show_default=True)
@click.option("--bits", type=click.IntRange(1024, 8192), default=2048, show_default=True,
              help="RSA key size")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".",
              show_default=True, help="where the private key is written")
@click.option("--force", is_flag=True, help="replace an existing key file")
def genkey(domain: str, selector: str, key_type: str, bits: int, directory: str,
           force: bool) -> None:
    """Make a key pair: private key file, DNS record and config line."""
    domain, selector = _name(domain, "domain"), _name(selector, "selector")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.abspath(os.path.join(directory, f"{domain}.{selector}.key"))
    key = generate_private_key(key_type, bits)
    _write_private(path, key, force)
    click.echo(f"mxguard: private key written to {path} (mode 0600)", err=True)
    click.echo(zone_line(domain, selector, public_key_record(key)))
    click.echo("")
    click.echo("[dkim]")
    click.echo(f'keys = ["{domain}:{selector}:{path}"]')


@dkim.command("sign")
@click.option("-d", "--domain", required=True, help="signing domain (d=)")
@click.option("-s", "--selector", required=True, help="selector (s=)")
@click.option("-k", "--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="private key file (PEM, or base64 Ed25519 seed)")
@click.option("-c", "--canonicalization", default="relaxed/relaxed", show_default=True,
              type=click.Choice(["relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                                 "simple/simple"]))
@click.option("--ttl", type=click.IntRange(min=0), default=0, help="x= seconds after t=")
def sign_cmd(domain: str, selector: str, key_path: str, canonicalization: str,
             ttl: int) -> None:
    """Sign the message on stdin; print it with its DKIM-Signature."""
    try:
        key = SigningKey(_name(domain, "domain"), _name(selector, "selector"),
                         read_private_key(key_path), key_path)
    except DkimKeyError as exc:
        fail(str(exc))
    raw = sys.stdin.buffer.read()
    headers, body = parse_message(raw)
    (value,) = sign(headers, body, [key], canonicalization=canonicalization, ttl=ttl)
    eol = "\r\n" if b"\r\n" in raw.partition(b"\n")[0] + b"\n" else "\n"
    field = "DKIM-Signature: " + value.replace("\r\n", eol) + eol
    out = sys.stdout.buffer
    out.write(field.encode("ascii"))
    out.write(raw)
    out.flush()


def _line(r: DkimResult) -> str:
    bits = f" ({r.key_bits}-bit key)" if r.key_bits else ""
    reason = f": {r.reason}" if r.reason else ""
    return (f"{r.result} d={r.domain or '-'} s={r.selector or '-'} a={r.algorithm or '-'} "
            f"b={r.header_b or '-'}{bits}{reason}")


@dkim.command("verify")
@config_option("mxguard TOML config ([dns] and [dkim] are used)", short=False, metavar=None)
def verify_cmd(config_path: str | None) -> None:
    """Verify the message on stdin: one line per signature; exit 0 if one passes."""
    cfg = load_or_exit(config_path)
    headers, body = parse_message(sys.stdin.buffer.read())
    results = asyncio.run(verify(headers, body, Resolver(cfg.dns),
                                 max_signatures=cfg.dkim.max_signatures,
                                 min_rsa_bits=cfg.dkim.min_rsa_bits))
    if not results:
        click.echo("none: no DKIM-Signature")
    for r in results:
        click.echo(_line(r))
    sys.exit(0 if any(r.result == "pass" for r in results) else 1)


# ------------------------------------------------------------------ rotate


def _date(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _record_lines(domain: str, k: KeyState) -> list[str]:
    try:
        return [zone_line(domain, k.selector, public_key_record(read_private_key(k.path)))]
    except DkimKeyError as exc:
        return [f"; cannot read the key: {exc}"]


def _status(cfg: config.Config, state: RotationState, domain: str) -> None:
    keys = [k for k in state.keys(domain) if k.state != REMOVED]
    if not keys:
        click.echo(f"{domain}: no keys under rotation; `mxguard dkim rotate {domain}` makes "
                   "the first")
        return
    checks = asyncio.run(check_records(Resolver(cfg.dns), domain, keys))
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


@dkim.command("rotate")
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
        import_configured(cfg, state, domain)
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
        if selector is None:
            selector = next_selector({k.selector for k in state.keys(domain)})
        try:
            k = new_key(state, domain, sdir, selector, kind, bits)
        except RotationError as exc:
            fail(str(exc))
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


def _advance(cfg: config.Config, state: RotationState, domain: str, grace_days: int) -> int:
    keys = state.keys(domain)
    pending = [k for k in keys if k.state == PENDING]
    if not pending:
        click.echo(f"{domain}: no key is pending (make one with `mxguard dkim rotate "
                   f"{domain}`)")
        _status(cfg, state, domain)
        return 0
    new = pending[-1]
    check = asyncio.run(check_records(Resolver(cfg.dns), domain, [new]))[new.selector]
    if not check.ok:
        click.echo(f"{domain}: not switching to {new.selector}: {check.text}")
        click.echo("publish this record, wait for its TTL, then run --advance again:")
        for line in _record_lines(domain, new):
            click.echo(f"  {line}")
        return 1
    old = activate(state, domain, new, grace_days)
    click.echo(f"{domain}: {check.text}")
    click.echo(f"{domain}: signing switches to {new.selector} when mxguard reloads: "
               "systemctl reload mxguard (or kill -HUP <pid>)")
    for k in old:
        click.echo(f"{domain}: {k.selector} retired; remove {k.selector}._domainkey.{domain} "
                   f"TXT after {_date(k.remove_after)} (mxguard dkim rotate {domain} --status "
                   "tells you when)")
    return 0
