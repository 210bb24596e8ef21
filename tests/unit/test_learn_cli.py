"""``mxguard learn`` and ``mxguard bayes stats`` through click's CliRunner:
single files, directories, mbox, Maildir, stdin; progress; --forget; errors."""

from __future__ import annotations

import asyncio
import inspect
import io
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli.learn import bayes, learn, path_messages
from mxguard.store.bayes_store import SqliteBayesStore

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
    assert int(rows["tokens"]) > 10


def test_expire_command(conf: Path) -> None:
    code, out, _ = run(bayes, "expire", "--config", str(conf))
    assert code == 0 and out == "expired\t0\n"


def test_stdin_reader_directly() -> None:
    items = list(path_messages("-", stdin=io.BytesIO(b"")))
    assert items[0].error == "empty input"
