"""The changes ``mxguard postfix setup`` makes to main.cf/master.cf, as a plan.

:func:`make_plan` runs every change as a ``postconf -c DIR -e`` (or ``-M#`` /
``-#``) command on a scratch copy of main.cf/master.cf, which gives the exact
diff, and returns the :class:`Plan`: the changes in words, notes, the diffs
and the postconf commands. Applying and reverting it is
:mod:`mxguard.cli.postfix_apply`; what is changed, and why, is in
:mod:`mxguard.cli.postfix`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mxguard.cli.postfix_conf import (
    DEFAULT_QUEUE_DIR,
    Endpoint,
    Entry,
    SetupError,
    endpoint_from_listen,
    entry_endpoint,
    explicit_parameters,
    group_items,
    insert_at,
    parse_endpoint,
    parse_restrictions,
    placement,
    pol_port_shared,
    postconf,
    postconf_value,
    remove_entry,
    seed_policy_label,
    tokenize,
)

if TYPE_CHECKING:
    from mxguard.config import Config

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


__all__ = [
    "MILTER_DEFAULT_ACTION", "MILTER_DEFAULT_ACTION_WHY", "RESTRICTION_LISTS",
    "SEED_HELO_RESTRICTIONS", "Change", "Options", "Plan", "backdate", "make_plan",
]
