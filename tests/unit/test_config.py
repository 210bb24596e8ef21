"""Config loading: defaults, validation messages that name file, key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from mxguard import config
from mxguard.core.transaction import Mode


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mxguard.toml"
    p.write_text(text)
    return p


def test_defaults_need_no_file() -> None:
    cfg = config.load(None)
    assert cfg.policy.listen == "127.0.0.1:10023"
    assert cfg.greylist.delay == 300
    assert cfg.greylist.max_age == 35 * 86400
    assert cfg.greylist.retry_window == 2 * 86400
    assert cfg.helo.mode is Mode.ENFORCE
    assert cfg.storage_url.startswith("sqlite:///") and cfg.storage_url.endswith("mxguard.db")


def test_a_valid_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    p = write(tmp_path, '[policy]\nlisten = "unix:/run/mxguard/policy.sock"\n'
                        '[dns]\nnameservers = ["127.0.0.1:5353", "::1"]\ntimeout = 2\n'
                        f'[storage]\nurl = "sqlite:///{tmp_path}/x.db"\n'
                        "[greylist]\ndelay = 60\nmode = \"score\"\n")
    cfg = config.load(p)
    assert cfg.policy.listen == "unix:/run/mxguard/policy.sock"
    assert cfg.dns.nameservers == ["127.0.0.1:5353", "::1"]
    assert cfg.dns.timeout == 2.0 and isinstance(cfg.dns.timeout, float)
    assert cfg.greylist.delay == 60 and cfg.greylist.mode is Mode.SCORE
    assert cfg.greylist.max_age == 35 * 86400  # control: untouched key keeps its default
    assert cfg.storage_url == f"sqlite:///{tmp_path}/x.db"


@pytest.mark.parametrize(("text", "needles"), [
    ("[greylist]\ndelay = \"five\"\n", ["greylist.delay", "an integer from 0 to 86400"]),
    ("[greylist]\ndelay = -1\n", ["greylist.delay", "from 0 to 86400"]),
    ("[greylist]\ndelai = 3\n", ["unknown key 'greylist.delai'", "delay"]),
    ("[grylist]\ndelay = 3\n", ["unknown key 'grylist'", "greylist"]),
    ("[helo]\nmode = \"loud\"\n", ["helo.mode", "'enforce', 'score', 'observe', 'off'"]),
    ("observe = 1\n", ["'observe'", "true or false"]),
    ("[policy]\nlisten = \"10023\"\n", ["policy.listen", "host:port"]),
    ("[dns]\nnameservers = [\"ns.example\"]\n", ["dns.nameservers", "IP addresses"]),
    ("[storage]\nurl = \"mysql://x\"\n", ["storage.url", "sqlite:///"]),
    ("[helo]\nexempt_networks = [\"10.0.0.0/33\"]\n", ["helo.exempt_networks", "CIDR"]),
    ("[greylist]\ntext = \"wait {minutes}\"\n", ["greylist.text", "{seconds}"]),
    ("[scores]\nNO_SUCH_SYMBOL = 1\n", ["scores.NO_SUCH_SYMBOL", "HELO_NOT_FQDN"]),
    ("[log]\ntarget = \"file\"\n", ["log.target", "'stderr', 'syslog'"]),
    ("[greylist\n", ["not valid TOML"]),
])
def test_bad_values_name_file_key_and_allowed(tmp_path: Path, text: str,
                                              needles: list[str]) -> None:
    p = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(p)
    msg = str(err.value)
    assert msg.startswith(str(p))
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_missing_file_is_one_clear_message(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


@pytest.mark.parametrize(("observe", "mode", "effective"), [
    (True, "enforce", Mode.OBSERVE),
    (True, "score", Mode.SCORE),  # control: observe only changes enforce
    (False, "enforce", Mode.ENFORCE),  # control: no global observe
    (True, "off", Mode.OFF),
])
def test_global_observe_turns_enforce_into_observe(tmp_path: Path, observe: bool, mode: str,
                                                   effective: Mode) -> None:
    p = write(tmp_path, f"observe = {str(observe).lower()}\n[helo]\nmode = \"{mode}\"\n")
    assert config.load(p).mode("helo") is effective


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[greylist]\ndelay = 42\n[scores]\nHELO_UNKNOWN = 4\n"))
    text = config.dump(cfg)
    again = config.load(write(tmp_path, text))
    assert again.greylist.delay == 42
    assert again.score("HELO_UNKNOWN") == 4.0
    assert again.score("HELO_INVALID") == config.SYMBOL_SCORES["HELO_INVALID"]


def test_every_key_has_a_doc() -> None:
    for key, _default, doc in config.iter_keys():
        assert doc, key


def test_readme_documents_every_key() -> None:
    from pathlib import Path as _P

    readme = (_P(__file__).resolve().parents[2] / "README.md").read_text()
    for key, _default, _doc in config.iter_keys():
        assert f"| `{key}` |" in readme, f"{key} missing: run scripts/gen_config_reference.py"


@pytest.mark.parametrize(("euid", "expected"), [
    (1000, "{home}/.local/state/mxguard"),
    (0, "/var/lib/mxguard"),  # control: root keeps the system location
])
def test_default_state_dir_works_as_root_and_as_a_user(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path, euid: int,
                                                       expected: str) -> None:
    monkeypatch.setattr(config.os, "geteuid", lambda: euid)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    cfg = config.load(None)
    assert cfg.state_dir == expected.format(home=tmp_path)
    assert cfg.storage_url.endswith(f"{cfg.state_dir}/mxguard.db")


async def test_the_store_creates_the_default_state_dir(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    from mxguard.checks.greylist import open_greylister

    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    greylister = await open_greylister(config.load(None))
    try:
        assert (tmp_path / ".local/state/mxguard/mxguard.db").exists()
    finally:
        await greylister.close()
