"""``mxguard learn`` and ``mxguard bayes ...``: teach and inspect the Bayes store.

``mxguard learn --spam|--ham [--forget] PATH...`` reads messages from

* single message files (an mbox ``From`` line at the top is allowed),
* directories, recursively (hidden files and Maildir ``tmp/`` are skipped),
* Maildir folders (``cur/`` and ``new/``),
* mbox files (split at ``From`` lines that are followed by a header line;
  ``>From`` quoting is undone),
* ``-``: one message from standard input,

and from ``--mbox FILE`` (an mbox, whatever its first line) and ``--maildir
DIR`` (must be a Maildir; its Maildir++ subfolders too),

parses them like the daemon does, and learns them in batches (one store
transaction per batch, so it is safe beside a running daemon). A message
learned before as the same class is counted once ("already known"); learned
as the other class, it is moved. ``--forget`` subtracts what was learned.

Progress goes to stderr (a ``\\r`` line with counts and messages per second,
when stderr is a terminal or with ``--progress``); one summary line goes to
stdout. Exit status: 0, or 1 when any message could not be read or the store
could not be written (one ``mxguard: ...`` line on stderr); 2 for usage and
config errors.

``mxguard learn --stdin --spam|--ham [--forget]`` learns the one message on
standard input: what Dovecot's IMAPSieve pipe programs run for every message a
user moves into or out of Junk (it skips the expiry pass; the daemon expires).
``mxguard learn dovecot-setup`` prints or installs those scripts and programs
(package data in ``mxguard/data/sieve/``, filled in by :func:`dovecot_files`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from mxguard import config
from mxguard.checks.bayes import cold_start_policy
from mxguard.cli.common import config_option, fail, load_or_exit
from mxguard.content.bayes import BayesClassifier, message_key_of
from mxguard.content.mime import parse_message
from mxguard.content.tokenizer import tokenize_message
from mxguard.store.backends import open_bayes_store
from mxguard.store.base import StoreError
from mxguard.store.bayes_store import FORGOTTEN, KNOWN, LEARNED, RELEARNED, UNKNOWN

T = TypeVar("T")

BATCH_MESSAGES = 100  # messages per store transaction
BATCH_SECONDS = 0.5  # ... or this much parsing, whichever comes first
PROGRESS_INTERVAL = 0.2
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a "message" larger than this is an error

_with_config = config_option("mxguard TOML config file (default: built-in)", metavar=None)

_MBOX_FROM = re.compile(rb"^From \S+.*\d\d:\d\d")
_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_QUOTED_FROM = re.compile(rb"^>+From ")


# ------------------------------------------------------------ message sources


@dataclass(frozen=True, slots=True)
class Item:
    """One message to learn (``data``) or one that could not be read (``error``)."""

    where: str
    data: bytes = b""
    error: str = ""


def is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def _mbox_messages(fh: IO[bytes], where: str) -> Iterator[Item]:
    """Messages of an mbox stream, split at ``From `` lines followed by a header."""
    lines: list[bytes] = []
    pending: bytes | None = None  # a From_ line waiting for its next line
    n = 0

    def flush() -> Item | None:
        nonlocal n
        if not any(line.strip() for line in lines):
            return None
        n += 1
        data = b"".join(_QUOTED_FROM.sub(lambda m: m.group(0)[1:], line) for line in lines)
        lines.clear()
        return Item(f"{where}#{n}", data)

    for line in fh:
        if pending is not None:
            if _HEADER_LINE.match(line):
                item = flush()
                if item is not None:
                    yield item
            else:
                lines.append(pending)
            pending = None
            lines.append(line)
            continue
        if _MBOX_FROM.match(line):
            pending = line
            continue
        lines.append(line)
    if pending is not None:
        lines.append(pending)
    item = flush()
    if item is not None:
        yield item


def file_messages(path: Path) -> Iterator[Item]:
    """One message, or the messages of an mbox file."""
    where = str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(5)
            fh.seek(0)
            if head == b"From ":
                yield from _mbox_messages(fh, where)
                return
            data = fh.read(MAX_MESSAGE_BYTES + 1)
    except OSError as exc:
        yield Item(where, error=exc.strerror or str(exc))
        return
    if len(data) > MAX_MESSAGE_BYTES:
        yield Item(where, error=f"larger than {MAX_MESSAGE_BYTES} bytes")
    elif not data.strip():
        yield Item(where, error="empty file")
    else:
        yield Item(where, data)


def _walk_files(root: Path) -> Iterator[Path]:
    """Files under ``root`` in sorted order; skip hidden files and Maildir tmp/."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if is_maildir(here):
            dirnames[:] = [d for d in dirnames if d != "tmp"]
        dirnames.sort()
        for name in sorted(filenames):
            if not name.startswith("."):
                yield here / name


def path_messages(path: str, stdin: IO[bytes] | None = None) -> Iterator[Item]:
    """Every message under a command-line PATH (see the module docstring)."""
    if path == "-":
        data = (stdin or sys.stdin.buffer).read(MAX_MESSAGE_BYTES + 1)
        yield Item("-", data) if data.strip() else Item("-", error="empty input")
        return
    p = Path(path)
    if p.is_dir():
        for f in _walk_files(p):
            yield from file_messages(f)
    elif p.exists():
        yield from file_messages(p)
    else:
        yield Item(path, error="no such file or directory")


def mbox_messages(path: str) -> Iterator[Item]:
    """The messages of an mbox file (``--mbox``), whatever its first line."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, also when the caller stops
    except OSError as exc:
        yield Item(path, error=exc.strerror or str(exc))
        return
    with fh:
        yield from _mbox_messages(fh, path)


def maildir_messages(path: str) -> Iterator[Item]:
    """The messages of a Maildir and its Maildir++ subfolders (``--maildir``)."""
    p = Path(path)
    if not is_maildir(p):
        yield Item(path, error="not a Maildir (needs cur/ and new/)")
        return
    for f in _walk_files(p):
        yield from file_messages(f)


# ------------------------------------------------------------ learning


@dataclass
class Summary:
    forget: bool = False
    done: int = 0  # learned (or relearned) / forgotten
    moved: int = 0  # of done: relearned from the other class
    skipped: int = 0  # already known / never learned
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    error_lines: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.done + self.skipped + self.errors

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.total / elapsed if elapsed > 0 else 0.0

    def count(self, outcome: str) -> None:
        if outcome in (LEARNED, FORGOTTEN):
            self.done += 1
        elif outcome == RELEARNED:
            self.done += 1
            self.moved += 1
        elif outcome in (KNOWN, UNKNOWN):
            self.skipped += 1

    def progress_line(self) -> str:
        if self.forget:
            head = f"forgot {self.done}, not learned {self.skipped}"
        else:
            head = f"learned {self.done}, already known {self.skipped}"
        return f"{head}, errors {self.errors} ({self.total} messages, {self.rate:.0f} msgs/s)"

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        moved = f", moved from the other class {self.moved}" if self.moved else ""
        if self.forget:
            head = f"forgot {self.done}, not learned {self.skipped}"
        else:
            head = f"learned {self.done}, already known {self.skipped}{moved}"
        return (f"{head}, errors {self.errors} ({self.total} messages in {elapsed:.1f}s, "
                f"{self.rate:.0f} msgs/s)")


class Progress:
    """A ``\\r`` status line on a stream, refreshed at most every 0.2 s."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self.last = 0.0
        self.width = 0

    def update(self, summary: Summary, *, final: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not final and now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        text = summary.progress_line()
        pad = " " * max(0, self.width - len(text))
        self.width = len(text)
        self.stream.write("\r" + text + pad + ("\n" if final else ""))
        self.stream.flush()


async def learn_items(classifier: BayesClassifier, items: Iterator[Item], *, spam: bool,
                      forget: bool = False, max_parts: int = 1000,
                      progress: Progress | None = None,
                      summary: Summary | None = None) -> Summary:
    """Parse, tokenize and learn (or forget) ``items`` in batches.

    The store writes a batch in its own thread while the next batch is parsed."""
    summary = summary or Summary(forget=forget)
    progress = progress or Progress(None)
    pending: asyncio.Task[list[str]] | None = None

    async def settle() -> None:
        nonlocal pending
        if pending is not None:
            task, pending = pending, None
            for outcome in await task:
                summary.count(outcome)
            progress.update(summary)

    batch: list[tuple[str, list[str]]] = []
    started = time.monotonic()

    async def submit() -> None:
        nonlocal pending, started
        await settle()
        if not batch:
            return
        work = list(batch)
        batch.clear()
        started = time.monotonic()
        if forget:
            pending = asyncio.ensure_future(classifier.forget_many(work))
        else:
            pending = asyncio.ensure_future(
                classifier.learn_many([(k, t, spam) for k, t in work]))
        await asyncio.sleep(0)  # let the store thread start

    for item in items:
        if item.error:
            summary.errors += 1
            if len(summary.error_lines) < 20:
                summary.error_lines.append(f"{item.where}: {item.error}")
            progress.update(summary)
            continue
        msg = parse_message(item.data, max_parts=max_parts)
        batch.append((message_key_of(msg), tokenize_message(msg)))
        if len(batch) >= BATCH_MESSAGES or time.monotonic() - started >= BATCH_SECONDS:
            await submit()
    await submit()
    await settle()
    progress.update(summary, final=True)
    return summary


def _when(ts: int) -> str:
    if ts <= 0:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_classifier(config_path: str | None,
                     action: Callable[[BayesClassifier, config.Config], Awaitable[T]]) -> T:
    cfg = load_or_exit(config_path)

    async def go() -> T:
        store = open_bayes_store(cfg)
        try:
            return await action(BayesClassifier(store, cfg.bayes), cfg)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except StoreError as exc:
        fail(str(exc), 1)


# ------------------------------------------------------------ commands


class _LearnCommand(click.Command):
    """``mxguard learn [OPTIONS] PATH...``, with ``mxguard learn dovecot-setup`` as a
    command of its own (a PATH of that name would have to be written ``./dovecot-setup``)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        if args and args[0] in _SUBCOMMANDS:
            sub = _SUBCOMMANDS[args[0]]
            return sub.make_context(f"{info_name or 'learn'} {args[0]}", args[1:],
                                    parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.command is not self:
            return ctx.command.invoke(ctx)
        return super().invoke(ctx)


@click.command("learn", cls=_LearnCommand)
@_with_config
@click.option("--spam", "is_spam", is_flag=True, help="the messages are spam")
@click.option("--ham", "is_ham", is_flag=True, help="the messages are ham (not spam)")
@click.option("--forget", is_flag=True, help="un-learn the messages instead")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="read one message from standard input (what Dovecot's sieve pipe sends)")
@click.option("--mbox", "mboxes", multiple=True, metavar="FILE",
              help="an mbox file (repeatable; PATHs are recognised as mbox by their first line)")
@click.option("--maildir", "maildirs", multiple=True, metavar="DIR",
              help="a Maildir, with its Maildir++ subfolders (repeatable; an error if DIR "
                   "has no cur/ and new/)")
@click.option("--progress/--no-progress", default=None,
              help="show a progress line on stderr (default: when stderr is a terminal)")
@click.argument("paths", nargs=-1, type=click.Path())
def learn(config_path: str | None, is_spam: bool, is_ham: bool, forget: bool, from_stdin: bool,
          mboxes: Sequence[str], maildirs: Sequence[str], progress: bool | None,
          paths: Sequence[str]) -> None:
    """Learn messages as spam or ham: files, directories, mbox files, Maildirs, - (stdin).

    `mxguard learn --stdin --spam|--ham` learns the one message on standard input
    (exit 0 also when it was learned before); `mxguard learn dovecot-setup` writes
    the Dovecot IMAPSieve scripts that call it when users move mail into or out
    of Junk."""
    if is_spam and is_ham:
        fail("learn: give --spam or --ham, not both (one class per run)", 2)
    if not (is_spam or is_ham or forget):
        fail("learn: give --spam or --ham (or --forget)", 2)
    if from_stdin and (paths or mboxes or maildirs):
        fail("learn: --stdin reads one message from standard input; give no PATH, --mbox or "
             "--maildir with it", 2)
    if not (from_stdin or paths or mboxes or maildirs):
        fail("learn: give PATH... (files, directories, mbox, Maildir, - for stdin), --mbox, "
             "--maildir or --stdin", 2)
    if from_stdin:
        paths = ("-",)
    show = sys.stderr.isatty() if progress is None else progress
    stream = sys.stderr if show else None

    async def action(classifier: BayesClassifier, cfg: config.Config) -> Summary:
        summary = Summary(forget=forget)
        items = itertools.chain(
            (item for path in paths for item in path_messages(path)),
            (item for path in mboxes for item in mbox_messages(path)),
            (item for path in maildirs for item in maildir_messages(path)))
        await learn_items(classifier, items, spam=is_spam, forget=forget,
                          max_parts=cfg.content.max_parts, progress=Progress(stream),
                          summary=summary)
        if from_stdin:  # one message per call (Dovecot): expiry is the daemon's job
            return summary
        for _ in range(1000):  # expiry, in its small batches, beside a live daemon
            if not await classifier.maintenance(force=True):
                break
        return summary

    summary = _with_classifier(config_path, action)
    for line in summary.error_lines:
        click.echo(f"mxguard: learn: {line}", err=True)
    click.echo(summary.line())
    sys.exit(1 if summary.errors else 0)


# ------------------------------------------------------------ Dovecot IMAPSieve

SIEVE_FILES = ("report-spam.sieve", "report-ham.sieve")
PIPE_PROGRAMS = ("mxguard-learn-spam", "mxguard-learn-ham")
DOVECOT_CONF = "90-mxguard-imapsieve.conf"
DEFAULT_SIEVE_DIR = "/etc/dovecot/sieve-mxguard"
DEFAULT_BIN_DIR = "/etc/dovecot/sieve-mxguard/bin"
DEFAULT_CONF_DIR = "/etc/dovecot/conf.d"
_FOLDER_NAME = re.compile(r"^[^\x00-\x1f\x7f\"\\*%]{1,200}$")
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class SetupFile:
    """One file of the Dovecot set-up: where it goes, its text, its mode."""

    path: Path
    text: str
    mode: int


def default_mxguard_command() -> str:
    """How the pipe programs start this mxguard: the ``mxguard`` script beside this
    interpreter, else one on PATH, else ``python -m mxguard``."""
    beside = Path(sys.executable).parent / "mxguard"
    if beside.is_file() and os.access(beside, os.X_OK):
        return shlex.quote(str(beside.absolute()))
    found = shutil.which("mxguard")
    if found:
        return shlex.quote(str(Path(found).absolute()))
    return f"{shlex.quote(sys.executable)} -m mxguard"


def _pipe_settings(bin_dir: str, run_as: str | None, mail_user: str) -> tuple[str, str]:
    """(lines inside ``plugin {}``, service blocks after it) that run the programs."""
    if run_as is None:
        return ("  # the only programs the scripts may run: mxguard-learn-spam, -ham; they run\n"
                "  # as the mail user, who must be able to write the Bayes store\n"
                f"  sieve_pipe_bin_dir = {bin_dir}\n"
                "  # starting Python and one store write take about a second; allow for a busy\n"
                "  # host (a timeout only loses that one lesson, never the message)\n"
                "  sieve_pipe_exec_timeout = 30s", "")
    plugin = ("  # the programs run as their own services (below), as the user that owns\n"
              "  # mxguard's Bayes store, not as the mail user; their sockets are in\n"
              "  # base_dir (Dovecot makes no subdirectory of it; only the global scripts\n"
              "  # may use vnd.dovecot.pipe, so users' scripts cannot reach them)\n"
              "  sieve_pipe_socket_dir = .\n"
              "  sieve_pipe_exec_timeout = 30s")
    services = "".join(
        f"\nservice {name} {{\n"
        f"  executable = script {bin_dir}/{name}\n"
        f"  user = {run_as}\n"
        f"  unix_listener {name} {{\n"
        f"    # the imap processes of users (who run the sieve scripts) connect here\n"
        f"    user = {mail_user}\n"
        f"    mode = 0600\n"
        f"  }}\n"
        f"}}\n" for name in PIPE_PROGRAMS)
    return plugin, services


def dovecot_files(*, mxguard: str, config_path: str | None, sieve_dir: str = DEFAULT_SIEVE_DIR,
                  bin_dir: str = DEFAULT_BIN_DIR, conf_dir: str = DEFAULT_CONF_DIR,
                  junk: str = "Junk", trash: str = "Trash", run_as: str | None = None,
                  mail_user: str = "vmail") -> list[SetupFile]:
    """The sieve scripts, pipe programs and dovecot config snippet, filled in.

    ``mxguard`` is the command line (already shell-quoted) that starts mxguard;
    ``config_path`` the config the programs pass with ``--config`` (None: none).
    With ``run_as`` the programs run as Dovecot ``script`` services under that
    user (reached by the ``mail_user``'s imap processes through
    ``sieve_pipe_socket_dir``); without, directly from ``sieve_pipe_bin_dir`` as
    the mail user."""
    for what, user in (("--run-as", run_as or "root"), ("--mail-user", mail_user)):
        if not _USER_NAME.match(user):
            raise click.BadParameter(f"{user!r}: a user name (letters, digits, . _ -)",
                                     param_hint=what)
    for what, name in (("--junk", junk), ("--trash", trash)):
        if not _FOLDER_NAME.match(name):
            raise click.BadParameter(f"{name!r}: a folder name without control characters, "
                                     '", \\, * or %', param_hint=what)
    for what, d in (("--sieve-dir", sieve_dir), ("--bin-dir", bin_dir),
                    ("--conf-dir", conf_dir)):
        if not os.path.isabs(d) or any(c in d for c in "\n\r\"#"):
            raise click.BadParameter(f"{d!r}: an absolute path without quotes, # or newlines",
                                     param_hint=what)
    conf_arg = f" --config {shlex.quote(str(Path(config_path).absolute()))}" if config_path else ""
    bin_dir = bin_dir.rstrip("/") or "/"
    plugin, services = _pipe_settings(bin_dir, run_as, mail_user)
    values = {"@MXGUARD@": mxguard, "@CONFIG@": conf_arg, "@JUNK@": junk, "@TRASH@": trash,
              "@SIEVE_DIR@": sieve_dir.rstrip("/") or "/", "@PIPE_PLUGIN@": plugin,
              "@PIPE_SERVICES@": services}
    source = resources.files("mxguard") / "data" / "sieve"

    def fill(name: str) -> str:
        text = (source / name).read_text(encoding="utf-8")
        for key, value in values.items():
            text = text.replace(key, value)
        return text

    out = [SetupFile(Path(sieve_dir) / n, fill(n), 0o644) for n in SIEVE_FILES]
    out += [SetupFile(Path(bin_dir) / n, fill(n), 0o755) for n in PIPE_PROGRAMS]
    out.append(SetupFile(Path(conf_dir) / DOVECOT_CONF, fill(DOVECOT_CONF), 0o644))
    return out


def write_setup_file(f: SetupFile) -> None:
    """Write ``f`` (directories made as needed); never through a symlink."""
    f.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 f.mode)
    try:
        os.fchmod(fd, f.mode)
        data = f.text.encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


@click.command("dovecot-setup")
@config_option("mxguard config file the pipe programs pass to `mxguard learn` "
               "(default: none, the built-in defaults)", metavar="FILE")
@click.option("--print", "mode", flag_value="print", default=True,
              help="print every file with its path (the default)")
@click.option("--install", "mode", flag_value="install",
              help="write the files (as root: into Dovecot's directories)")
@click.option("--sieve-dir", default=DEFAULT_SIEVE_DIR, show_default=True,
              help="directory of report-spam.sieve and report-ham.sieve")
@click.option("--bin-dir", default=DEFAULT_BIN_DIR, show_default=True,
              help="sieve_pipe_bin_dir: the mxguard-learn-spam/-ham programs")
@click.option("--conf-dir", default=DEFAULT_CONF_DIR, show_default=True,
              help=f"directory of {DOVECOT_CONF}")
@click.option("--junk", default="Junk", show_default=True, help="the users' spam folder")
@click.option("--trash", default="Trash", show_default=True,
              help="moving out of Junk into this folder teaches nothing")
@click.option("--run-as", default=None, metavar="USER",
              help="run the programs as Dovecot services under USER (e.g. the owner of the "
                   "Bayes store) instead of as the mail user")
@click.option("--mail-user", default="vmail", show_default=True, metavar="USER",
              help="with --run-as: the user of the imap processes, who may call the services")
@click.option("--mxguard", "mxguard_cmd", default=None, metavar="COMMAND",
              help="how the programs start mxguard (default: this installation's mxguard)")
def dovecot_setup(config_path: str | None, mode: str, sieve_dir: str, bin_dir: str,
                  conf_dir: str, junk: str, trash: str, run_as: str | None, mail_user: str,
                  mxguard_cmd: str | None) -> None:
    """Dovecot IMAPSieve scripts: moving mail into Junk learns spam, out of it ham."""
    if config_path is not None:
        load_or_exit(config_path)  # a config the programs could not load: say so now
    files = dovecot_files(mxguard=mxguard_cmd or default_mxguard_command(),
                          config_path=config_path, sieve_dir=sieve_dir, bin_dir=bin_dir,
                          conf_dir=conf_dir, junk=junk, trash=trash, run_as=run_as,
                          mail_user=mail_user)
    if mode == "print":
        for f in files:
            click.echo(f"# ==> {f.path} (mode {f.mode:o}) <==")
            click.echo(f.text)
        return
    for f in files:
        try:
            write_setup_file(f)
        except OSError as exc:
            fail(f"learn dovecot-setup: cannot write {f.path}: {exc.strerror or exc}", 1)
        click.echo(f"wrote {f.path}")
    scripts = " ".join(shlex.quote(str(f.path)) for f in files if f.path.suffix == ".sieve")
    click.echo(f"next: sievec each script ({scripts}), make sure the mail user can write "
               "the Bayes store (README: \"Learning from users' Junk folder\"), then "
               "`systemctl reload dovecot`")


_SUBCOMMANDS: dict[str, click.Command] = {"dovecot-setup": dovecot_setup}


@click.group("bayes")
def bayes() -> None:
    """Inspect and maintain the Bayes token store."""


@bayes.command("stats")
@_with_config
def stats_cmd(config_path: str | None) -> None:
    """Tokens, learned spam and ham, and whether Bayes scores yet."""

    async def action(classifier: BayesClassifier, cfg: config.Config) -> list[tuple[str, str]]:
        st = await classifier.stats()
        ready = classifier.ready(st.nspam, st.nham)
        return [
            ("tokens", str(st.tokens)),
            ("nspam", str(st.nspam)),
            ("nham", str(st.nham)),
            ("messages_learned", str(st.seen)),
            ("min_spam", str(cfg.bayes.min_spam)),
            ("min_ham", str(cfg.bayes.min_ham)),
            ("ready", "yes" if ready and cfg.bayes.enabled else
             "no (disabled)" if not cfg.bayes.enabled else
             f"no (needs {max(0, cfg.bayes.min_spam - st.nspam)} more spam, "
             f"{max(0, cfg.bayes.min_ham - st.nham)} more ham)"),
            ("autolearn", "usual thresholds" if ready or not cfg.bayes.autolearn else
             f"cold start: {cold_start_policy(cfg.bayes)}"),
            ("oldest_token_seen", _when(st.oldest_atime)),
            ("newest_token_seen", _when(st.newest_atime)),
        ]

    for name, value in _with_classifier(config_path, action):
        click.echo(f"{name}\t{value}")


@bayes.command("expire")
@_with_config
def expire_cmd(config_path: str | None) -> None:
    """Delete tokens beyond [bayes] max_tokens or unseen for token_ttl, in small batches."""

    async def action(classifier: BayesClassifier, cfg: config.Config) -> int:
        total = 0
        while True:
            n = await classifier.maintenance(force=True)
            total += n
            if not n:
                return total

    click.echo(f"expired\t{_with_classifier(config_path, action)}")


__all__ = ["Item", "SetupFile", "Summary", "bayes", "dovecot_files", "dovecot_setup", "learn",
           "learn_items", "maildir_messages", "mbox_messages", "path_messages",
           "write_setup_file"]
