"""``mxguard postfix setup`` on real-world-shaped main.cf files, through a real
``postconf -c`` on temporary copies (no Postfix is started, ``postfix check``
is skipped with ``--no-check``: these config dirs point at no queue of ours).

Fixtures (tests/unit/fixtures/maincf/): ``debian.cf`` (Debian 12's generated
main.cf), ``seed.cf`` + ``master-seed.cf`` (the seed's set-up: HELO
restrictions, postgrey, policyd-spf spawned from master.cf, OpenDKIM, a
SpamAssassin content_filter), ``multiline.cf`` (multi-line lists, comments
inside, ``{ ... }`` groups, warn_if_reject), ``unusual.cf`` (no spaces
around ``=``, tabs, a parameter set twice, ``$references``), ``wired.cf``
(already wired: the control, nothing to change).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mxguard import config
from mxguard.cli.postfix import postfix
from mxguard.cli.postfix_apply import apply, revert
from mxguard.cli.postfix_conf import (
    Endpoint,
    endpoint_from_listen,
    find_command,
    insert_at,
    parse_endpoint,
    parse_restrictions,
    placement,
    remove_entry,
    tokenize,
)
from mxguard.cli.postfix_plan import Options, make_plan

FIXTURES = Path(__file__).parent / "fixtures" / "maincf"
REAL_WORLD = ("debian", "seed", "multiline", "unusual")
POLICY = "check_policy_service inet:127.0.0.1:10023"
HELO = "check_policy_service { inet:127.0.0.1:10023, policy_context=helo }"
MILTER = "inet:127.0.0.1:10024"
_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
                              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
                              else {})

needs_postconf = pytest.mark.skipif(find_command("postconf") is None,
                                    reason="postconf not installed (Debian package postfix)")


def settle(d: Path) -> Path:
    """Back-date the files: Postfix commands wait until main.cf is 2 s old."""
    old = time.time() - 10
    for name in ("main.cf", "master.cf"):
        os.utime(d / name, (old, old))
    return d


def confdir(tmp_path: Path, main: str, master: str = "master-debian",
            text: str | None = None) -> Path:
    d = tmp_path / "etc"
    d.mkdir(parents=True, exist_ok=True)
    if text is not None:
        (d / "main.cf").write_text(text)
    else:
        shutil.copyfile(FIXTURES / f"{main}.cf", d / "main.cf")
    shutil.copyfile(FIXTURES / f"{master}.cf", d / "master.cf")
    return settle(d)


def pc(d: Path, name: str, flag: str = "-h") -> str:
    out = subprocess.run(["postconf", "-c", str(settle(d)), flag, name], capture_output=True,
                         text=True, check=True).stdout
    return out.strip()


def entries(d: Path, name: str) -> list[str]:
    value = pc(d, name)
    return [" ".join(e.text(value).split()) for e in parse_restrictions(value)]


def cli(*args: str) -> Result:
    return CliRunner(**_RUNNER_KW).invoke(postfix, ["setup", *args], catch_exceptions=False)


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mxguard.toml"
    path.write_text(text)
    return str(path)


def digest(d: Path) -> str:
    return hashlib.sha256((d / "main.cf").read_bytes() + (d / "master.cf").read_bytes()
                          ).hexdigest()


# ------------------------------------------------------------------ parsing (no postconf)


def test_tokenize_keeps_brace_groups_whole() -> None:
    value = "permit_mynetworks,check_policy_service { inet:h:1, timeout=10s } ,\treject"
    assert [t.text for t in tokenize(value)] == [
        "permit_mynetworks", "check_policy_service", "{ inet:h:1, timeout=10s }", "reject"]
    nested = tokenize("a {x {y z} w} b")
    assert [t.text for t in nested] == ["a", "{x {y z} w}", "b"]
    assert [t.text for t in tokenize("a {unbalanced, b")] == ["a", "{unbalanced, b"]


def test_restrictions_group_names_with_their_arguments() -> None:
    value = ("permit_mynetworks warn_if_reject reject_unknown_helo_hostname "
             "check_client_access cidr:/x reject_rbl_client zen.example=127.0.0.2 "
             "check_policy_service { unix:private/spf, timeout=1s } sleep 1 permit")
    got = [(e.name, e.arg, e.prefixed) for e in parse_restrictions(value)]
    assert got == [
        ("permit_mynetworks", None, False),
        ("reject_unknown_helo_hostname", None, True),
        ("check_client_access", "cidr:/x", False),
        ("reject_rbl_client", "zen.example=127.0.0.2", False),
        ("check_policy_service", "{ unix:private/spf, timeout=1s }", False),
        ("sleep", "1", False),
        ("permit", None, False),
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ("inet:127.0.0.1:10023", Endpoint("inet", "127.0.0.1:10023")),
    ("inet:localhost:10023", Endpoint("inet", "127.0.0.1:10023")),
    ("inet:[::1]:10023", Endpoint("inet", "[::1]:10023")),
    ("127.0.0.1:10023", Endpoint("inet", "127.0.0.1:10023")),
    ("unix:private/mxguard", Endpoint("unix", "private/mxguard")),
    ("unix:/var/spool/postfix/private/mxguard", Endpoint("unix", "private/mxguard")),
    ("local:/run/x.sock", Endpoint("unix", "/run/x.sock")),
])
def test_endpoints_compare_as_postfix_connects(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text, "/var/spool/postfix") == expected


def test_listen_addresses_become_postfix_endpoints() -> None:
    assert str(endpoint_from_listen("127.0.0.1:10023")) == "inet:127.0.0.1:10023"
    assert str(endpoint_from_listen("0.0.0.0:10023")) == "inet:127.0.0.1:10023"
    assert str(endpoint_from_listen("[::1]:10024")) == "inet:[::1]:10024"
    assert str(endpoint_from_listen("unix:/var/spool/postfix/mxguard/policy")) == \
        "unix:mxguard/policy"


def test_text_edits_keep_the_rest_of_the_value() -> None:
    value = "permit_mynetworks,reject_unauth_destination  check_client_access cidr:/x"
    es = parse_restrictions(value)
    assert insert_at(value, es, 2, "NEW") == ("permit_mynetworks,reject_unauth_destination  "
                                              "NEW, check_client_access cidr:/x")
    assert insert_at(value, es, 3, "NEW") == value + ", NEW"
    spaced = "a b c"
    assert insert_at(spaced, parse_restrictions(spaced), 1, "NEW") == "a NEW b c"
    assert remove_entry(value, es, 1) == "permit_mynetworks,check_client_access cidr:/x"
    assert remove_entry(value, es, 2) == "permit_mynetworks,reject_unauth_destination"
    assert remove_entry("only", parse_restrictions("only"), 0) == ""


@pytest.mark.parametrize(("value", "index"), [
    ("permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination, "
     "check_recipient_access hash:/x, permit", 3),
    ("reject_unauth_destination, permit_mynetworks", 2),  # after the *last* anchor
    ("check_client_access hash:/x, permit", 1),  # no anchor: before the final permit
    ("check_client_access hash:/x", 1),  # no anchor, no final answer: at the end
    ("warn_if_reject reject_unauth_destination", 1),
])
def test_placement(value: str, index: int) -> None:
    anchors = ("permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination")
    assert placement(parse_restrictions(value), anchors) == index


# ------------------------------------------------------------------ through postconf


def nothing_lost(before: str, after: str) -> None:
    """Every comment and every line of a parameter we did not touch is still there."""
    touched = re.compile(r"^\s*(smtpd_helo_required|smtpd_\w+_restrictions|smtpd_milters|"
                         r"non_smtpd_milters|milter_default_action|milter_protocol|"
                         r"smtpd_policy_service_default_action)\s*=")
    kept = after.splitlines()
    in_touched = False
    for line in before.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            in_touched = bool(touched.match(line))
        if line.lstrip().startswith("#") or (line.strip() and not in_touched):
            assert line in kept, f"lost: {line!r}"


@needs_postconf
@pytest.mark.parametrize("name", REAL_WORLD)
def test_real_world_main_cf_is_wired_and_nothing_is_lost(tmp_path: Path, name: str) -> None:
    d = confdir(tmp_path, name, "master-seed" if name == "seed" else "master-debian")
    before = (d / "main.cf").read_text()
    lists_before = {n: entries(d, n) for n in ("smtpd_helo_restrictions",
                                               "smtpd_recipient_restrictions",
                                               "smtpd_data_restrictions", "smtpd_milters")}
    explicit_before = subprocess.run(["postconf", "-c", str(d), "-n"], capture_output=True,
                                     text=True, check=True).stdout.splitlines()
    plan = make_plan(config.Config(), d)
    apply(plan)
    nothing_lost(before, (d / "main.cf").read_text())
    # the other parameters keep their values
    explicit_after = subprocess.run(["postconf", "-c", str(settle(d)), "-n"],
                                    capture_output=True, text=True, check=True).stdout.splitlines()
    changed = {c.args[1].partition(" = ")[0] for c in plan.changes if c.args[0] == "-e"}
    for line in explicit_before:
        if line.partition(" =")[0] not in changed:
            assert line in explicit_after
    # every old entry is still there, in order
    for param, old in lists_before.items():
        new = entries(d, param)
        assert [e for e in new if e in old] == old, param
    assert pc(d, "smtpd_helo_required") == "yes"
    assert HELO in entries(d, "smtpd_helo_restrictions")
    rcpt = entries(d, "smtpd_recipient_restrictions")
    assert rcpt.count(POLICY) == 1
    assert rcpt.index("reject_unauth_destination") < rcpt.index(POLICY)
    assert POLICY in entries(d, "smtpd_data_restrictions") or "$" in pc(
        d, "smtpd_data_restrictions")
    assert pc(d, "smtpd_policy_service_default_action") == "DUNNO"
    assert pc(d, "milter_default_action") == "tempfail"
    assert pc(d, "milter_protocol") == "6"
    for milters in ("smtpd_milters", "non_smtpd_milters"):
        expanded = pc(d, milters, "-xh")
        found = [parse_endpoint(t.text.strip("{} ").split(",")[0]) for t in tokenize(expanded)]
        assert found.count(Endpoint("inet", "127.0.0.1:10024")) == 1, milters
    # idempotent: a second run has nothing to do
    assert make_plan(config.Config(), d).changes == []


@needs_postconf
def test_multiline_entries_go_right_after_the_anchors(tmp_path: Path) -> None:
    d = confdir(tmp_path, "multiline")
    apply(make_plan(config.Config(), d))
    assert entries(d, "smtpd_helo_restrictions")[:4] == [
        "permit_mynetworks", "permit_sasl_authenticated", HELO,
        "check_helo_access hash:/etc/postfix/helo_access"]
    rcpt = entries(d, "smtpd_recipient_restrictions")
    assert rcpt[2:5] == ["reject_unauth_destination", POLICY,
                         "check_recipient_access pcre:/etc/postfix/recipient_access.pcre"]
    assert rcpt[-1] == "permit"  # the final permit stays last
    # grouped entries survive whole, with their spaces
    assert "check_policy_service { unix:postgrey/socket, default_action = DUNNO }" in rcpt
    assert pc(d, "smtpd_milters").endswith(", inet:127.0.0.1:10024")
    assert pc(d, "non_smtpd_milters") == "$smtpd_milters"  # follows by reference
    text = (d / "main.cf").read_text()
    assert "        # never an open relay\n" in text and "# end of file\n" in text


@needs_postconf
def test_missing_reject_unauth_destination_is_added_before_ours(tmp_path: Path) -> None:
    d = confdir(tmp_path, "", text="smtpd_recipient_restrictions = permit_mynetworks, "
                "check_client_access hash:/etc/postfix/access\n")
    apply(make_plan(config.Config(), d))
    assert entries(d, "smtpd_recipient_restrictions") == [
        "permit_mynetworks", "reject_unauth_destination", POLICY,
        "check_client_access hash:/etc/postfix/access"]


@needs_postconf
def test_an_empty_list_gets_the_readme_wiring(tmp_path: Path) -> None:
    d = confdir(tmp_path, "debian")
    apply(make_plan(config.Config(), d))
    assert entries(d, "smtpd_recipient_restrictions") == [
        "permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination", POLICY]
    assert entries(d, "smtpd_helo_restrictions") == [
        "permit_mynetworks", "permit_sasl_authenticated", HELO]
    assert entries(d, "smtpd_data_restrictions") == [POLICY]
    assert pc(d, "milter_default_action") == "tempfail"  # Postfix's default: not written
    assert "milter_default_action" not in (d / "main.cf").read_text()


@needs_postconf
def test_helo_entry_without_policy_context_is_upgraded(tmp_path: Path) -> None:
    d = confdir(tmp_path, "", text="smtpd_helo_restrictions = permit_mynetworks, "
                "check_policy_service inet:127.0.0.1:10023, permit\n")
    apply(make_plan(config.Config(), d))
    assert entries(d, "smtpd_helo_restrictions") == ["permit_mynetworks", HELO, "permit"]


@needs_postconf
def test_seed_entries_stay_unless_replace_seed(tmp_path: Path) -> None:
    cfg_text = ('[policy]\nlisten = "127.0.0.1:10025"\n'
                '[milter]\nlisten = "127.0.0.1:10026"\n')
    cfg = config.load(toml(tmp_path, cfg_text))
    d = confdir(tmp_path, "seed", "master-seed")
    plan = make_plan(cfg, d)
    assert any("--replace-seed removes it" in n for n in plan.notes)
    apply(plan)
    assert "reject_unknown_helo_hostname" in entries(d, "smtpd_helo_restrictions")
    assert "check_policy_service inet:127.0.0.1:10023" in entries(
        d, "smtpd_recipient_restrictions")
    # control above; now with --replace-seed on a fresh copy
    d2 = confdir(tmp_path / "two", "seed", "master-seed")
    apply(make_plan(cfg, d2, Options(replace_seed=True)))
    helo = entries(d2, "smtpd_helo_restrictions")
    assert helo == ["permit_mynetworks",
                    "check_policy_service { inet:127.0.0.1:10025, policy_context=helo }"]
    assert entries(d2, "smtpd_recipient_restrictions") == [
        "permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination",
        "check_policy_service inet:127.0.0.1:10025"]
    master = (d2 / "master.cf").read_text()
    assert "#policy-spf unix - n n - - spawn" in master
    assert "\nspamassassin unix" in master  # not asked: kept
    assert "#policy-spf_time_limit = 3600s" in (d2 / "main.cf").read_text()
    # OpenDKIM's milter is kept, ours is appended
    assert pc(d2, "smtpd_milters") == "inet:localhost:10024, inet:127.0.0.1:10026"
    assert make_plan(cfg, d2, Options(replace_seed=True)).changes == []


@needs_postconf
def test_unix_sockets_are_written_relative_to_the_queue(tmp_path: Path) -> None:
    cfg = config.load(toml(tmp_path, '[policy]\nlisten = "unix:/var/spool/postfix/mxguard/p"\n'
                                     '[milter]\nlisten = "unix:/var/spool/postfix/mxguard/m"\n'))
    d = confdir(tmp_path, "debian")
    apply(make_plan(cfg, d))
    assert entries(d, "smtpd_data_restrictions") == ["check_policy_service unix:mxguard/p"]
    assert pc(d, "smtpd_milters") == "unix:mxguard/m"


@needs_postconf
def test_milter_disabled_leaves_milters_alone(tmp_path: Path) -> None:
    cfg = config.load(toml(tmp_path, "[milter]\nenabled = false\n"))
    d = confdir(tmp_path, "unusual")
    plan = make_plan(cfg, d)
    assert not any("milter" in c.args[1] for c in plan.changes if c.args[0] == "-e")


@needs_postconf
def test_the_printed_commands_do_what_apply_does(tmp_path: Path) -> None:
    by_hand = confdir(tmp_path / "a", "multiline")
    other = tmp_path / "b"
    shutil.copytree(by_hand, other)
    result = cli("--config-dir", str(by_hand), "--replace-seed")
    assert result.exit_code == 0, result.output
    commands = [line.strip() for line in result.output.splitlines()
                if line.startswith("  postconf -c ")]
    assert commands
    for command in commands:
        subprocess.run(shlex.split(command), check=True, capture_output=True)
    apply(make_plan(config.Config(), other, Options(replace_seed=True)))
    assert (by_hand / "main.cf").read_text() == (other / "main.cf").read_text()


# ------------------------------------------------------------------ CLI, backup, revert


@needs_postconf
def test_dry_run_shows_a_diff_and_changes_nothing(tmp_path: Path) -> None:
    d = confdir(tmp_path, "debian")
    before = digest(d)
    result = cli("--config-dir", str(d))
    assert result.exit_code == 0
    assert f"+smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, " \
           f"reject_unauth_destination, {POLICY}" in result.output
    assert "dry run: nothing was changed" in result.output
    assert digest(d) == before
    assert sorted(p.name for p in d.iterdir()) == ["main.cf", "master.cf"]


@needs_postconf
def test_apply_backs_up_is_idempotent_and_reverts(tmp_path: Path) -> None:
    d = confdir(tmp_path, "unusual")
    original = (d / "main.cf").read_bytes()
    first = cli("--apply", "--no-check", "--config-dir", str(d))
    assert first.exit_code == 0, first.output
    backups = sorted(p for p in d.iterdir() if ".mxguard-" in p.name)
    assert [p.name.split(".mxguard-")[0] for p in backups] == ["main.cf"]
    assert backups[0].read_bytes() == original
    wired = (d / "main.cf").read_bytes()
    assert wired != original
    second = cli("--apply", "--no-check", "--config-dir", str(d))
    assert second.exit_code == 0
    assert "nothing to change" in second.output
    assert sorted(p for p in d.iterdir() if ".mxguard-" in p.name) == backups  # no new backup
    back = cli("--revert", "--no-check", "--config-dir", str(d))
    assert back.exit_code == 0, back.output
    assert (d / "main.cf").read_bytes() == original
    again = cli("--revert", "--no-check", "--config-dir", str(d))
    assert again.exit_code == 1
    assert "no mxguard backup" in (again.stderr if hasattr(again, "stderr") else again.output)


@needs_postconf
def test_revert_steps_back_one_apply_at_a_time(tmp_path: Path) -> None:
    d = confdir(tmp_path, "seed", "master-seed")
    original = digest(d)
    assert cli("--apply", "--no-check", "--config-dir", str(d)).exit_code == 0
    middle = digest(d)
    assert cli("--apply", "--no-check", "--replace-seed", "--config-dir", str(d)).exit_code == 0
    assert digest(d) != middle
    revert(d)
    assert digest(d) == middle
    revert(d)
    assert digest(d) == original


@needs_postconf
def test_already_wired_config_has_nothing_to_change(tmp_path: Path) -> None:  # control
    d = confdir(tmp_path, "wired")
    before = digest(d)
    result = cli("--apply", "--no-check", "--config-dir", str(d))
    assert result.exit_code == 0
    assert "nothing to change: Postfix is wired to mxguard" in result.output
    assert digest(d) == before
    assert not [p for p in d.iterdir() if ".mxguard-" in p.name]


@needs_postconf
def test_other_ports_in_config_are_not_mistaken_for_ours(tmp_path: Path) -> None:
    cfg = config.load(toml(tmp_path, '[policy]\nlisten = "127.0.0.1:12000"\n'))
    d = confdir(tmp_path, "wired")
    plan = make_plan(cfg, d)
    assert any("check_policy_service inet:127.0.0.1:12000" in c.args[1] for c in plan.changes)


def test_missing_main_cf_is_one_clear_line(tmp_path: Path) -> None:
    result = cli("--config-dir", str(tmp_path / "nope"))
    assert result.exit_code == 2
    text = result.stderr if hasattr(result, "stderr") else result.output
    assert "main.cf not found" in text
    assert "Traceback" not in result.output
