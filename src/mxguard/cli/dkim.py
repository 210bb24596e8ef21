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

Errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import asyncio
import os
import sys

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

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
from mxguard.auth.dkim_keys import DOMAIN_RE, PrivateKey
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


def _new_key(key_type: str, bits: int) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _write_private(path: str, key: PrivateKey, force: bool) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        fail(f"{path} exists (use --force to replace it)")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


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
    key = _new_key(key_type, bits)
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
