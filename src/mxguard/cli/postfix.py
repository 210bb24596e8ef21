"""``mxguard postfix setup``: wire Postfix to mxguard -- show the changes, or apply them.

    mxguard postfix setup [--config-dir /etc/postfix] [--config FILE]      # dry run: a diff
    mxguard postfix setup --apply [--replace-seed]                         # change, check, reload
    mxguard postfix setup --revert                                         # restore the last backup

What mxguard needs in main.cf, and nothing else (README "Wiring Postfix"):

* ``smtpd_helo_required = yes``;
* ``check_policy_service { <policy>, policy_context=helo }`` in
  ``smtpd_helo_restrictions``, after ``permit_mynetworks`` /
  ``permit_sasl_authenticated``;
* ``check_policy_service <policy>`` in ``smtpd_recipient_restrictions`` after
  ``permit_mynetworks``, ``permit_sasl_authenticated`` and
  ``reject_unauth_destination`` (the last one is added when missing, so nobody
  can probe mxguard for an open relay), and in ``smtpd_data_restrictions``;
* ``smtpd_policy_service_default_action = DUNNO``: mail flows when the
  policy door is down (greylisting and SPF are skipped meanwhile);
* our milter appended to ``smtpd_milters`` and ``non_smtpd_milters`` (other
  milters are kept), ``milter_protocol = 6`` and ``milter_default_action =
  tempfail`` (see :data:`MILTER_DEFAULT_ACTION_WHY`).

An empty restriction list is created as README shows it, with
``permit_mynetworks, permit_sasl_authenticated`` first, so your own users are
never greylisted. Parameters whose effective value (default included) is
already right are left alone. ``--replace-seed`` also removes what mxguard
replaces: ``reject_*_helo_hostname`` and the postgrey / policyd-spf
``check_policy_service`` entries of every restriction list, and comments out
the policyd-spf ``spawn`` service of master.cf once nothing refers to it.

master.cf needs nothing for mxguard: it is a standalone daemon that Postfix
connects to (inet or unix socket), not a service Postfix spawns.

How: values are read with ``postconf -c DIR -h`` (continuation lines
joined, comments dropped) and parsed like Postfix does (commas and
whitespace separate, ``{ ... }`` groups stay one entry). Our entry is
inserted into the value's text, so the rest of the value keeps its
separators. Every change is a ``postconf -c DIR -e`` (or ``-M#`` / ``-#``)
command, first run on a copy of main.cf/master.cf to produce the exact
diff; ``--apply`` then backs up both files (``main.cf.mxguard-<time>``),
runs the same commands on DIR, ``postfix -c DIR check``, and ``postfix
reload`` when ``postfix status`` says it runs. postconf -e writes an edited
parameter on one line (it refuses multi-line values); comment lines that
were inside it stay in the file, below it. Nothing else in the file changes.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mxguard.cli.common import config_option, fail, load_or_exit

if TYPE_CHECKING:
    from mxguard.config import Config

DEFAULT_CONFIG_DIR = "/etc/postfix"
DEFAULT_QUEUE_DIR = "/var/spool/postfix"
BACKUP_TAG = ".mxguard-"
RESTORED_SUFFIX = ".restored"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_SEPARATORS = ", \t\r\n"

MILTER_DEFAULT_ACTION = "tempfail"
MILTER_DEFAULT_ACTION_WHY = (
    "tempfail: when mxguard's milter cannot be reached, Postfix answers 4xx and the "
    "sending server (or Postfix's own pickup, for local mail) keeps the message and "
    "retries -- nothing is lost, mail waits until mxguard is back. accept would let "
    "it through silently: outgoing mail unsigned (receivers enforcing DMARC may "
    "reject it, and it cannot be signed later) and incoming mail unchecked by "
    "DKIM/DMARC. It is Postfix's own default and matches [milter] fail_action. The "
    "policy door stays fail-open (DUNNO): skipping greylisting and SPF for a while "
    "costs a little spam, not lost or unsigned mail.")

# Restrictions that take one argument (the next token).
_ARG_RESTRICTIONS = frozenset({
    "check_policy_service", "reject_rbl_client", "reject_rhsbl_client",
    "reject_rhsbl_reverse_client", "reject_rhsbl_sender", "reject_rhsbl_helo",
    "reject_rhsbl_recipient", "permit_dnswl_client", "permit_rhswl_client", "sleep",
})
_PREFIXES = frozenset({"warn_if_reject"})
# Unconditional final answers: our entry goes before them.
_TERMINAL = frozenset({"permit", "reject", "defer", "dunno"})
# What the seed used and mxguard replaces (Postfix < 2.3 names included).
SEED_HELO_RESTRICTIONS = frozenset({
    "reject_invalid_helo_hostname", "reject_non_fqdn_helo_hostname",
    "reject_unknown_helo_hostname", "reject_invalid_hostname", "reject_non_fqdn_hostname",
    "reject_unknown_hostname",
})
RESTRICTION_LISTS = (
    "smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions",
    "smtpd_relay_restrictions", "smtpd_recipient_restrictions", "smtpd_data_restrictions",
    "smtpd_end_of_data_restrictions",
)
POSTGREY_PORTS = frozenset({10023, 60000})


class SetupError(Exception):
    """A problem that stops the set-up, phrased for the admin."""


# ------------------------------------------------------------------ commands


def find_command(name: str) -> str | None:
    """Absolute path of a Postfix command (postconf, postfix, ...), or None."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        path = Path(d, name)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def run_postfix_command(name: str, config_dir: str | Path, *args: str,
                        timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``name -c config_dir args...``; SetupError if the command is missing or hangs."""
    exe = find_command(name)
    if exe is None:
        raise SetupError(f"{name} not found: install Postfix (Debian: apt-get install postfix)")
    env = {k: v for k, v in os.environ.items() if k not in ("MAIL_CONFIG", "MAIL_DEBUG")}
    argv = [exe, "-c", str(config_dir), *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise SetupError(f"{shlex.join(argv)} did not finish within {timeout:g}s") from None


def postconf(config_dir: str | Path, *args: str) -> str:
    """stdout of ``postconf -c DIR args``; SetupError with its stderr when it fails."""
    res = run_postfix_command("postconf", config_dir, *args)
    if res.returncode != 0:
        problem = " ".join(res.stderr.split()) or f"exit status {res.returncode}"
        raise SetupError(f"postconf -c {config_dir} {shlex.join(args)}: {problem}")
    return res.stdout


def postconf_value(config_dir: str | Path, name: str, *, expand: bool = False) -> str:
    """The effective value of a main.cf parameter (default when not set)."""
    return postconf(config_dir, "-xh" if expand else "-h", name).rstrip("\n")


def explicit_parameters(config_dir: str | Path) -> dict[str, str]:
    """The parameters main.cf sets (``postconf -n``), raw values."""
    out: dict[str, str] = {}
    for line in postconf(config_dir, "-n").splitlines():
        name, sep, value = line.partition(" =")
        if sep and name != "config_directory":
            out[name] = value.strip()
    return out


# ------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int


def tokenize(value: str) -> list[Token]:
    """Split a Postfix list like ``mystrtokq``: commas/whitespace separate,
    a ``{ ... }`` group (nested braces allowed) is part of one token."""
    tokens: list[Token] = []
    i, n = 0, len(value)
    while i < n:
        if value[i] in _SEPARATORS:
            i += 1
            continue
        start, depth = i, 0
        while i < n:
            ch = value[i]
            if ch == "{":
                depth += 1
            elif ch == "}" and depth:
                depth -= 1
            elif depth == 0 and ch in _SEPARATORS:
                break
            i += 1
        tokens.append(Token(value[start:i], start, i))
    return tokens


def _takes_arg(name: str) -> bool:
    return name in _ARG_RESTRICTIONS or (name.startswith("check_") and name.endswith("_access"))


@dataclass(frozen=True)
class Entry:
    """One restriction: optional ``warn_if_reject``, the name, its argument."""

    tokens: tuple[Token, ...]
    prefixed: bool = False

    @property
    def name(self) -> str:
        return self.tokens[1 if self.prefixed else 0].text.lower()

    @property
    def arg(self) -> str | None:
        rest = self.tokens[2 if self.prefixed else 1:]
        return rest[0].text if rest else None

    @property
    def start(self) -> int:
        return self.tokens[0].start

    @property
    def end(self) -> int:
        return self.tokens[-1].end

    def text(self, value: str) -> str:
        return value[self.start:self.end]


def parse_restrictions(value: str) -> list[Entry]:
    """A restriction list as entries (``check_policy_service ARG`` is one entry)."""
    toks = tokenize(value)
    entries: list[Entry] = []
    i = 0
    while i < len(toks):
        group = [toks[i]]
        prefixed = toks[i].text.lower() in _PREFIXES and i + 1 < len(toks)
        if prefixed:
            i += 1
            group.append(toks[i])
        if _takes_arg(toks[i].text.lower()) and i + 1 < len(toks):
            i += 1
            group.append(toks[i])
        entries.append(Entry(tuple(group), prefixed))
        i += 1
    return entries


def group_items(arg: str) -> list[str]:
    """``{ inet:h:p, policy_context=helo }`` -> ``["inet:h:p", "policy_context=helo"]``."""
    text = arg.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    return [t.text for t in tokenize(text)]


@dataclass(frozen=True)
class Endpoint:
    """Where Postfix connects: ``inet`` host:port, or a ``unix`` path (relative
    paths are under queue_directory)."""

    kind: str
    address: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.address}"

    @property
    def port(self) -> int | None:
        if self.kind != "inet":
            return None
        tail = self.address.rpartition(":")[2]
        return int(tail) if tail.isdigit() else None


def _inet(host: str, port: str) -> Endpoint:
    host = host.strip("[]").lower()
    if host in ("localhost", "", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("::", "ip6-localhost"):
        host = "::1"
    return Endpoint("inet", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def parse_endpoint(text: str, queue_dir: str = DEFAULT_QUEUE_DIR) -> Endpoint:
    """A Postfix client endpoint (``inet:h:p``, ``unix:path``, ``local:path``)."""
    kind, sep, rest = text.strip().partition(":")
    if not sep:
        return _relative_unix(kind, queue_dir)
    if kind.lower() == "inet":
        host, _, port = rest.rpartition(":")
        return _inet(host, port)
    if kind.lower() in ("unix", "local"):
        return _relative_unix(rest, queue_dir)
    host, _, port = text.strip().rpartition(":")  # host:port without a type
    return _inet(host, port)


def _relative_unix(path: str, queue_dir: str) -> Endpoint:
    base = queue_dir.rstrip("/") + "/"
    if path.startswith(base):
        path = path[len(base):]
    return Endpoint("unix", path)


def endpoint_from_listen(listen: str, queue_dir: str = DEFAULT_QUEUE_DIR) -> Endpoint:
    """mxguard's ``listen`` (``host:port`` / ``unix:/path``) as Postfix reaches it."""
    if listen.startswith("unix:"):
        return _relative_unix(listen[5:], queue_dir)
    if listen.startswith("["):
        host, _, rest = listen[1:].partition("]")
        return _inet(host, rest.lstrip(":"))
    host, _, port = listen.rpartition(":")
    return _inet(host, port)


def entry_endpoint(entry: Entry, queue_dir: str) -> Endpoint | None:
    """The server of a ``check_policy_service`` entry."""
    if entry.name != "check_policy_service" or entry.arg is None:
        return None
    items = group_items(entry.arg)
    return parse_endpoint(items[0], queue_dir) if items else None


def seed_policy_label(ep: Endpoint, ours: Endpoint) -> str | None:
    """``"postgrey"`` / ``"policyd-spf"`` when ``ep`` looks like the seed's, else None."""
    if ep == ours:
        return None
    low = ep.address.lower()
    if "postgrey" in low:
        return "postgrey"
    if ep.kind == "unix" and "spf" in low:
        return "policyd-spf"
    if ep.kind == "inet" and ep.port in POSTGREY_PORTS:
        host = ep.address.rpartition(":")[0].strip("[]")
        try:
            if ipaddress.ip_address(host).is_loopback:
                return "postgrey"
        except ValueError:
            return None
    return None


def pol_port_shared(ep: Endpoint) -> bool:
    """mxguard's policy endpoint is postgrey's default one."""
    return ep.kind == "inet" and ep.port in POSTGREY_PORTS


# ------------------------------------------------------------------ text edits


def _separator(value: str) -> str:
    """", "`` when the list separates its entries with commas, else one space."""
    toks = tokenize(value)
    gaps = [value[a.end:b.start] for a, b in itertools.pairwise(toks)]
    return " " if gaps and not any("," in gap for gap in gaps) else ", "


def insert_at(value: str, entries: Sequence[Entry], index: int, new: str) -> str:
    """``value`` with ``new`` inserted before ``entries[index]`` (at the end when
    ``index == len(entries)``); the existing text is kept as it is."""
    if not entries:
        return new
    sep = _separator(value)
    if index >= len(entries):
        pos = entries[-1].end
        return value[:pos] + sep + new + value[pos:]
    pos = entries[index].start
    return value[:pos] + new + sep + value[pos:]


def remove_entry(value: str, entries: Sequence[Entry], index: int) -> str:
    """``value`` without ``entries[index]`` and one of its separators."""
    entry = entries[index]
    if index + 1 < len(entries):
        return value[:entry.start] + value[entries[index + 1].start:]
    if index > 0:
        return value[:entries[index - 1].end] + value[entry.end:]
    return ""


def placement(entries: Sequence[Entry], anchors: Sequence[str]) -> int:
    """Where a new entry goes: after the last anchor present; without anchors,
    before the first unconditional final answer (permit, reject, ...), else last."""
    last = -1
    for i, entry in enumerate(entries):
        if entry.name in anchors and not entry.prefixed:
            last = i
    if last >= 0:
        return last + 1
    for i, entry in enumerate(entries):
        if entry.name in _TERMINAL:
            return i
    return len(entries)


# ------------------------------------------------------------------ the plan


@dataclass
class Change:
    """One edit and what it does, in words: ``args`` is ``["-e", "name = value"]``,
    ``["-#", "name"]`` or ``["-M#", "service/type"]``."""

    file: str
    what: str
    args: list[str]


@dataclass
class Plan:
    config_dir: Path
    policy: Endpoint
    milter: Endpoint
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)

    @property
    def main_cf_changes(self) -> list[Change]:
        return [c for c in self.changes if c.file == "main.cf"]

    def commands(self) -> list[list[str]]:
        """The postconf arguments that make all changes: one ``-e`` with the final
        value of every edited parameter, then ``-#`` and ``-M#`` (each postconf
        write makes the next Postfix command wait until main.cf is 2 s old)."""
        final: dict[str, str] = {}
        for c in self.changes:
            if c.args[0] == "-e":
                name = c.args[1].partition(" = ")[0]
                final.pop(name, None)
                final[name] = c.args[1]
        out = [["-e", *final.values()]] if final else []
        out += [c.args for c in self.changes if c.args[0] == "-#"]
        out += [c.args for c in self.changes if c.args[0] == "-M#"]
        return out


@dataclass
class Options:
    replace_seed: bool = False
    milter_default_action: str = MILTER_DEFAULT_ACTION
    helo: bool = True  # policy_context=helo in smtpd_helo_restrictions
    data: bool = True  # smtpd_data_restrictions
    milter: bool = True  # [milter] enabled


class _Planner:
    """Computes the changes by running them on a scratch copy of the config dir."""

    def __init__(self, config_dir: Path, scratch: Path, cfg: Config, opts: Options) -> None:
        self.dir = scratch
        self.opts = opts
        # Notes about an endpoint that was already there: worth saying only while the
        # wiring is incomplete (a seed set-up), not on every run of a wired one.
        self.shared_notes: list[str] = []
        self.queue_dir = postconf_value(scratch, "queue_directory") or DEFAULT_QUEUE_DIR
        self.plan = Plan(config_dir, endpoint_from_listen(cfg.policy.listen, self.queue_dir),
                         endpoint_from_listen(cfg.milter.listen, self.queue_dir))
        for what, listen, ep in (("policy", cfg.policy.listen, self.plan.policy),
                                 ("milter", cfg.milter.listen, self.plan.milter)):
            if ep.kind == "unix" and ep.address.startswith("/"):
                self.plan.notes.append(
                    f"[{what}] listen = {listen!r} is outside queue_directory "
                    f"({self.queue_dir}): a chrooted smtpd cannot reach it; use a path "
                    f"under it, e.g. {self.queue_dir}/mxguard/{what} (see "
                    "contrib/mxguard.service)")

    def value(self, name: str, *, expand: bool = False) -> str:
        return postconf_value(self.dir, name, expand=expand)

    def run(self, file: str, what: str, *args: str) -> None:
        postconf(self.dir, *args)
        backdate(self.dir)
        self.plan.changes.append(Change(file, what, list(args)))

    def set(self, name: str, new: str, what: str) -> None:
        self.run("main.cf", what, "-e", f"{name} = {new}")

    # ------------------------------------------------------------ scalars

    def scalar(self, name: str, want: str, why: str) -> None:
        old = self.value(name)
        if old.strip().lower() == want.lower():
            return
        self.set(name, want, f"{name} = {want} (was: {old or '(empty)'}): {why}")

    # ------------------------------------------------------------ lists

    def ours(self, entry: Entry) -> bool:
        return entry_endpoint(entry, self.queue_dir) == self.plan.policy

    def policy_list(self, name: str, new: str, anchors: Sequence[str], *,
                    fresh: str, need_unauth: bool = False, helo: bool = False) -> None:
        raw = self.value(name)
        if "$" in raw:
            self.referenced_list(name, raw, new)
            return
        entries = parse_restrictions(raw)
        found = [i for i, e in enumerate(entries) if self.ours(e)]
        if found and pol_port_shared(self.plan.policy) and not helo:
            self.shared_notes.append(
                f"{name} already calls {self.plan.policy}, postgrey's usual port (the seed's "
                "set-up): if postgrey still runs, stop it (systemctl disable --now postgrey) "
                "so that mxguard can listen there")
        if found:
            self.check_position(name, raw, entries, found[0], helo=helo,
                                need_unauth=need_unauth, new=new)
            return
        if not entries:
            self.set(name, fresh, f"{name}: set to {fresh!r} (README wiring)")
            return
        names = {e.name for e in entries}
        if need_unauth and not names & {"reject_unauth_destination",
                                        "defer_unauth_destination"}:
            new = f"reject_unauth_destination, {new}"
        index = placement(entries, anchors)
        where = (f"after {entries[index - 1].text(raw)}" if index > 0
                 else f"before {entries[0].text(raw)}")
        self.set(name, insert_at(raw, entries, index, new), f"{name}: + {new} ({where})")

    def referenced_list(self, name: str, raw: str, new: str) -> None:
        expanded = self.value(name, expand=True)
        if any(self.ours(e) for e in parse_restrictions(expanded)):
            return
        entries = parse_restrictions(raw)
        self.set(name, insert_at(raw, entries, len(entries), new),
                 f"{name}: + {new} (at the end)")
        self.plan.notes.append(f"{name} uses $references ({raw}): mxguard was added at "
                               "the end; check that it comes after reject_unauth_destination")

    def check_position(self, name: str, raw: str, entries: list[Entry], index: int, *,
                       helo: bool, need_unauth: bool, new: str) -> None:
        entry = entries[index]
        if helo and "policy_context=helo" not in [i.lower() for i in
                                                  group_items(entry.arg or "")]:
            fixed = raw[:entry.start] + new + raw[entry.end:]
            self.set(name, fixed, f"{name}: {entry.text(raw)} -> {new} (Postfix words the "
                     "HELO replies itself)")
            return
        if need_unauth:
            before = {e.name for e in entries[:index]}
            if not before & {"reject_unauth_destination", "defer_unauth_destination"}:
                self.plan.notes.append(
                    f"{name}: mxguard is consulted before reject_unauth_destination; move "
                    "it after, so it is never asked about relay attempts")

    def milters(self, name: str) -> None:
        ours = self.plan.milter
        expanded = self.value(name, expand=True)
        present = [parse_endpoint(group_items(t.text)[0], self.queue_dir)
                   for t in tokenize(expanded) if group_items(t.text)]
        if ours in present:
            if name == "smtpd_milters" and ours.port == 10024:
                self.shared_notes.append(
                    f"{name} already lists {ours}, OpenDKIM's port in the seed's set-up: if "
                    "OpenDKIM still runs, stop it (systemctl disable --now opendkim) so that "
                    "mxguard can listen there")
            return
        raw = self.value(name)
        tokens = [Entry((t,)) for t in tokenize(raw)]
        others = [t.text(raw) for t in tokens]
        self.set(name, insert_at(raw, tokens, len(tokens), str(ours)),
                 f"{name}: + {ours}" + (f" (kept: {' '.join(others)})" if others else ""))

    # ------------------------------------------------------------ seed

    def seed_entries(self) -> None:
        for name in RESTRICTION_LISTS:
            raw = self.value(name)
            entries = parse_restrictions(raw)
            found: list[tuple[int, str]] = []
            for i, e in enumerate(entries):
                ep = entry_endpoint(e, self.queue_dir)
                label = seed_policy_label(ep, self.plan.policy) if ep else None
                if label:
                    found.append((i, f"{label}'s {e.text(raw)}"))
                elif e.name in SEED_HELO_RESTRICTIONS:
                    found.append((i, e.text(raw)))
            if not found:
                continue
            if not self.opts.replace_seed:
                for _, text in found:
                    self.plan.notes.append(f"{name}: {text}: mxguard does this check; "
                                           "--replace-seed removes it")
                continue
            new = raw
            for i, _ in reversed(found):
                new = remove_entry(new, entries, i)
                entries = parse_restrictions(new)
            self.set(name, new, f"{name}: - " + ", - ".join(t for _, t in found)
                     + " (mxguard does this)")

    def seed_services(self) -> None:
        """Comment out master.cf spawn services of policyd-spf nothing refers to."""
        refs = " ".join(explicit_parameters(self.dir).values())
        refs += " " + postconf(self.dir, "-P")
        for line in postconf(self.dir, "-M").splitlines():
            fields = line.split()
            if len(fields) < 8 or fields[7] != "spawn" or "spf" not in line.lower():
                continue
            service, kind = fields[0], fields[1]
            if f"private/{service}" in refs or f":{service}" in refs:
                continue
            if not self.opts.replace_seed:
                self.plan.notes.append(f"master.cf: {service}/{kind} ({' '.join(fields[7:])}) "
                                       "is the seed's SPF policy service; --replace-seed "
                                       "comments it out")
                continue
            limit = f"{service}_time_limit"
            if limit in explicit_parameters(self.dir):  # known only while the service is
                self.run("main.cf", f"{limit}: commented out (its service goes)", "-#", limit)
            self.run("master.cf", f"master.cf: comment out {service}/{kind} (policyd-spf, "
                     "no longer used)", "-M#", f"{service}/{kind}")

    def overrides(self) -> None:
        """Per-service ``-o`` overrides in master.cf that bypass main.cf."""
        watched = ("smtpd_helo_restrictions", "smtpd_recipient_restrictions",
                   "smtpd_data_restrictions", "smtpd_milters")
        for line in postconf(self.dir, "-P").splitlines():
            key, _, value = line.partition(" = ")
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == "content_filter" and "spamassassin" in value:
                self.plan.notes.append(
                    f"master.cf: {parts[0]}/{parts[1]} passes mail to SpamAssassin "
                    f"(-o content_filter={value}); mxguard's content scoring replaces it "
                    "once enabled")
            if len(parts) == 3 and parts[2] in watched:
                self.plan.notes.append(
                    f"master.cf: {parts[0]}/{parts[1]} sets -o {parts[2]}={value}: main.cf's "
                    "value does not apply there" + (" (fine for a submission port)"
                                                    if parts[0] == "submission" else ""))

    def other_milters(self) -> None:
        for tok in tokenize(self.value("smtpd_milters", expand=True)):
            items = group_items(tok.text)
            if items and parse_endpoint(items[0], self.queue_dir) != self.plan.milter:
                self.plan.notes.append(
                    f"smtpd_milters: {tok.text} is kept; if it is OpenDKIM, remove it once "
                    "mxguard signs (or mail gets two signatures)")

    # ------------------------------------------------------------ all

    def compute(self) -> Plan:
        o, pol = self.opts, self.plan.policy
        self.seed_entries()
        self.scalar("smtpd_helo_required", "yes", "the HELO checks need a HELO name")
        if o.helo:
            helo_entry = f"check_policy_service {{ {pol}, policy_context=helo }}"
            self.policy_list("smtpd_helo_restrictions", helo_entry,
                             ("permit_mynetworks", "permit_sasl_authenticated"),
                             fresh=f"permit_mynetworks, permit_sasl_authenticated, {helo_entry}",
                             helo=True)
        rcpt = f"check_policy_service {pol}"
        self.policy_list("smtpd_recipient_restrictions", rcpt,
                         ("permit_mynetworks", "permit_sasl_authenticated",
                          "reject_unauth_destination", "defer_unauth_destination"),
                         fresh="permit_mynetworks, permit_sasl_authenticated, "
                               f"reject_unauth_destination, {rcpt}", need_unauth=True)
        if o.data:
            self.policy_list("smtpd_data_restrictions", rcpt, (), fresh=rcpt)
        self.scalar("smtpd_policy_service_default_action", "DUNNO",
                    "mail keeps flowing when mxguard's policy door is down")
        if o.milter:
            self.milters("smtpd_milters")
            self.milters("non_smtpd_milters")
            self.scalar("milter_default_action", o.milter_default_action,
                        "mail waits (4xx) rather than pass unsigned and unchecked when "
                        "mxguard's milter is down" if o.milter_default_action == "tempfail"
                        else "mail passes unsigned and unchecked when the milter is down")
            self.scalar("milter_protocol", "6", "the milter protocol mxguard speaks")
            self.other_milters()
        self.seed_services()
        self.overrides()
        if self.plan.changes:
            self.plan.notes[:0] = self.shared_notes
        return self.plan


def backdate(scratch: Path) -> None:
    """Postfix commands wait until main.cf is 2 s old ("may still be being edited"):
    the scratch copy's files are made older so planning does not wait."""
    old = time.time() - 10
    for name in ("main.cf", "master.cf"):
        with contextlib.suppress(FileNotFoundError):
            os.utime(scratch / name, (old, old))


def _copy_config(src: Path, dst: Path) -> None:
    for name in ("main.cf", "master.cf"):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    backdate(dst)


def _diff(before: Path, after: Path, label: str) -> str:
    old = before.read_text(errors="replace").splitlines(keepends=True) if before.exists() else []
    new = after.read_text(errors="replace").splitlines(keepends=True) if after.exists() else []
    lines = difflib.unified_diff(old, new, str(before), f"{before} (after mxguard postfix setup)",
                                 n=1)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def make_plan(cfg: Config, config_dir: str | Path, opts: Options | None = None) -> Plan:
    """Every change mxguard needs in ``config_dir``, computed on a scratch copy."""
    opts = opts or Options(milter=cfg.milter.enabled)
    cdir = Path(config_dir).absolute()
    if not (cdir / "main.cf").is_file():
        raise SetupError(f"{cdir}/main.cf not found (is --config-dir right? Debian: "
                         "dpkg-reconfigure postfix creates it)")
    with tempfile.TemporaryDirectory(prefix="mxguard-setup-") as tmp:
        scratch = Path(tmp)
        _copy_config(cdir, scratch)
        plan = _Planner(cdir, scratch, cfg, opts).compute()
        for name in ("main.cf", "master.cf"):
            text = _diff(cdir / name, scratch / name, name)
            if text:
                plan.diffs.append(text)
    return plan


# ------------------------------------------------------------------ apply / revert


def backup(config_dir: Path, files: Sequence[str] = ("main.cf", "master.cf")) -> list[Path]:
    """Copy the files to ``NAME.mxguard-<UTC time>`` (same mode and owner)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 0
    while any((config_dir / f"{f}{BACKUP_TAG}{stamp}{f'-{n}' if n else ''}").exists()
              for f in files):
        n += 1
    suffix = f"{BACKUP_TAG}{stamp}{f'-{n}' if n else ''}"
    made = []
    for name in files:
        src = config_dir / name
        if src.exists():
            dst = config_dir / f"{name}{suffix}"
            shutil.copy2(src, dst)
            st = src.stat()
            os.chown(dst, st.st_uid, st.st_gid)
            made.append(dst)
    return made


def _stamp_key(stamp: str) -> tuple[str, int]:
    base, _, n = stamp.partition("-")
    return base, int(n) if n.isdigit() else 0


def latest_backup(config_dir: Path) -> list[Path]:
    """The newest backup set (main.cf and/or master.cf of one run) not yet restored."""
    stamps: dict[str, list[Path]] = {}
    for path in config_dir.iterdir():
        for name in ("main.cf", "master.cf"):
            prefix = f"{name}{BACKUP_TAG}"
            if path.name.startswith(prefix) and not path.name.endswith(RESTORED_SUFFIX):
                stamps.setdefault(path.name[len(prefix):], []).append(path)
    if not stamps:
        return []
    return sorted(stamps[max(stamps, key=_stamp_key)])


def _replace_file(src: Path, dst: Path) -> None:
    """Atomically put ``src``'s content at ``dst`` keeping ``dst``'s mode/owner."""
    ref = dst if dst.exists() else src
    st = ref.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(src.read_bytes())
        os.chmod(tmp, st.st_mode & 0o7777)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def revert(config_dir: str | Path) -> list[tuple[Path, Path]]:
    """Restore the newest backup set; it is renamed ``...restored`` so the next
    revert goes one step further back. Returns (restored file, backup) pairs."""
    cdir = Path(config_dir).absolute()
    found = latest_backup(cdir)
    done = []
    for bak in found:
        target = cdir / bak.name.split(BACKUP_TAG)[0]
        _replace_file(bak, target)
        kept = bak.with_name(bak.name + RESTORED_SUFFIX)
        bak.rename(kept)
        done.append((target, kept))
    return done


def postfix_running(config_dir: str | Path) -> bool:
    return run_postfix_command("postfix", config_dir, "status").returncode == 0


def doors_down(cfg: Config, timeout: float = 3.0) -> list[str]:
    """Why mxguard's policy door / milter do not answer (empty: both answer)."""
    import asyncio

    from mxguard.auth.spf_lint import Lint
    from mxguard.cli.doctor import check_milter, check_policy

    async def probe() -> Lint:
        lint = Lint()
        await check_policy(cfg.policy.listen, timeout, lint)
        if cfg.milter.enabled:
            await check_milter(cfg.milter.listen, timeout, lint)
        return lint

    return [line[6:] for line in asyncio.run(probe()).lines if line.startswith("FAIL")]


def check_and_reload(config_dir: Path, cfg: Config | None = None) -> list[str]:
    """``postfix check``, then ``postfix reload`` if it runs -- unless ``cfg`` is given
    and mxguard does not answer (a reload would make Postfix defer all mail through
    the milter). Lines to print; SetupError when the check fails."""
    out: list[str] = []
    res = run_postfix_command("postfix", config_dir, "check")
    problems = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        raise SetupError(f"postfix -c {config_dir} check failed:\n{problems}\nundo: mxguard "
                         f"postfix setup --revert --config-dir {config_dir}")
    out.append("postfix check: OK" + (f" (warnings:\n{problems})" if problems else ""))
    down = doors_down(cfg) if cfg is not None and postfix_running(config_dir) else []
    if down:
        out += [f"NOT reloaded: {problem}" for problem in down]
        out.append("start mxguard first (systemctl start mxguard), then: postfix -c "
                   f"{config_dir} reload -- with milter_default_action = tempfail, Postfix "
                   "would defer all mail while mxguard does not answer")
    elif postfix_running(config_dir):
        res = run_postfix_command("postfix", config_dir, "reload")
        if res.returncode != 0:
            raise SetupError(f"postfix -c {config_dir} reload failed: "
                             f"{(res.stdout + res.stderr).strip()}")
        out.append("postfix reload: done")
    else:
        out.append(f"Postfix is not running: start it (postfix -c {config_dir} start, or "
                   "systemctl start postfix) to use the new settings")
    return out


def apply(plan: Plan) -> list[Path]:
    """Back up, then run the plan's postconf commands on its config dir."""
    if not plan.changes:
        return []
    files = sorted({c.file for c in plan.changes})
    made = backup(plan.config_dir, files)
    try:
        for args in plan.commands():
            postconf(plan.config_dir, *args)
    except SetupError:
        for bak in made:
            _replace_file(bak, plan.config_dir / bak.name.split(BACKUP_TAG)[0])
        raise
    return made


# ------------------------------------------------------------------ CLI


def _command(config_dir: Path, args: Sequence[str]) -> str:
    return shlex.join(["postconf", "-c", str(config_dir), *args])


def print_plan(plan: Plan) -> None:
    click.echo(f"Postfix config {plan.config_dir}: mxguard policy door {plan.policy}, "
               f"milter {plan.milter}")
    if not plan.changes:
        click.echo("nothing to change: Postfix is wired to mxguard")
    for change in plan.changes:
        click.echo(f"  change  {change.what}")
    for note in plan.notes:
        click.echo(f"  note    {note}")


@click.group("postfix")
def postfix() -> None:
    """Wire Postfix to mxguard (main.cf, master.cf)."""


@postfix.command("setup")
@click.option("--apply", "do_apply", is_flag=True,
              help="make the changes (default: show them as a diff)")
@click.option("--revert", "do_revert", is_flag=True,
              help="restore main.cf/master.cf from the latest mxguard backup")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Postfix configuration directory")
@config_option("mxguard TOML config ([policy] and [milter] listen)")
@click.option("--replace-seed", is_flag=True,
              help="also remove reject_*_helo_hostname and the postgrey / policyd-spf "
                   "check_policy_service entries (mxguard does those checks)")
@click.option("--milter-default-action", type=click.Choice(["tempfail", "accept"]),
              default=MILTER_DEFAULT_ACTION, show_default=True,
              help="what Postfix does when mxguard's milter is down")
@click.option("--no-check", is_flag=True,
              help="with --apply/--revert: skip postfix check and reload (a copy of a "
                   "config dir, no Postfix running from it)")
@click.option("--no-diff", is_flag=True, help="do not print the diff")
def setup_cmd(do_apply: bool, do_revert: bool, config_dir: str, config_path: str | None,
              replace_seed: bool, milter_default_action: str, no_check: bool,
              no_diff: bool) -> None:
    """Show (default) or apply every Postfix change mxguard needs; idempotent."""
    if do_apply and do_revert:
        raise click.UsageError("--apply and --revert exclude each other")
    cdir = Path(config_dir).absolute()
    try:
        if do_revert:
            _revert(cdir, no_check)
            return
        cfg = load_or_exit(config_path)
        opts = Options(replace_seed=replace_seed, milter_default_action=milter_default_action,
                       milter=cfg.milter.enabled)
        plan = make_plan(cfg, cdir, opts)
        print_plan(plan)
        if not no_diff:
            for text in plan.diffs:
                click.echo(text, nl=False)
        if not plan.changes:
            return
        if not do_apply:
            click.echo("dry run: nothing was changed. The postconf commands:")
            for args in plan.commands():
                click.echo(f"  {_command(cdir, args)}")
            click.echo(f"apply with: mxguard postfix setup --apply --config-dir {cdir}"
                       + (" --replace-seed" if replace_seed else ""))
            return
        made = apply(plan)
        click.echo("backup: " + ", ".join(str(p) for p in made))
        click.echo(f"applied {len(plan.changes)} changes (undo: mxguard postfix setup "
                   f"--revert --config-dir {cdir})")
        if not no_check:
            for line in check_and_reload(cdir, cfg):
                click.echo(line)
    except SetupError as exc:
        fail(str(exc), 1 if do_apply or do_revert else 2)


def _revert(cdir: Path, no_check: bool) -> None:
    done = revert(cdir)
    if not done:
        fail(f"no mxguard backup in {cdir} to restore (backups are named "
              f"main.cf{BACKUP_TAG}<time>)", 1)
    for target, kept in done:
        click.echo(f"restored {target} from its backup (now kept as {kept.name})")
    if not no_check:
        for line in check_and_reload(cdir):
            click.echo(line)


__all__ = [
    "MILTER_DEFAULT_ACTION", "Change", "Endpoint", "Entry", "Options", "Plan", "SetupError",
    "apply", "backup", "check_and_reload", "endpoint_from_listen", "make_plan",
    "parse_endpoint", "parse_restrictions", "postconf", "postfix", "revert", "tokenize",
]
