"""``mxguard dkim genkey|sign|verify`` through click's CliRunner.

genkey's zone line is read back and served by the loopback DNS server; the
config file's ``[dns] nameservers`` points ``verify`` at it.
"""

from __future__ import annotations

import inspect
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mxguard.auth.dkim_keys import parse_key_record, read_private_key
from mxguard.cli.dkim import dkim, zone_line
from mxguard.testing.dns import DNSServer

_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
                              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
                              else {})
MESSAGE = (b"From: Alice <alice@example.com>\nTo: bob@example.org\nSubject: cli\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\n\nHello.\n")


def run(args: list[str], stdin: bytes = b"") -> Result:
    return CliRunner(**_RUNNER_KW).invoke(dkim, args, input=stdin, catch_exceptions=False)


def record_from_zone_line(line: str) -> tuple[str, str]:
    """(name, TXT value) from ``name. IN TXT ( "a" "b" )``."""
    name = line.split()[0].rstrip(".")
    return name, "".join(re.findall(r'"([^"]*)"', line))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str, str]]:
    """kind -> (key file, zone line, config line)."""
    out: dict[str, tuple[Path, str, str]] = {}
    base = tmp_path_factory.mktemp("keys")
    for kind, selector in (("rsa", "r1"), ("ed25519", "e1")):
        res = run(["genkey", "-d", "Example.COM", "-s", selector, "--type", kind,
                   "--dir", str(base / "keys")])
        assert res.exit_code == 0, res.output
        lines = res.stdout.splitlines()
        out[kind] = (base / "keys" / f"example.com.{selector}.key", lines[0], lines[-1])
    return out


@pytest.fixture(scope="module")
def dns_config(generated: dict[str, tuple[Path, str, str]],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    zone = {}
    for _, line, _ in generated.values():
        name, value = record_from_zone_line(line)
        zone[name] = [("TXT", value)]
    with DNSServer(zone) as srv:
        path = tmp_path_factory.mktemp("cfg") / "mxguard.toml"
        path.write_text(f'[dns]\nnameservers = ["{srv.address}"]\ntimeout = 2\n')
        yield path


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_genkey_outputs(generated: dict[str, tuple[Path, str, str]], kind: str) -> None:
    path, line, config_line = generated[kind]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_private_key(str(path))
    name, value = record_from_zone_line(line)
    assert name.endswith("._domainkey.example.com")
    assert parse_key_record(value).key_type == kind
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', line))
    assert line.startswith(f"{name}. IN TXT ( \"v=DKIM1; k={kind}; \" \"p=")
    assert config_line == f'keys = ["example.com:{name.split(".")[0]}:{path}"]'


def test_genkey_refuses_to_overwrite(tmp_path: Path) -> None:
    args = ["genkey", "-d", "example.com", "-s", "o1", "--type", "ed25519", "--dir",
            str(tmp_path)]
    assert run(args).exit_code == 0
    path = tmp_path / "example.com.o1.key"
    before = path.read_bytes()
    res = run(args)
    assert res.exit_code == 2 and "exists" in res.stderr
    assert path.read_bytes() == before
    res = run([*args, "--force"])
    assert res.exit_code == 0 and path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_genkey_rejects_bad_domain(tmp_path: Path) -> None:
    res = run(["genkey", "-d", "bad domain", "-s", "s", "--dir", str(tmp_path)])
    assert res.exit_code == 2 and "not a valid domain" in res.stderr


def test_zone_line_splits_long_values() -> None:
    line = zone_line("example.com", "s", "v=DKIM1; k=rsa; p=" + "A" * 600)
    strings = re.findall(r'"([^"]*)"', line)
    assert strings[0] == "v=DKIM1; k=rsa; " and [len(s) for s in strings[1:]] == [255, 255, 92]


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_sign_then_verify(generated: dict[str, tuple[Path, str, str]], dns_config: Path,
                          kind: str) -> None:
    path, line, _ = generated[kind]
    selector = record_from_zone_line(line)[0].split(".")[0]
    res = run(["sign", "-d", "example.com", "-s", selector, "-k", str(path)], MESSAGE)
    assert res.exit_code == 0, res.stderr
    signed = res.stdout_bytes
    assert signed.startswith(b"DKIM-Signature: v=1; a=") and signed.endswith(MESSAGE)
    assert b"\r\n" not in signed                        # LF message -> LF signature field
    res = run(["verify", "--config", str(dns_config)], signed)
    assert res.exit_code == 0, res.stdout
    assert re.match(rf"pass d=example.com s={selector} a={kind}-sha256 b=\S{{8}} ",
                    res.stdout)
    tampered = signed.replace(b"Hello.", b"Hullo.")      # control
    res = run(["verify", "--config", str(dns_config)], tampered)
    assert res.exit_code == 1 and res.stdout.startswith("fail ") \
        and "body hash mismatch" in res.stdout


def test_sign_keeps_crlf_messages_crlf(generated: dict[str, tuple[Path, str, str]]) -> None:
    crlf = MESSAGE.replace(b"\n", b"\r\n")
    res = run(["sign", "-d", "example.com", "-s", "e1", "-k", str(generated["ed25519"][0])],
              crlf)
    head = res.stdout_bytes.split(b"From: Alice")[0]
    assert head.count(b"\r\n") == head.count(b"\n") > 1


def test_verify_unsigned_and_missing_key(dns_config: Path,
                                         generated: dict[str, tuple[Path, str, str]]) -> None:
    res = run(["verify", "--config", str(dns_config)], MESSAGE)
    assert res.exit_code == 1 and res.stdout.strip() == "none: no DKIM-Signature"
    res = run(["sign", "-d", "example.com", "-s", "unpublished", "-k",
               str(generated["ed25519"][0])], MESSAGE)
    res = run(["verify", "--config", str(dns_config)], res.stdout_bytes)
    assert res.exit_code == 1 and res.stdout.startswith("permerror ") and "NXDOMAIN" in res.stdout


def test_sign_with_bad_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    res = run(["sign", "-d", "example.com", "-s", "s", "-k", str(bad)], MESSAGE)
    assert res.exit_code == 2 and "not a usable private key" in res.stderr


def test_verify_bad_config(tmp_path: Path) -> None:
    res = run(["verify", "--config", str(tmp_path / "missing.toml")], MESSAGE)
    assert res.exit_code == 2 and "config error" in res.stderr


@pytest.mark.parametrize(("planted", "force", "exit_code"), [
    (True, True, 2),  # --force never writes through a symlink at the key path
    (True, False, 2),  # without --force: refused as existing
    (False, True, 0),  # control: --force replaces a plain key file
])
def test_genkey_never_writes_through_a_symlink(tmp_path: Path, planted: bool, force: bool,
                                                exit_code: int) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    keydir = tmp_path / "keys"
    keydir.mkdir()
    key = keydir / "example.com.s1.key"
    if planted:
        key.symlink_to(victim)
    else:
        key.write_text("old key\n")
    res = run(["genkey", "-d", "example.com", "-s", "s1", "--dir", str(keydir),
               *(["--force"] if force else [])])
    assert res.exit_code == exit_code, res.output
    assert victim.read_text() == "untouched\n"
    if not planted:
        assert not key.is_symlink() and stat.S_IMODE(key.stat().st_mode) == 0o600
        assert read_private_key(str(key))
    assert [p.name for p in keydir.iterdir() if p.name.startswith(".mxguard-key-")] == []
