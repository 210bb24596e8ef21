"""``eval:`` functions on results the milter computed -- SPF, DKIM, DMARC, HELO
-- and on the Bayes probability the scan was given (absent in ``mxguard scan``)."""

from __future__ import annotations

from typing import Any

from mxguard.content.evals.base import EVALS, ScanContext, address, domain_of, num, register

# ------------------------------------------------------------------ authentication


def _spf(ctx: ScanContext, helo: bool = False) -> str:
    return ctx.result_extra("spf", "spf_helo" if helo else "spf")


def _register_spf() -> None:
    for res in ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"):
        EVALS[f"check_for_spf_{res}"] = (lambda r: lambda ctx: _spf(ctx) == r)(res)
        EVALS[f"check_for_spf_helo_{res}"] = (lambda r: lambda ctx: _spf(ctx, True) == r)(res)


_register_spf()


@register("mxg_spf_result")
def mxg_spf(ctx: ScanContext, *wanted: str) -> bool:
    return _spf(ctx) in wanted


def _dkim_results(ctx: ScanContext) -> list[Any]:
    res = ctx.result("dkim_verify")
    data = getattr(res, "data", None)
    return list(data) if isinstance(data, list | tuple) else []


@register("check_dkim_signed")
def dkim_signed(ctx: ScanContext, *domains: str) -> bool:
    if ctx.result("dkim_verify") is not None:
        found = _dkim_results(ctx)
        return bool(found) and (not domains or any(r.domain in domains for r in found))
    return bool(ctx.msg.get("DKIM-Signature")) and not domains


@register("check_dkim_valid")
def dkim_valid(ctx: ScanContext, *domains: str) -> bool:
    return any(r.result == "pass" and (not domains or r.domain in domains)
               for r in _dkim_results(ctx))


@register("check_dkim_valid_author_sig")
def dkim_valid_author(ctx: ScanContext, *domains: str) -> bool:
    author = domain_of(address(ctx.msg.first("From")))
    return any(r.result == "pass" and r.domain.lower() == author for r in _dkim_results(ctx))


@register("mxg_dkim_result")
def mxg_dkim(ctx: ScanContext, *wanted: str) -> bool:
    """'pass', 'fail' (any signature failed and none passed), 'none' (unsigned)."""
    if ctx.result("dkim_verify") is None:
        return False
    found = {r.result for r in _dkim_results(ctx)}
    state = "pass" if "pass" in found else "fail" if found else "none"
    return state in wanted


def _dmarc(ctx: ScanContext) -> tuple[str, str]:
    return ctx.result_extra("dmarc", "dmarc"), ctx.result_extra("dmarc", "dmarc_policy")


@register("mxg_dmarc_result")
def mxg_dmarc(ctx: ScanContext, *wanted: str) -> bool:
    """'pass', 'fail', 'none' (no record), or 'fail_reject' / 'fail_quarantine'."""
    result, policy = _dmarc(ctx)
    return bool(result) and (result in wanted or f"{result}_{policy}" in wanted)


def _register_dmarc() -> None:
    EVALS["check_dmarc_pass"] = lambda ctx, *a: _dmarc(ctx)[0] == "pass"
    EVALS["check_dmarc_reject"] = lambda ctx, *a: _dmarc(ctx) == ("fail", "reject")
    EVALS["check_dmarc_quarantine"] = lambda ctx, *a: _dmarc(ctx) == ("fail", "quarantine")
    EVALS["check_dmarc_none"] = lambda ctx, *a: _dmarc(ctx) == ("fail", "none")
    EVALS["check_dmarc_missing"] = lambda ctx, *a: _dmarc(ctx)[0] == "none"


_register_dmarc()


@register("mxg_auth_known")
def mxg_auth_known(ctx: ScanContext) -> bool:
    """SPF or DKIM results exist for this message (false in ``mxguard scan``)."""
    return ctx.result("spf") is not None or ctx.result("dkim_verify") is not None


@register("mxg_helo_symbol")
def mxg_helo(ctx: ScanContext, *names: str) -> bool:
    """One of the HELO check's symbols (HELO_NOT_FQDN ...) was emitted."""
    res = ctx.result("helo")
    return any(s.name in names for s in getattr(res, "symbols", []) or [])


# ------------------------------------------------------------------ Bayes


@register("check_bayes")
def bayes(ctx: ScanContext, lo: str, hi: str) -> bool:
    prob = ctx.bayes_prob
    return prob is not None and num(lo) <= prob < num(hi, 1.01)
