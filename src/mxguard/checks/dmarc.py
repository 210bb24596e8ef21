"""DMARC at end of message: the pipeline row :func:`check` (after SPF and DKIM).

Inputs: the message's headers (its From fields are read), the SPF result
DMARC uses (:func:`spf_auth` converts the policy door's remembered
:class:`~mxguard.auth.spf.SpfResult`), the DKIM results as
:class:`~mxguard.auth.dmarc.DkimAuth` (:func:`dkim_auths` converts the
verifier's results). Output: a :class:`DmarcOutcome` --
the :class:`~mxguard.auth.dmarc.DmarcResult` (for Authentication-Results) and
the :class:`CheckResult` the pipeline merges under ``[dmarc] mode``.

Rules: ``[dmarc] rfc`` -- "9989" (default: DNS tree walk, t= test mode) or
"7489" (Public Suffix List, pct= sampling under ``honour_pct``).

Actions (``[dmarc]``), for a failing message by its DMARC disposition (after
t= or, in RFC 7489 mode, pct=): ``reject`` -> ``reject_action`` (default:
``550 5.7.1 reject_text``), ``quarantine`` -> ``quarantine_action`` (default:
score only), ``none`` -> score only. ``extra["dmarc_action"]`` says what we
do: ``reject``, ``quarantine`` (the milter answers SMFIR_QUARANTINE -- in
enforce mode only), ``score``, ``defer`` or ``none``. permerror never refuses;
a temperror (DNS down) answers ``451 4.7.5`` per ``temperror_action``: by
default only for a domain known to publish p=reject (its record was read, or
seen within a day: :class:`PolicyMemory`), so a forger cannot slip through a
DNS outage.

Symbols: DMARC_PASS, DMARC_REJECT, DMARC_QUARANTINE, DMARC_NONE_FAIL (failed,
disposition as named), DMARC_NO_POLICY (none), DMARC_PERMERROR, DMARC_TEMPERROR.

With ``store_results``, each message whose domain publishes a record is kept
in the :class:`~mxguard.store.results.ResultsStore` found at
``rt.services["dmarc_results"]`` (when the daemon put one there).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mxguard.auth import authresults
from mxguard.auth.dmarc import DkimAuth, DmarcResult, OrgDomains, SampleFn, SpfAuth, evaluate
from mxguard.auth.spf import SpfResult
from mxguard.config import DmarcConfig
from mxguard.core.runner import log_failure
from mxguard.core.runtime import Runtime, symbol
from mxguard.core.transaction import Action, CheckResult, Decision, HeaderEdit, Mode, Transaction
from mxguard.store.base import StoreError
from mxguard.store.results import ResultRecord, ResultsStore

NAME = "dmarc"
SYMBOLS = ("DMARC_PASS", "DMARC_REJECT", "DMARC_QUARANTINE", "DMARC_NONE_FAIL",
           "DMARC_NO_POLICY", "DMARC_PERMERROR", "DMARC_TEMPERROR")
RESULTS_SERVICE = "dmarc_results"  # rt.services key of the ResultsStore
ORG_SERVICE = "dmarc_org"  # rt.services key of an OrgDomains (rfc 7489; default: bundled PSL)
MAX_TEXT = 400
DEFAULT_REJECT_TEXT = DmarcConfig().reject_text
DEFAULT_TEMPERROR_TEXT = DmarcConfig().temperror_text
POLICY_SERVICE = "dmarc_policies"  # rt.services key of the PolicyMemory
_FAIL_SYMBOLS = {"reject": "DMARC_REJECT", "quarantine": "DMARC_QUARANTINE",
                 "none": "DMARC_NONE_FAIL"}
_SYMBOLS = {"pass": "DMARC_PASS", "none": "DMARC_NO_POLICY", "permerror": "DMARC_PERMERROR",
            "temperror": "DMARC_TEMPERROR"}

log = logging.getLogger("mxguard")


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    result: DmarcResult
    check: CheckResult
    action: str  # reject | quarantine | score | none


# ------------------------------------------------------------------ inputs


def from_values(headers: Iterable[tuple[str, str]]) -> list[str]:
    """The values of every From field (the milter's ``(name, value)`` list)."""
    return [v for n, v in headers if isinstance(n, str) and n.strip().lower() == "from"]


class DkimLike(Protocol):
    """What :class:`mxguard.auth.dkim.DkimResult` offers (structural: no import)."""

    @property
    def result(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def selector(self) -> str: ...
    @property
    def identity(self) -> str: ...
    @property
    def header_b(self) -> str: ...
    @property
    def reason(self) -> str: ...


def dkim_auths(results: Iterable[DkimLike]) -> list[DkimAuth]:
    """DKIM verifier results as DMARC / Authentication-Results inputs."""
    return [DkimAuth(r.result, r.domain, r.selector, r.header_b, r.identity, r.reason)
            for r in results]


def spf_auth(res: SpfResult | None, *, null_sender: bool = False) -> SpfAuth | None:
    """The SPF result as DMARC sees it; a null sender's check is the HELO identity."""
    if res is None:
        return None
    identity = "helo" if null_sender or res.identity == "helo" else "mailfrom"
    sender = "" if identity == "helo" else res.sender
    return SpfAuth(res.result, res.domain, identity, sender)


# ------------------------------------------------------------------ actions


def _printable(text: str) -> str:
    return " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())[:MAX_TEXT]


def reject_text(cfg: DmarcConfig, domain: str) -> str:
    try:
        return _printable(cfg.reject_text.format(domain=domain))
    except (KeyError, IndexError, ValueError):
        return _printable(DEFAULT_REJECT_TEXT.format(domain=domain))


def action_for(cfg: DmarcConfig, res: DmarcResult) -> str:
    """reject | quarantine | score for a failure; none otherwise."""
    if res.result != "fail":
        return "none"
    if res.disposition == "reject":
        return cfg.reject_action
    if res.disposition == "quarantine":
        return cfg.quarantine_action
    return "score"


def _symbol_name(res: DmarcResult) -> str:
    if res.result == "fail":
        return _FAIL_SYMBOLS[res.disposition]
    return _SYMBOLS[res.result]


def _extra(res: DmarcResult, action: str) -> dict[str, str]:
    return {"dmarc": res.result, "dmarc_policy": res.policy,
            "dmarc_disposition": res.disposition, "dmarc_action": action,
            "dmarc_from": res.from_domain or "-", "dmarc_org": res.org_domain or "-",
            "dmarc_aligned": ",".join(n for n, ok in (("spf", res.spf_aligned),
                                                      ("dkim", res.dkim_aligned)) if ok) or "-",
            "dmarc_reason": res.reason, "dmarc_rfc": res.rfc,
            "dmarc_testing": "y" if res.testing else "n",
            "dmarc_psd": res.record.psd if res.record is not None else "-"}


class PolicyMemory:
    """The last policy (p=, or sp= for subdomains) each domain published, bounded
    by age and count: what ``temperror_action = "defer_reject"`` knows when the
    record cannot be fetched now."""

    def __init__(self, size: int = 20000, ttl: float = 86400.0) -> None:
        self.size, self.ttl = size, ttl
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def put(self, domain: str, policy: str, now: float) -> None:
        if not domain:
            return
        self._items[domain] = (now + self.ttl, policy)
        self._items.move_to_end(domain)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, domain: str, now: float) -> str | None:
        item = self._items.get(domain)
        if item is None or item[0] <= now:
            self._items.pop(domain, None)
            return None
        return item[1]


def policy_memory(rt: Runtime) -> PolicyMemory:
    mem: PolicyMemory = rt.services.setdefault(POLICY_SERVICE, PolicyMemory())
    return mem


def _remember(rt: Runtime, res: DmarcResult) -> None:
    if res.record is None:
        return
    mem, now = policy_memory(rt), rt.clock()
    mem.put(res.from_domain, res.policy if res.policy_tag != "np" else res.record.p, now)
    if res.record_domain and res.record_domain != res.from_domain:
        mem.put(res.record_domain, res.record.p, now)


def known_reject(rt: Runtime, res: DmarcResult) -> bool:
    """Does the domain of a temperror publish p=reject, as far as we know?"""
    if res.record is not None:  # the record was read; a later lookup failed (np=)
        return res.policy == "reject" or res.record.p == "reject"
    mem, now = policy_memory(rt), rt.clock()
    return any(mem.get(d, now) == "reject" for d in (res.from_domain, res.org_domain) if d)


def temperror_defers(rt: Runtime, res: DmarcResult) -> bool:
    how = rt.config.dmarc.temperror_action
    return res.result == "temperror" and (
        how == "defer" or (how == "defer_reject" and known_reject(rt, res)))


def temperror_text(cfg: DmarcConfig, domain: str) -> str:
    try:
        return _printable(cfg.temperror_text.format(domain=domain or "the sender's domain"))
    except (KeyError, IndexError, ValueError):
        return _printable(DEFAULT_TEMPERROR_TEXT.format(domain=domain))


def build_result(rt: Runtime, res: DmarcResult) -> tuple[CheckResult, str]:
    """(CheckResult, action) for one DMARC result."""
    cfg = rt.config.dmarc
    action = action_for(cfg, res)
    if temperror_defers(rt, res):
        action = "defer"
    _remember(rt, res)
    aligned = [n for n, ok in (("SPF", res.spf_aligned), ("DKIM", res.dkim_aligned)) if ok]
    detail = (f"{res.from_domain} p={res.policy if res.policy_tag else '-'} aligned="
              f"{','.join(aligned) or 'none'}" if res.result != "permerror" else "permerror")
    decision = None
    if action == "reject":
        decision = Decision(Action.REJECT, 550, "5.7.1", reject_text(cfg, res.from_domain))
    elif action == "defer":
        decision = Decision(Action.DEFER, 451, "4.7.5", temperror_text(cfg, res.from_domain))
    reason = f"{res.result}:p={res.policy}:dis={res.disposition}:from={res.from_domain or '-'}"
    check = CheckResult(NAME, [symbol(rt, _symbol_name(res), detail)], decision, [], reason,
                        _extra(res, action))
    return check, action


# ------------------------------------------------------------------ storing


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


def _applied(res: DmarcResult, action: str, mode: Mode) -> tuple[str, str, str]:
    """(disposition applied, override type, comment) for the aggregate report."""
    applied = action if mode is Mode.ENFORCE and action in ("reject", "quarantine") else "none"
    if res.sampled_out:
        return applied, "sampled_out", f"pct={res.record.pct if res.record else 100}"
    if res.testing and applied != res.policy:  # RFC 9989 t=y weakened the policy
        return applied, "policy_test_mode", "t=y"
    if applied != res.disposition:
        return applied, "local_policy", f"mode={mode.value} action={action}"
    return applied, "", ""


def report_record(res: DmarcResult, spf: SpfAuth | None, dkim: Sequence[DkimAuth],
                  tx: Transaction | None, action: str, mode: Mode, now: float) -> ResultRecord:
    """The row kept for aggregate reports."""
    rec = res.record
    assert rec is not None
    applied, override, why = _applied(res, action, mode)
    spf_result = spf.result if spf is not None and spf.result != "skipped" else "none"
    return ResultRecord(
        ts=now, source_ip=tx.client_address if tx else "", header_from=res.from_domain,
        envelope_from=_domain_of(tx.sender) if tx else "",
        envelope_to=_domain_of(tx.recipients[0]) if tx and tx.recipients else "",
        dkim=tuple((d.domain.lower(), d.selector, d.result) for d in dkim),
        spf_domain=spf.domain.lower() if spf else "", spf_result=spf_result,
        spf_scope="helo" if spf is not None and spf.identity == "helo" else "mfrom",
        policy_domain=res.record_domain, p=rec.p, sp=rec.sp or "", np=rec.np or "",
        pct=rec.pct, adkim=rec.adkim, aspf=rec.aspf, fo=rec.fo, rua=rec.rua,
        dmarc_result=res.result, policy=res.policy, disposition=applied,
        dkim_aligned=res.dkim_aligned, spf_aligned=res.spf_aligned, override=override,
        override_comment=why)


def _store(rt: Runtime, res: DmarcResult, spf: SpfAuth | None, dkim: Sequence[DkimAuth],
           tx: Transaction | None, action: str) -> None:
    store = rt.services.get(RESULTS_SERVICE)
    if not rt.config.dmarc.store_results or not isinstance(store, ResultsStore) \
            or res.record is None:
        return
    row = report_record(res, spf, dkim, tx, action, rt.config.mode(NAME), rt.clock())
    try:
        store.add(row)
    except StoreError as exc:  # one line per interval, not one per message
        log_failure("dmarc-results", rt.config.storage.fail_open_log_interval,
                    "check=dmarc store_error=%r queue_id=%s", str(exc),
                    tx.queue_id if tx and tx.queue_id else "-")


# ------------------------------------------------------------------ entry points


async def evaluate_message(headers: Iterable[tuple[str, str]], spf: SpfAuth | None,
                           dkim: Sequence[DkimAuth], rt: Runtime, *,
                           tx: Transaction | None = None,
                           sample: SampleFn | None = None,
                           multiple_domains: str = "strictest") -> DmarcOutcome:
    """DMARC for one message: result, CheckResult and action; stores the result."""
    org = rt.services.get(ORG_SERVICE)
    res = await evaluate(rt.resolver, from_values(headers), spf, dkim,
                         org=org if isinstance(org, OrgDomains) else None, sample=sample,
                         honour_pct=rt.config.dmarc.honour_pct,
                         multiple_domains=multiple_domains, rfc=rt.config.dmarc.rfc)
    check, action = build_result(rt, res)
    _store(rt, res, spf, dkim, tx, action)
    return DmarcOutcome(res, check, action)


def auth_inputs(tx: Transaction) -> tuple[SpfAuth | None, list[DkimAuth] | None]:
    """The SPF and DKIM results the rows before left in ``tx.results`` (None: that
    check did not run), as DMARC and Authentication-Results take them."""
    spf_result = tx.results.get("spf")
    spf = spf_result.data if spf_result is not None and isinstance(spf_result.data, SpfAuth) \
        else None
    dkim_result = tx.results.get("dkim_verify")
    dkim = dkim_auths(dkim_result.data or []) if dkim_result is not None else None
    return spf, dkim


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    """The DMARC row (end of message, after SPF and DKIM): the From domain's
    policy on the SPF and DKIM results already in ``tx.results``. A failing
    message of a quarantine domain with ``quarantine_action = "quarantine"``
    gets a quarantine decision (the milter answers SMFIR_QUARANTINE)."""
    if tx.message is None:
        return None
    spf, dkim = auth_inputs(tx)
    outcome = await evaluate_message(tx.message.headers, spf, dkim or [], rt, tx=tx)
    check = outcome.check
    if outcome.action == "quarantine" and check.decision is None:
        check.decision = Decision(Action.QUARANTINE, 0, "",
                                  f"DMARC policy of {outcome.result.from_domain}")
    check.data = outcome
    return check


def authentication_results(rt: Runtime, *, spf: SpfAuth | None = None,
                           dkim: Sequence[DkimAuth] | None = None,
                           dmarc: DmarcOutcome | None = None,
                           fold: bool = True) -> HeaderEdit:
    """The Authentication-Results header (authserv-id from ``[milter] authserv_id``)."""
    dis = None
    if dmarc is not None and dmarc.result.result == "fail":
        dis = _applied(dmarc.result, dmarc.action, rt.config.mode(NAME))[0]
    value = authresults.build(rt.config.milter.authserv_id, spf=spf, dkim=dkim,
                              dmarc=dmarc.result if dmarc else None, dmarc_disposition=dis,
                              fold=fold)
    return HeaderEdit(authresults.HEADER, value)


__all__ = ["DkimLike", "DmarcOutcome", "action_for", "authentication_results", "build_result",
           "check", "dkim_auths", "evaluate_message", "from_values", "report_record",
           "spf_auth"]
