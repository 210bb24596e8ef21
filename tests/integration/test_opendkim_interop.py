"""OpenDKIM interop, both ways: mail signed by mxguard verifies as pass in
OpenDKIM, and mail signed by OpenDKIM verifies as pass in mxguard, for
rsa-sha256 and ed25519-sha256 (OpenDKIM 2.11, Debian packages ``opendkim``
and ``opendkim-tools``), under relaxed and simple canonicalization, plus a
message carrying both signatures. Tampered mail fails in OpenDKIM (control).

How OpenDKIM is driven offline (found by trying, OpenDKIM 2.11.0~beta2):

* ``opendkim -x CONF -t FILE`` is OpenDKIM's test mode: it runs the milter
  callbacks over a message file, no MTA, no socket.
* Verifying: CONF sets ``Mode v`` and ``TestDNSData file:PATH`` -- a data set
  of ``name value`` lines whose values OpenDKIM takes as the TXT records of
  those names (opendkim.conf(5): "intended for use during automated
  testing"). No DNS at all, so no port 53 and no root. With ``-vv`` and
  ``AlwaysAddARHeader yes`` test mode prints the Authentication-Results
  header it would add (``### INSHEADER: ...``), one ``dkim=`` per signature;
  that is what we read.
* Signing: CONF sets ``Mode s``, ``Domain``, ``Selector``, ``KeyFile``,
  ``SignatureAlgorithm`` and ``Canonicalization``; test mode prints the
  DKIM-Signature header it would add on stdout. ``RequireSafeKeys no`` is
  needed because the key sits under /tmp (world-writable parents are
  "unsafe"). OpenDKIM reads our PKCS#8 PEM keys, Ed25519 included.
* OpenDKIM hands header values around as a milter does without
  ``SMFIP_HDR_LEADSPC``: it rebuilds each field as ``Name: value`` with exactly
  one space after the colon. A field written ``From:   x`` or ``Subject:x``
  therefore cannot pass ``simple`` header canonicalization in OpenDKIM, in
  either direction (dkimpy and mxguard agree with each other on it). So the
  ``simple/simple`` cases use the messages with one space after each colon;
  folding, odd whitespace inside values and the body stay as they are.
  ``relaxed`` is immune and runs on the messages untouched.
* OpenDKIM 2.11.0~beta2 bug: its ed25519-sha256 signatures with ``simple``
  header canonicalization are invalid everywhere -- OpenDKIM itself and
  dkimpy reject them too. It hashes its DKIM-Signature field with ``b=`` on
  the line of ``h=`` (``...; b=``) but writes it with ``b=`` folded onto a
  line of its own, and ``simple`` hashes folding as written. (Its RSA
  signatures fold the same way in both, so they verify.) For that case the
  test checks the bug is OpenDKIM's: OpenDKIM fails its own signature, we say
  fail, and we pass once the field is folded the way OpenDKIM hashed it.
  mxguard signs relaxed/relaxed by default; OpenDKIM's default is
  relaxed/simple, where none of this arises.
* ``opendkim-testmsg`` was tried and left aside: it cannot choose the
  algorithm (it signs rsa-sha1) and printed a corrupted ``b=`` tail.

mxguard's side uses its real verifier through :class:`mxguard.dns.Resolver`
and the loopback DNS server. Skips when OpenDKIM is missing, unless ``CI`` is
set (then it fails).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mxguard.auth.dkim import SigningKey, parse_message, public_key_record, sign, verify
from mxguard.config import DnsConfig
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer

pytestmark = pytest.mark.integration

OPENDKIM = shutil.which("opendkim") or (
    "/usr/sbin/opendkim" if os.path.exists("/usr/sbin/opendkim") else None)
DOMAIN = "interop.example"
CANONS = ["relaxed/relaxed", "relaxed/simple", "simple/simple"]  # relaxed/simple: OpenDKIM default
KINDS = ["rsa", "ed25519"]
MESSAGES = [
    b"From: Alice <alice@interop.example>\r\nTo: bob@example.org\r\nSubject: interop\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <i1@interop.example>\r\n\r\n"
    b"Hello Bob.\r\n",
    b"From:   Alice  <alice@interop.example>  \r\nTo: bob@example.org,\r\n\tcarol@example.org\r\n"
    b"Subject:  folded\r\n  subject \t line\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    b"  spaces  and\ttabs \t\r\n\r\nbody " + b"z" * 900 + b"\r\n\r\n\r\n",
]


def for_canon(message: bytes, canon: str) -> bytes:
    """``message`` with one space after each header colon for simple header
    canonicalization (see the module doc), unchanged for relaxed."""
    if not canon.startswith("simple"):
        return message
    head, sep, body = message.partition(b"\r\n\r\n")
    head = re.sub(rb"(?m)^([!-9;-~]+):[ \t]*", rb"\1: ", head)
    return head + sep + body


@pytest.fixture(scope="module")
def opendkim() -> str:
    if OPENDKIM is None:
        if os.environ.get("CI"):
            pytest.fail("opendkim is not installed (apt-get install opendkim opendkim-tools)")
        pytest.skip("opendkim is not installed (apt-get install opendkim opendkim-tools)")
    version = subprocess.run([OPENDKIM, "-V"], capture_output=True, text=True, check=False)
    if "ed25519-sha256" not in version.stdout + version.stderr:
        pytest.fail("this OpenDKIM has no ed25519-sha256 support")
    return OPENDKIM


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("opendkim")
    path.chmod(0o700)
    return path


def _write_key(path: Path, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


@pytest.fixture(scope="module")
def keys(workdir: Path) -> dict[str, tuple[SigningKey, Path]]:
    """Per kind: our key for mxguard's signatures and another for OpenDKIM's."""
    made: dict[str, tuple[SigningKey, Path]] = {}
    for kind in KINDS:
        for who in ("mx", "odk"):
            key = (ed25519.Ed25519PrivateKey.generate() if kind == "ed25519"
                   else rsa.generate_private_key(65537, 2048))
            path = workdir / f"{who}-{kind}.key"
            _write_key(path, key)
            made[f"{who}-{kind}"] = (SigningKey(DOMAIN, f"{who}-{kind}", key, str(path)), path)
    return made


@pytest.fixture(scope="module")
def records(keys: dict[str, tuple[SigningKey, Path]]) -> dict[str, str]:
    return {f"{k.selector}._domainkey.{DOMAIN}": public_key_record(k.key)
            for k, _ in keys.values()}


@pytest.fixture(scope="module")
def dns_server(records: dict[str, str]) -> Iterator[DNSServer]:
    with DNSServer({name: [("TXT", value)] for name, value in records.items()}) as srv:
        yield srv


@pytest.fixture(scope="module")
def verify_conf(workdir: Path, records: dict[str, str]) -> Path:
    data = workdir / "testdns"
    data.write_text("".join(f"{name} {value}\n" for name, value in records.items()))
    conf = workdir / "verify.conf"
    conf.write_text(f"Syslog no\nMode v\nTestDNSData file:{data}\nAlwaysAddARHeader yes\n"
                    "AuthservID interop.test\n")
    return conf


def _run(opendkim: str, conf: Path, message: Path,
         *options: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([opendkim, "-x", str(conf), *options, "-t", str(message)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, f"opendkim exit {proc.returncode}: {proc.stderr}"
    return proc


def opendkim_verify(opendkim: str, conf: Path, message: Path) -> dict[str, str]:
    """selector -> OpenDKIM's dkim= result, from the A-R header test mode prints."""
    proc = _run(opendkim, conf, message, "-vv")
    results = dict((s, r) for r, s in re.findall(r"dkim=(\w+)[^;]*?header\.s=([\w.-]+)",
                                                 proc.stdout + proc.stderr))
    assert results, f"no dkim= result from opendkim:\n{proc.stdout}\n{proc.stderr}"
    return results


def opendkim_sign(opendkim: str, workdir: Path, key: SigningKey, key_path: Path,
                  canon: str, message: bytes) -> bytes:
    """The message with OpenDKIM's DKIM-Signature on top."""
    conf = workdir / f"sign-{key.selector}.conf"
    conf.write_text(f"Syslog no\nMode s\nDomain {key.domain}\nSelector {key.selector}\n"
                    f"KeyFile {key_path}\nSignatureAlgorithm {key.algorithm}\n"
                    f"Canonicalization {canon}\nRequireSafeKeys no\n")
    path = workdir / "to-sign.eml"
    path.write_bytes(message)
    out = _run(opendkim, conf, path).stdout
    start = out.find("DKIM-Signature:")
    assert start >= 0, f"opendkim printed no signature:\n{out}"
    field = re.sub(r"\r?\n", "\r\n", out[start:].strip()) + "\r\n"
    return field.encode() + message


def _signed_by_us(message: bytes, key: SigningKey, canon: str) -> bytes:
    headers, body = parse_message(message)
    (value,) = sign(headers, body, [key], canonicalization=canon)
    return b"DKIM-Signature: " + value.encode() + b"\r\n" + message


def _our_results(message: bytes, dns_server: DNSServer) -> list[tuple[str, str, str]]:
    headers, body = parse_message(message)
    resolver = Resolver(DnsConfig(nameservers=[dns_server.address], timeout=2))
    results = asyncio.run(verify(headers, body, resolver))
    return [(r.selector, r.result, r.reason) for r in results]


@pytest.mark.parametrize("canon", CANONS)
@pytest.mark.parametrize("kind", KINDS)
def test_ours_pass_in_opendkim(opendkim: str, workdir: Path, verify_conf: Path,
                               keys: dict[str, tuple[SigningKey, Path]], kind: str,
                               canon: str) -> None:
    key, _ = keys[f"mx-{kind}"]
    for i, original in enumerate(MESSAGES):
        message = for_canon(original, canon)
        path = workdir / f"ours-{kind}-{i}.eml"
        path.write_bytes(_signed_by_us(message, key, canon))
        assert opendkim_verify(opendkim, verify_conf, path) == {key.selector: "pass"}, \
            f"message {i}"


@pytest.mark.parametrize("canon", CANONS)
@pytest.mark.parametrize("kind", KINDS)
def test_opendkim_pass_in_ours(opendkim: str, workdir: Path, dns_server: DNSServer,
                               verify_conf: Path, keys: dict[str, tuple[SigningKey, Path]],
                               kind: str, canon: str) -> None:
    key, path = keys[f"odk-{kind}"]
    for i, original in enumerate(MESSAGES):
        message = for_canon(original, canon)
        signed = opendkim_sign(opendkim, workdir, key, path, canon, message)
        assert f"a={key.algorithm}".encode() in signed
        if kind == "ed25519" and canon.startswith("simple"):
            _opendkim_ed25519_simple_bug(opendkim, workdir, verify_conf, dns_server, key.selector,
                                         signed)
            continue
        assert _our_results(signed, dns_server) == [(key.selector, "pass", "")], f"message {i}"


def _opendkim_ed25519_simple_bug(opendkim: str, workdir: Path, verify_conf: Path,
                                 dns_server: DNSServer, selector: str, signed: bytes) -> None:
    """See the module doc: OpenDKIM's own verdict, ours, ours on the field as hashed."""
    path = workdir / "odk-ed25519-simple.eml"
    path.write_bytes(signed)
    assert opendkim_verify(opendkim, verify_conf, path) == {selector: "fail"}, \
        "OpenDKIM now verifies its own ed25519 simple signatures: the bug is fixed, " \
        "drop this special case"
    assert _our_results(signed, dns_server) == \
        [(selector, "fail", "signature verification failed")]
    as_hashed = signed.replace(b";\r\n\tb=", b"; b=", 1)
    assert _our_results(as_hashed, dns_server) == [(selector, "pass", "")]


def test_dual_signatures_both_ways(opendkim: str, workdir: Path, dns_server: DNSServer,
                                   verify_conf: Path,
                                   keys: dict[str, tuple[SigningKey, Path]]) -> None:
    """One message, rsa-sha256 and ed25519-sha256 signatures on it."""
    ours = [keys["mx-ed25519"][0], keys["mx-rsa"][0]]
    headers, body = parse_message(MESSAGES[1])
    values = sign(headers, body, ours)
    message = b"".join(b"DKIM-Signature: " + v.encode() + b"\r\n" for v in values) + MESSAGES[1]
    path = workdir / "dual-ours.eml"
    path.write_bytes(message)
    assert opendkim_verify(opendkim, verify_conf, path) == \
        {"mx-ed25519": "pass", "mx-rsa": "pass"}
    theirs = MESSAGES[1]
    for name in ("odk-rsa", "odk-ed25519"):
        key, key_path = keys[name]
        theirs = opendkim_sign(opendkim, workdir, key, key_path, "relaxed/relaxed", theirs)
    assert sorted(_our_results(theirs, dns_server)) == \
        [("odk-ed25519", "pass", ""), ("odk-rsa", "pass", "")]


def test_tampered_mail_fails_in_opendkim(opendkim: str, workdir: Path, verify_conf: Path,
                                         keys: dict[str, tuple[SigningKey, Path]]) -> None:
    """Control: OpenDKIM is really checking (a changed From and body fail)."""
    key, _ = keys["mx-rsa"]
    signed = _signed_by_us(MESSAGES[0], key, "relaxed/relaxed")
    for i, bad in enumerate([signed.replace(b"From: Alice", b"From: Mallory"),
                             signed.replace(b"Hello Bob.", b"Hello Eve.")]):
        path = workdir / f"tampered-{i}.eml"
        path.write_bytes(bad)
        assert opendkim_verify(opendkim, verify_conf, path) == {key.selector: "fail"}
