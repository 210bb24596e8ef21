"""Reading and editing Postfix's main.cf the way Postfix does, for ``mxguard
postfix setup`` (:mod:`mxguard.cli.postfix_plan`) and ``mxguard doctor``.

* the Postfix commands: :func:`find_command`, :func:`postconf`,
  :func:`postconf_value` (``postconf -c DIR -h``: continuation lines joined,
  comments dropped), :func:`explicit_parameters`, :func:`postfix_running`;
* parsing like Postfix (:func:`tokenize`, :func:`parse_restrictions`): commas
  and whitespace separate, ``{ ... }`` groups stay one entry,
  ``check_policy_service ARG`` is one :class:`Entry`; where Postfix connects
  (:class:`Endpoint`, :func:`parse_endpoint`, :func:`endpoint_from_listen`);
* text edits that keep the rest of a value as it is (:func:`insert_at`,
  :func:`remove_entry`, :func:`placement`).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONFIG_DIR = "/etc/postfix"
DEFAULT_QUEUE_DIR = "/var/spool/postfix"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_SEPARATORS = ", \t\r\n"

# Restrictions that take one argument (the next token).
_ARG_RESTRICTIONS = frozenset({
    "check_policy_service", "reject_rbl_client", "reject_rhsbl_client",
    "reject_rhsbl_reverse_client", "reject_rhsbl_sender", "reject_rhsbl_helo",
    "reject_rhsbl_recipient", "permit_dnswl_client", "permit_rhswl_client", "sleep",
})
_PREFIXES = frozenset({"warn_if_reject"})
# Unconditional final answers: our entry goes before them.
_TERMINAL = frozenset({"permit", "reject", "defer", "dunno"})
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


def postfix_running(config_dir: str | Path) -> bool:
    return run_postfix_command("postfix", config_dir, "status").returncode == 0


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


__all__ = [
    "DEFAULT_CONFIG_DIR", "DEFAULT_QUEUE_DIR", "POSTGREY_PORTS", "Endpoint", "Entry",
    "SetupError", "Token", "endpoint_from_listen", "entry_endpoint", "explicit_parameters",
    "find_command", "group_items", "insert_at", "parse_endpoint", "parse_restrictions",
    "placement", "pol_port_shared", "postconf", "postconf_value", "postfix_running",
    "remove_entry", "run_postfix_command", "seed_policy_label", "tokenize",
]
