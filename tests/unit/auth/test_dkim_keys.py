"""DKIM keys: loading, public records, key records, KeyTable, permissions."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mxguard.auth.dkim_keys import (
    DkimKeyError,
    KeyRecordError,
    KeyTable,
    SigningKey,
    check_key_permissions,
    load_private_key,
    parse_key_record,
    public_key_record,
    read_private_key,
)
from mxguard.config import DkimConfig
from tests.conformance.dkim_dns import dkim_dir

DKIMPY = dkim_dir() / "dkimpy"

RSA = rsa.generate_private_key(65537, 1024)
ED = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
         fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _p(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return public_key_record(key).rpartition("p=")[2]


# ------------------------------------------------------------- private keys


@pytest.mark.parametrize(("data", "kind"), [
    (_pem(RSA, serialization.PrivateFormat.TraditionalOpenSSL), "rsa"),   # PKCS#1
    (_pem(RSA, serialization.PrivateFormat.PKCS8), "rsa"),
    (_pem(ED, serialization.PrivateFormat.PKCS8), "ed25519"),
    (base64.b64encode(bytes(range(32))) + b"\n", "ed25519"),               # raw seed
    (base64.b64encode(bytes(range(32)) + b"x" * 32), "ed25519"),           # NaCl seed+pub
    (base64.b64encode(RSA.private_bytes(serialization.Encoding.DER,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())), "rsa"),
])
def test_load_private_key_forms(data: bytes, kind: str) -> None:
    key = load_private_key(data)
    assert SigningKey("example.com", "s", key).key_type == kind


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nxx\n",
                                  base64.b64encode(b"short")])
def test_load_private_key_garbage(data: bytes) -> None:
    with pytest.raises(DkimKeyError):
        load_private_key(data)


SHORT_RSA_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIB5QIBADANBgkqhkiG9w0BAQEFAASCAc8wggHLAgEAAmEAosUNqIH5EYqlxaC9
pJk746zCQ+9nAcshSCC+pJOwxiNnd+i3L6de3cPQnaxl3Py73GFGSCJG+Avt6MKd
oxigRFjVJeEPELK7m2ZnVfhw+ZXoVA4MvR0lwq4zidt6PjzjAgMBAAECYDF8gZOK
uIPJyG6WWTHy2I921bU70vBrppm8QtncgTEsUGfXW+JkG2aHAyT85hdSyvpzMlPn
oyoIoxpcutPdlk5Kh/ANpwkvtPvXh+uRH7kNm1AMtrQATc14wcow2BVlSQIxANjQ
DOArz3WO7gnurDfN3apDPXk2AQsghFwNzYja7yD5bx0mw5lhPtO7R2jveMOOrwIx
AMAwbcy3+O8E+FQbteYQXOxGuJI4E0QRaR31vLIVBhCCaaWaYTHuX0xL7mP7M59i
DQIwObjqNKR1Ty8GYM6SOykr4rCUJTkjffriQj/KgK0JDRZbZr9zQ9qIB4bMtDtN
Q4MxAjEAp75dR25Xnr82w6qABDLJ+Avt8ulwn1uW5Ohj7wb8iRJahYkORldo5B3u
D2PkdbtNAjEAq6fcadDfncxr51Mj7tveSRxSTNQV+wrt3CuixdFfY5HSL/3JR8xC
20zSDUwS0wOL
-----END PRIVATE KEY-----
"""  # a 768-bit test key, for RFC 8301 refusals only


def test_short_rsa_key_refused_for_signing() -> None:
    with pytest.raises(DkimKeyError, match="RFC 8301"):
        load_private_key(SHORT_RSA_PEM)


@pytest.mark.parametrize(("name", "record"), [
    ("test.private", "test.txt"),
    ("1024_testkey.key", "1024_testkey_wo_markers.pub.txt"),
    ("2048_testkey_PKCS8.key", "2048_testkey_PKCS8.key.pub.txt"),
])
def test_dkimpy_keys_match_their_records(name: str, record: str) -> None:
    key = read_private_key(str(DKIMPY / name))
    published = parse_key_record((DKIMPY / record).read_text().strip())
    assert isinstance(published.public_key, rsa.RSAPublicKey)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert published.public_key.public_numbers() == key.public_key().public_numbers()


def test_rfc8032_seed_gives_rfc8463_public_key() -> None:
    key = read_private_key(str(DKIMPY / "rfc8032_7_1.key"))
    assert public_key_record(key) == \
        "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="


def test_read_private_key_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DkimKeyError, match="cannot read"):
        read_private_key(str(tmp_path / "nope.key"))


def test_public_record_round_trip() -> None:
    for key in (RSA, ED):
        record = parse_key_record(public_key_record(key))
        assert record.key_type == SigningKey("d", "s", key).key_type
        assert not record.testing and not record.strict


# -------------------------------------------------------------- key records


@pytest.mark.parametrize(("text", "reason"), [
    (f"v=DKIM1; p={_p(RSA)}", ""),
    (f"p={_p(RSA)}", ""),                                         # all defaults
    (f"v=DKIM1; k=ed25519; p={_p(ED)}", ""),
    (f"v=DKIM1; h=sha1:sha256; s=email:web; t=y:s; n=note; p={_p(RSA)}", ""),
    (f"v=DKIM1; p={_p(RSA)}; ; ", ""),                            # trailing junk specs
    ("v=DKIM1; k=rsa; p=", "key revoked"),
    ("v=DKIM1; k=rsa", "no p="),
    (f"v=DKIM2; p={_p(RSA)}", "version"),
    (f"k=rsa; v=DKIM1; p={_p(RSA)}", "version"),                  # v= not first
    (f"v=DKIM1: g=*; k=rsa; p={_p(RSA)}", "version"),             # dkimpy badversion.txt
    (f"v=DKIM1; k=ed25519-sha256; p={_p(RSA)}", "unknown key type"),
    (f"v=DKIM1; s=tlsrpt; p={_p(RSA)}", "not for email"),
    (f"v=DKIM1; k=rsa; t; p={_p(RSA)}", "syntax error"),
    ("v=DKIM1; k=rsa; p=@@@@", "not base64"),
    ("v=DKIM1; k=rsa; p=QUJD", "bad RSA key"),
    (f"v=DKIM1; k=ed25519; p={_p(RSA)}", "invalid ed25519 key"),
    (f"v=DKIM1; k=rsa; p={_p(ED)}", "bad RSA key"),
    ("v=DKIM1; k=ed25519; p=MCowBQYDK2VwAyEA3SUqa9UbfciWkk7tlcJ9P1VD5pXAasg0JUn/OgjVbKE=",
     "invalid ed25519 key (44 bytes"),
])
def test_parse_key_record(text: str, reason: str) -> None:
    if not reason:
        parse_key_record(text)
        return
    with pytest.raises(KeyRecordError, match=reason.replace("(", r"\(")):
        parse_key_record(text)


def test_key_record_flags_and_hashes() -> None:
    record = parse_key_record(f"v=DKIM1; t=y:s; h=sha256; p={_p(RSA)}")
    assert record.testing and record.strict
    assert record.allows_hash("sha256") and not record.allows_hash("sha1")
    assert record.bits == 1024


def test_key_record_accepts_pkcs1_rsa() -> None:
    der = RSA.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.PKCS1)
    record = parse_key_record(f"k=rsa; p={base64.b64encode(der).decode()}")
    assert record.bits == 1024


# ---------------------------------------------------------------- key table


def _key_file(directory: Path, name: str, mode: int = 0o600,
              key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = ED) -> str:
    path = directory / name
    path.write_bytes(_pem(key, serialization.PrivateFormat.PKCS8))
    os.chmod(path, mode)
    return str(path)


def test_key_table_from_config_and_parent_fallback(tmp_path: Path) -> None:
    ed = _key_file(tmp_path, "ed.key")
    rs = _key_file(tmp_path, "rsa.key", key=RSA)
    cfg = DkimConfig(keys=[f"example.com:ed:{ed}", f"Example.COM:rsa:{rs}",
                           f"other.org:s1:{ed}"])
    table = KeyTable.from_config(cfg)
    assert len(table) == 3
    assert [k.selector for k in table.keys_for("alice@example.com")] == ["ed", "rsa"]
    assert [k.selector for k in table.keys_for("bob@mail.sub.example.com")] == ["ed", "rsa"]
    assert [k.domain for k in table.keys_for("<x@Other.Org>")] == ["other.org"]
    assert table.keys_for("x@example.net") == []
    assert table.keys_for("x@notexample.com") == []                # control: no suffix match


@pytest.mark.parametrize(("address", "expected"), [
    ("ceo@example.com", "special.org"),                 # first match wins
    ("a@example.com", "example.com"),
    ("a@lists.example.com", "example.com"),
    ("a@deep.lists.example.com", "example.com"),
    ("a@example.net", "net.example"),                   # pattern without @ = domain glob
    ("a@example.org", None),
])
def test_signing_table_patterns(tmp_path: Path, address: str, expected: str | None) -> None:
    path = _key_file(tmp_path, "k.key")
    keys = [SigningKey(d, "s", ED, path) for d in ("example.com", "special.org", "net.example")]
    table = KeyTable(keys, [("ceo@example.com", "special.org"), ("*@example.com", "example.com"),
                            ("*@*.example.com", "example.com"), ("example.net", "net.example")])
    got = table.keys_for(address)
    assert [k.domain for k in got] == ([expected] if expected else [])


@pytest.mark.parametrize(("cfg", "message"), [
    (DkimConfig(keys=["example.com:sel"]), "domain:selector:/path"),
    (DkimConfig(keys=["bad domain:sel:/x"]), "bad domain or selector"),
    (DkimConfig(keys=[], signing_table=["*@x.com x.com"]), "no key for domain x.com"),
    (DkimConfig(keys=[], signing_table=["*@x.com"]), "pattern domain"),
])
def test_key_table_bad_entries(cfg: DkimConfig, message: str) -> None:
    with pytest.raises(DkimKeyError, match=message):
        KeyTable.from_config(cfg, check_permissions=False)


@pytest.mark.parametrize(("mode", "ok"), [(0o600, True), (0o400, True), (0o640, False),
                                          (0o604, False), (0o620, False)])
def test_key_permission_check(tmp_path: Path, mode: int, ok: bool) -> None:
    path = _key_file(tmp_path, "k.key", mode)
    if ok:
        check_key_permissions(path)
        KeyTable.from_config(DkimConfig(keys=[f"example.com:s:{path}"]))
        return
    with pytest.raises(DkimKeyError, match=f"chmod 600 {path}"):
        check_key_permissions(path)
    with pytest.raises(DkimKeyError, match="accessible by group or others"):
        KeyTable.from_config(DkimConfig(keys=[f"example.com:s:{path}"]))
    KeyTable.from_config(DkimConfig(keys=[f"example.com:s:{path}"]), check_permissions=False)


def test_signing_key_properties() -> None:
    assert SigningKey("d", "s", RSA).algorithm == "rsa-sha256"
    assert SigningKey("d", "s", RSA).bits == 1024
    assert SigningKey("d", "s", ED).algorithm == "ed25519-sha256"
    assert SigningKey("d", "s", ED).bits == 256


def test_key_record_parsed_once_errors_every_time() -> None:
    """The same record text gives the same (immutable) record; a bad one raises on
    every call, never a remembered success."""
    record = public_key_record(RSA)
    assert parse_key_record(record) is parse_key_record(record)
    for _ in range(2):
        with pytest.raises(KeyRecordError):
            parse_key_record("v=DKIM1; p=")
