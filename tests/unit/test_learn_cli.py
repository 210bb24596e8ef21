"""``mxguard learn`` and ``mxguard bayes stats`` through click's CliRunner:
single files, directories, mbox, Maildir, stdin; progress; --forget; errors."""

from __future__ import annotations

import asyncio
import inspect
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli.learn import bayes, learn, path_messages
from mxguard.store.bayes_store import SqliteBayesStore
from tests.support.redis import redis_url  # noqa: F401 - fixture

_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
                              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
                              else {})


def message(n: int, subject: str = "hello", body: str = "some body text") -> bytes:
    return (f"From: sender{n}@example.com\nTo: rcpt@example.org\nSubject: {subject} {n}\n"
            f"Message-ID: <msg{n}@example.com>\n\n{body} number {n}\n").encode()


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "mxguard.toml"
    path.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/state/mxguard.db"\n'
                    "[bayes]\nmin_spam = 2\nmin_ham = 2\n")
    return path


def run(cmd: Any, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner(**_RUNNER_KW).invoke(cmd, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def totals(tmp_path: Path) -> tuple[int, int, int]:
    async def go() -> tuple[int, int, int]:
        s = SqliteBayesStore(str(tmp_path / "state" / "mxguard-bayes.db"))
        st = await s.stats()
        await s.close()
        return st.nspam, st.nham, st.seen
    return asyncio.run(go())


def make_mbox(path: Path, n: int) -> None:
    chunks = []
    for i in range(n):
        body = message(100 + i).decode()
        # a body line starting with "From " that is no separator, and a quoted one
        body += "From here on it is a body line\n>From quoted line\n"
        chunks.append(f"From sender{i}@example.com Mon Jan  1 00:00:0{i} 2024\n{body}\n")
    path.write_text("".join(chunks))


def make_maildir(root: Path, n_cur: int, n_new: int, base: int = 200) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    for i in range(n_cur):
        (root / "cur" / f"{i}.host:2,S").write_bytes(message(base + i))
    for i in range(n_new):
        (root / "new" / f"{i}.host").write_bytes(message(base + 100 + i))
    (root / "tmp" / "partial").write_bytes(message(base + 199))  # tmp/ is never read


# ------------------------------------------------------------ sources


def test_single_files(conf: Path, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"m{i}.eml"
        f.write_bytes(message(i))
        files.append(str(f))
    code, out, _ = run(learn, "--config", str(conf), "--spam", *files)
    assert code == 0, out
    assert out.startswith("learned 3, already known 0, errors 0")
    assert totals(tmp_path) == (3, 0, 3)


def test_directory_recursive_skips_hidden(conf: Path, tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "a" / "b").mkdir(parents=True)
    (d / "one").write_bytes(message(1))
    (d / "a" / "two").write_bytes(message(2))
    (d / "a" / "b" / "three").write_bytes(message(3))
    (d / ".hidden").write_bytes(message(4))
    code, out, _ = run(learn, "--config", str(conf), "--ham", str(d))
    assert code == 0
    assert "learned 3," in out
    assert totals(tmp_path) == (0, 3, 3)


def test_mbox_split_and_unquote(tmp_path: Path, conf: Path) -> None:
    mbox = tmp_path / "box.mbox"
    make_mbox(mbox, 3)
    items = list(path_messages(str(mbox)))
    assert [i.where for i in items] == [f"{mbox}#{n}" for n in (1, 2, 3)]
    assert all(b"From here on it is a body line" in i.data for i in items)
    assert all(b"\nFrom quoted line" in i.data for i in items)  # >From unquoted
    assert not any(i.data.startswith(b"From ") for i in items)
    code, out, _ = run(learn, "--config", str(conf), "--spam", str(mbox))
    assert code == 0 and "learned 3," in out


def test_corpus_style_file_with_from_line_is_one_message(tmp_path: Path) -> None:
    f = tmp_path / "spam.00001"
    f.write_bytes(b"From someone@example.com  Fri Aug 23 11:02:50 2002\n" + message(1))
    items = list(path_messages(str(f)))
    assert len(items) == 1 and items[0].data.startswith(b"From: sender1@")


def test_maildir(conf: Path, tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    make_maildir(md, 2, 1)
    make_maildir(md / ".Spam", 1, 1, base=1000)  # a Maildir++ subfolder is walked too
    code, out, _ = run(learn, "--config", str(conf), "--ham", str(md))
    assert code == 0
    assert "learned 5," in out  # tmp/ never read
    assert totals(tmp_path) == (0, 5, 5)


def test_mbox_and_maildir_options(conf: Path, tmp_path: Path) -> None:
    mbox = tmp_path / "box"
    make_mbox(mbox, 3)
    # an mbox whose first line is no From_ line (a cut-off export): still split
    text = mbox.read_text()
    headless = tmp_path / "headless"
    headless.write_text(text[text.index("\n") + 1:])
    md = tmp_path / "Maildir"
    make_maildir(md, 2, 1)
    code, out, err = run(learn, "--config", str(conf), "--spam", "--progress", "--mbox",
                         str(mbox), "--maildir", str(md))
    assert code == 0, err
    assert out.startswith("learned 6, already known 0, errors 0")
    assert "\r" in err and "msgs/s" in err  # the progress line, as for PATHs
    code, out, _ = run(learn, "--config", str(conf), "--ham", "--mbox", str(headless))
    assert code == 0 and out.startswith("learned 3, already known 0, moved from the other "
                                        "class 3")
    assert totals(tmp_path) == (3, 3, 6)


@pytest.mark.parametrize(("option", "make", "needle"), [
    ("--maildir", "dir", "not a Maildir (needs cur/ and new/)"),
    ("--maildir", "missing", "not a Maildir"),
    ("--mbox", "missing", "No such file or directory"),
])
def test_mbox_and_maildir_errors(conf: Path, tmp_path: Path, option: str, make: str,
                                 needle: str) -> None:
    target = tmp_path / "target"
    if make == "dir":
        target.mkdir()
        (target / "message").write_bytes(message(1))  # a directory, but no Maildir
    code, out, err = run(learn, "--config", str(conf), "--spam", option, str(target))
    assert code == 1 and out.startswith("learned 0, already known 0, errors 1")
    assert needle in err and "Traceback" not in err


def test_stdin(conf: Path, tmp_path: Path) -> None:
    code, out, _ = run(learn, "--config", str(conf), "--spam", "-", stdin=message(7))
    assert code == 0 and "learned 1," in out


# ------------------------------------------------------------ behaviour


def test_learning_again_counts_known_and_other_class_moves(conf: Path, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for i in range(4):
        (d / str(i)).write_bytes(message(i))
    run(learn, "--config", str(conf), "--spam", str(d))
    code, out, _ = run(learn, "--config", str(conf), "--spam", str(d))
    assert code == 0 and out.startswith("learned 0, already known 4")
    code, out, _ = run(learn, "--config", str(conf), "--ham", str(d / "0"))
    assert "learned 1," in out and "moved from the other class 1" in out
    assert totals(tmp_path) == (3, 1, 4)


def test_forget(conf: Path, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        (d / str(i)).write_bytes(message(i))
    run(learn, "--config", str(conf), "--spam", str(d))
    code, out, _ = run(learn, "--config", str(conf), "--forget", str(d / "0"), str(d / "1"))
    assert code == 0 and out.startswith("forgot 2, not learned 0, errors 0")
    code, out, _ = run(learn, "--config", str(conf), "--forget", str(d / "0"))
    assert out.startswith("forgot 0, not learned 1")
    assert totals(tmp_path) == (1, 0, 1)


def test_progress_line(conf: Path, tmp_path: Path) -> None:
    mbox = tmp_path / "big.mbox"
    make_mbox(mbox, 5)
    code, out, err = run(learn, "--config", str(conf), "--spam", "--progress", str(mbox))
    assert code == 0 and out.startswith("learned 5,")  # summary on stdout
    assert "\r" in err and "msgs/s" in err and "learned 5" in err
    assert err.endswith("\n")
    code, _, err = run(learn, "--config", str(conf), "--spam", "--no-progress", str(mbox))
    assert code == 0 and err == ""  # control: no progress asked


def test_errors_are_counted_and_exit_1(conf: Path, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(message(1))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    code, out, err = run(learn, "--config", str(conf), "--spam", str(good), str(empty),
                         str(tmp_path / "missing"))
    assert code == 1
    assert out.startswith("learned 1, already known 0, errors 2")
    assert "missing: no such file" in err and "empty: empty file" in err


def test_needs_spam_or_ham(conf: Path, tmp_path: Path) -> None:
    code, _, err = run(learn, "--config", str(conf), str(tmp_path))
    assert code == 2 and "--spam or --ham" in err
    # both at once would learn everything as whichever came last: refused
    code, _, err = run(learn, "--config", str(conf), "--spam", str(tmp_path), "--ham")
    assert code == 2 and "not both" in err


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[bayes]\nmin_spam = -1\n")
    code, _, err = run(learn, "--config", str(bad), "--spam", str(tmp_path))
    assert code == 2 and "config error" in err and "Traceback" not in err


def test_stats(conf: Path, tmp_path: Path) -> None:
    code, out, _ = run(bayes, "stats", "--config", str(conf))
    assert code == 0
    rows = dict(line.split("\t", 1) for line in out.splitlines())
    assert rows["tokens"] == "0" and rows["ready"].startswith("no (needs 2 more spam")
    assert rows["autolearn"].startswith("cold start: autolearn takes only spam scoring >= 15")
    d = tmp_path / "d"
    d.mkdir()
    for i in range(2):
        (d / f"s{i}").write_bytes(message(i, "cheap pills"))
        (d / f"h{i}").write_bytes(message(10 + i, "meeting notes"))
    run(learn, "--config", str(conf), "--spam", str(d / "s0"), str(d / "s1"))
    run(learn, "--config", str(conf), "--ham", str(d / "h0"), str(d / "h1"))
    code, out, _ = run(bayes, "stats", "--config", str(conf))
    rows = dict(line.split("\t", 1) for line in out.splitlines())
    assert (rows["nspam"], rows["nham"], rows["ready"]) == ("2", "2", "yes")
    assert rows["autolearn"] == "usual thresholds"
    assert int(rows["tokens"]) > 10


def test_expire_command(conf: Path) -> None:
    code, out, _ = run(bayes, "expire", "--config", str(conf))
    assert code == 0 and out == "expired\t0\n"


def test_stdin_reader_directly() -> None:
    items = list(path_messages("-", stdin=io.BytesIO(b"")))
    assert items[0].error == "empty input"



# ------------------------------------------------------------ --stdin (Dovecot's pipe)

# One message into Junk, again, back out, again, forgotten, forgotten again:
# (flags, summary the step prints, (nspam, nham, seen) after it). Each step
# that changes nothing is the control of the one before it.
STDIN_STEPS: list[tuple[tuple[str, ...], str, tuple[int, int, int]]] = [
    (("--spam",), "learned 1, already known 0, errors 0", (1, 0, 1)),
    (("--spam",), "learned 0, already known 1, errors 0", (1, 0, 1)),
    (("--ham",), "learned 1, already known 0, moved from the other class 1", (0, 1, 1)),
    (("--ham",), "learned 0, already known 1, errors 0", (0, 1, 1)),
    (("--forget",), "forgot 1, not learned 0", (0, 0, 0)),
    (("--forget",), "forgot 0, not learned 1", (0, 0, 0)),
]


def test_stdin_flag_learns_once_moves_and_forgets(conf: Path, tmp_path: Path) -> None:
    for flags, summary, want in STDIN_STEPS:
        code, out, err = run(learn, "--config", str(conf), "--stdin", *flags, stdin=message(1))
        assert code == 0, (flags, err)
        assert out.startswith(summary), (flags, out)
        assert totals(tmp_path) == want, flags


def test_stdin_same_body_other_trace_headers_is_the_same_message(conf: Path,
                                                                 tmp_path: Path) -> None:
    """What Dovecot pipes has delivery headers on top; the key is Message-ID + body."""
    delivered = (b"Return-Path: <sender1@example.com>\nDelivered-To: rcpt@example.org\n"
                 b"Received: from mx.example.org by imap.example.org; Tue, 1 Dec 2026\n"
                 b"X-Spam-Status: No, score=1.0\n" + message(1))
    run(learn, "--config", str(conf), "--stdin", "--spam", stdin=message(1))
    code, out, _ = run(learn, "--config", str(conf), "--stdin", "--spam", stdin=delivered)
    assert code == 0 and out.startswith("learned 0, already known 1")
    # CRLF line ends (as the MX saw it) are the same message as LF (as the mailbox has it)
    code, out, _ = run(learn, "--config", str(conf), "--stdin", "--spam",
                       stdin=delivered.replace(b"\n", b"\r\n"))
    assert code == 0 and out.startswith("learned 0, already known 1")
    # control: another body is another message
    code, out, _ = run(learn, "--config", str(conf), "--stdin", "--spam",
                       stdin=message(1, body="another text"))
    assert code == 0 and out.startswith("learned 1, already known 0")
    assert totals(tmp_path) == (2, 0, 2)


@pytest.mark.parametrize(("args", "stdin", "code", "needle"), [
    (("--stdin", "--spam", "x.eml"), b"", 2, "give no PATH, --mbox or --maildir with it"),
    (("--stdin", "--spam", "--mbox", "x.mbox"), b"", 2, "give no PATH, --mbox or --maildir"),
    (("--spam",), b"", 2, "or --stdin"),
    (("--stdin",), b"", 2, "--spam or --ham"),
    (("--stdin", "--spam"), b"", 1, "-: empty input"),
    (("--stdin", "--spam"), b" \n\n", 1, "-: empty input"),
    (("--stdin", "--spam"), None, 0, ""),  # control: a message is learned
])
def test_stdin_errors(conf: Path, args: tuple[str, ...], stdin: bytes | None, code: int,
                      needle: str) -> None:
    got, out, err = run(learn, "--config", str(conf), *args,
                        stdin=message(3) if stdin is None else stdin)
    assert got == code, (out, err)
    assert needle in err
    assert "Traceback" not in err


def test_stdin_unwritable_store_is_one_line_exit_1(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be\n")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[storage]\nurl = "sqlite:///{blocker}/mxguard.db"\n')
    code, out, err = run(learn, "--config", str(bad), "--stdin", "--spam", stdin=message(1))
    assert code == 1 and out == ""
    assert err.startswith("mxguard: ") and "cannot open" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_stdin_into_redis(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    conf = tmp_path / "redis.toml"
    conf.write_text(f'[storage]\nurl = "{redis_url}"\n')
    for flags, summary, _ in STDIN_STEPS[:3]:
        code, out, err = run(learn, "--config", str(conf), "--stdin", *flags, stdin=message(5))
        assert code == 0, err
        assert out.startswith(summary)
    code, out, _ = run(bayes, "stats", "--config", str(conf))
    rows = dict(line.split("\t", 1) for line in out.splitlines())
    assert (rows["nspam"], rows["nham"], rows["messages_learned"]) == ("0", "1", "1")


# ------------------------------------------------------------ learn dovecot-setup


def setup_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["dovecot-setup", "--sieve-dir", str(tmp_path / "sieve"),
            "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "conf.d"),
            "--mxguard", "/opt/mxguard/bin/mxguard", *extra]


@pytest.mark.parametrize(("extra", "present", "absent"), [
    ((), ["sieve_pipe_bin_dir = {t}/bin", "exec /opt/mxguard/bin/mxguard learn --stdin --spam",
          "exec /opt/mxguard/bin/mxguard learn --stdin --ham", "imapsieve_mailbox1_name = Junk",
          "imapsieve_mailbox1_causes = COPY APPEND", "imapsieve_mailbox2_from = Junk",
          "imapsieve_mailbox2_causes = COPY", '"Trash"', 'pipe :copy "mxguard-learn-spam"',
          'pipe :copy "mxguard-learn-ham"', "+vnd.dovecot.pipe",
          "mail_plugins = $mail_plugins imap_sieve",
          "imapsieve_mailbox1_before = file:{t}/sieve/report-spam.sieve"],
     ["service ", "sieve_pipe_socket_dir", "--config"]),
    (("--run-as", "mxguard", "--mail-user", "vmail"),
     ["service mxguard-learn-spam {", "executable = script {t}/bin/mxguard-learn-spam",
      "user = mxguard", "user = vmail", "sieve_pipe_socket_dir = ."],
     ["sieve_pipe_bin_dir ="]),
    (("--junk", "Spam", "--trash", "Deleted Items"),
     ["imapsieve_mailbox1_name = Spam", "imapsieve_mailbox2_from = Spam", '"Deleted Items"'],
     ["= Junk", '"Trash"']),
])
def test_dovecot_setup_print(tmp_path: Path, extra: tuple[str, ...], present: list[str],
                             absent: list[str]) -> None:
    code, out, err = run(learn, *setup_args(tmp_path, *extra))
    assert code == 0, err
    for needle in present:
        assert needle.replace("{t}", str(tmp_path)) in out, needle
    for needle in absent:
        assert needle not in out, needle
    assert not any(tok in out for tok in ("@MXGUARD@", "@CONFIG@", "@JUNK@", "@TRASH@",
                                          "@SIEVE_DIR@", "@PIPE_PLUGIN@", "@PIPE_SERVICES@"))


@pytest.mark.parametrize(("extra", "needle"), [
    (("--junk", 'Ju"nk'), "--junk"),
    (("--trash", "Tr*sh"), "--trash"),
    (("--sieve-dir", "relative/dir"), "--sieve-dir"),
    (("--run-as", "root; rm -rf /"), "--run-as"),
    (("--mail-user", "a b"), "--mail-user"),
])
def test_dovecot_setup_bad_values_are_usage_errors(tmp_path: Path, extra: tuple[str, ...],
                                                   needle: str) -> None:
    code, _, err = run(learn, *setup_args(tmp_path), *extra)
    assert code == 2 and needle in err and "Traceback" not in err


def test_dovecot_setup_install_writes_runnable_programs(conf: Path, tmp_path: Path) -> None:
    """The programs Dovecot runs: fed a message on stdin, they learn it."""
    args = setup_args(tmp_path, "--install", "--config", str(conf))
    args[args.index("--mxguard") + 1] = f"{sys.executable} -m mxguard"
    code, out, err = run(learn, *args)
    assert code == 0, err
    assert out.count("wrote ") == 5 and "sievec" in out
    spam = tmp_path / "bin" / "mxguard-learn-spam"
    ham = tmp_path / "bin" / "mxguard-learn-ham"
    assert spam.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "sieve" / "report-spam.sieve").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "conf.d" / "90-mxguard-imapsieve.conf").is_file()
    res = subprocess.run([str(spam)], input=message(9), capture_output=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert totals(tmp_path) == (1, 0, 1)
    res = subprocess.run([str(ham)], input=message(9), capture_output=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert totals(tmp_path) == (0, 1, 1)
    # control: an empty message is an error Dovecot logs (exit 1), nothing learned
    res = subprocess.run([str(spam)], input=b"", capture_output=True, timeout=120, check=False)
    assert res.returncode == 1 and b"empty input" in res.stderr
    assert totals(tmp_path) == (0, 1, 1)


def test_dovecot_setup_install_never_follows_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "mxguard-learn-spam").symlink_to(victim)
    code, _, err = run(learn, *setup_args(tmp_path, "--install"))
    assert code == 1 and "cannot write" in err and "mxguard-learn-spam" in err
    assert victim.read_text() == "keep me\n"
    # control: a regular file there is replaced
    (tmp_path / "bin" / "mxguard-learn-spam").unlink()
    (tmp_path / "bin" / "mxguard-learn-spam").write_text("old\n")
    code, _, err = run(learn, *setup_args(tmp_path, "--install"))
    assert code == 0, err
    assert "learn --stdin --spam" in (tmp_path / "bin" / "mxguard-learn-spam").read_text()


def test_dovecot_setup_is_a_subcommand_of_learn() -> None:
    code, out, _ = run(learn, "dovecot-setup", "--help")
    assert code == 0 and "--run-as" in out and "--install" in out
    code, out, _ = run(learn, "--help")
    assert code == 0 and "dovecot-setup" in out and "--stdin" in out
