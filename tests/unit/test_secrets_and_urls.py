"""Credentials in no output (issue 14, item 8) and storage URLs checked at load
(item 9): each case with its control."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard import config
from mxguard.cli import main
from mxguard.redact import redact
from mxguard.testing.ports import free_port

SECRET = "s3cret"


@pytest.mark.parametrize(("text", "shown"), [
    ("redis://:s3cret@127.0.0.1:6380/0", "redis://:***@127.0.0.1:6380/0"),
    ("redis://127.0.0.1:6380/0", "redis://127.0.0.1:6380/0"),  # control: nothing to hide
    ("storage redis://mx:s3cret@cache.example:6379/2, pid 7",
     "storage redis://mx:***@cache.example:6379/2, pid 7"),
    ("redis://mx@cache.example/0", "redis://mx@cache.example/0"),  # control: user only
    ("rediss://:s3cret@h:6379/0?ssl_ca_certs=/etc/ca.pem",
     "rediss://:***@h:6379/0?ssl_ca_certs=/etc/ca.pem"),
    ("redis+sentinel://:s3cret@s1:26379,s2:26379/mx/0?sentinel_password=s3cret",
     "redis+sentinel://:***@s1:26379,s2:26379/mx/0?sentinel_password=***"),
    ("reply=Greylisted, see https://example.org/grey sender=a@b.example",
     "reply=Greylisted, see https://example.org/grey sender=a@b.example"),  # control
    ("redis://h:6379/0 sender=a@b.example", "redis://h:6379/0 sender=a@b.example"),
])
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def write(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "mxguard.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n')
    return path


@pytest.mark.parametrize("password", [SECRET, None], ids=["password", "control-no-password"])
def test_config_show_and_errors_hide_the_password(tmp_path: Path, password: str | None) -> None:
    auth = f":{password}@" if password else ""
    port = free_port()
    good = write(tmp_path, f"redis://{auth}127.0.0.1:{port}/0")
    out = CliRunner().invoke(main, ["config", "show", str(good)])
    assert out.exit_code == 0, out.output
    assert SECRET not in out.output
    assert f"127.0.0.1:{port}/0" in out.output  # where it points is still shown
    bad = write(tmp_path, f"redis://{auth}127.0.0.1:99999/0")
    out = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert out.exit_code == 2
    assert SECRET not in out.output and "127.0.0.1:99999" in out.output


def test_storage_migrate_hides_the_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the migration fails, its message must not leak
    for password, hidden in ((SECRET, True), (None, False)):  # control: no password
        auth = f":{password}@" if password else ""
        dst = f"redis://{auth}127.0.0.1:{port}/0"
        out = CliRunner().invoke(main, ["storage", "migrate", "--from",
                                        f"sqlite:///{tmp_path}/none.db", "--to", dst,
                                        "--timeout", "0.5"])
        assert out.exit_code != 0
        assert SECRET not in out.output
        assert f"127.0.0.1:{port}/0" in out.output, out.output
        assert ("***" in out.output) is hidden


@pytest.mark.parametrize(("url", "error"), [
    ("redis://127.0.0.1:6379/0", None),  # control
    ("redis://127.0.0.1:99999/0", "a port from 1 to 65535"),
    ("redis://127.0.0.1:0/0", "a port from 1 to 65535"),
    ("redis://127.0.0.1:63x9/0", "a port from 1 to 65535"),
    ("redis://cache.example/0", None),  # control: the default port
    ("redis://:pw@/0", "with a host"),
    ("redis://bad host/0", "a host name or IP address"),
    ("redis://[::1]:6379/3", None),  # control: IPv6
    ("redis://h:6379/zero", "a database number"),
    ("redis+sentinel://s1:26379,s2:26380/mx/0", None),  # control
    ("redis+sentinel://s1:26379,s2:70000/mx/0", "a port from 1 to 65535"),
    ("redis+sentinel://s1:26379/", "the master's name is missing"),
])
def test_storage_url_checked_at_load(tmp_path: Path, url: str, error: str | None) -> None:
    path = write(tmp_path, url)
    if error is None:
        assert config.load(path).storage.url == url
        return
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: key 'storage.url'"), message  # file and key
    assert error in message
    assert "pw" not in message.replace("password", "")


def test_remembered_passwords_are_masked_in_decision_lines() -> None:
    from mxguard import redact as r

    r.remember("redis://:hunter2-decision@127.0.0.1:6379/0?sentinel_password=pw-two-x")
    line = "action=accept reason=x:hunter2-decision y=pw-two-x"
    assert r.redact_known(line) == "action=accept reason=x:*** y=***"
    control = "action=accept sender=a@example.com reply=https://example.org/greylist"
    assert r.redact_known(control) == control
