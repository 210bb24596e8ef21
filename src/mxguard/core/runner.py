"""Which checks run at which SMTP stage, and how their results become a Verdict.

The table :data:`PIPELINE` is the whole registry (read it like Haraka's
``config/plugins``): order in a stage is execution order. A request at stage S
runs the checks of every stage up to S that the door has not run yet (Postfix
evaluates HELO restrictions at RCPT time with ``smtpd_delay_reject = yes``).

A check is ``async def check(tx, rt) -> CheckResult | None``; ``rt`` is the
:class:`Runtime` (config plus shared services). It never decides the final
action itself: it returns symbols and, optionally, a hard decision that counts
only in ``enforce`` mode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mxguard.config import Config
from mxguard.core.transaction import (
    Action,
    CheckResult,
    Decision,
    Mode,
    Stage,
    Symbol,
    Transaction,
    Verdict,
)

if TYPE_CHECKING:
    from mxguard.dns import Resolver

log = logging.getLogger("mxguard")


@dataclass
class Runtime:
    """Everything a check may use; swapped as one object on reload (SIGHUP)."""

    config: Config
    resolver: Resolver
    services: dict[str, Any] = field(default_factory=dict)  # e.g. "greylist" -> Greylister
    clock: Callable[[], float] = time.time


CheckFn = Callable[[Transaction, Runtime], Awaitable[CheckResult | None]]


@dataclass(frozen=True)
class CheckSpec:
    name: str  # also the config section holding its `mode`
    stage: Stage
    fn: CheckFn


def _registry() -> dict[Stage, tuple[CheckSpec, ...]]:
    # Imported here so that importing the pipeline has no import-order traps.
    from mxguard.checks import greylist, helo

    table: dict[Stage, list[CheckSpec]] = {stage: [] for stage in Stage}
    table[Stage.HELO].append(CheckSpec("helo", Stage.HELO, helo.check))
    try:
        from mxguard.checks import spf
    except ImportError:  # pragma: no cover - SPF check not built yet
        spf = None  # type: ignore[assignment]
    if spf is not None:
        table[Stage.RCPT].append(CheckSpec("spf", Stage.RCPT, spf.check))
    # Greylisting runs after SPF so an SPF fail is rejected without greylisting
    # and an SPF pass can shorten it.
    table[Stage.RCPT].append(CheckSpec("greylist", Stage.RCPT, greylist.check))
    return {stage: tuple(specs) for stage, specs in table.items()}


_PIPELINE: dict[Stage, tuple[CheckSpec, ...]] | None = None


def pipeline() -> dict[Stage, tuple[CheckSpec, ...]]:
    global _PIPELINE
    if _PIPELINE is None:
        _PIPELINE = _registry()
    return _PIPELINE


FAIL_ACTIONS = {
    "DEFER_IF_PERMIT": Decision(Action.DEFER_IF_PERMIT, 451, "4.3.0",
                                "Temporary local problem, please try again later"),
    "DEFER": Decision(Action.DEFER, 451, "4.3.0",
                      "Temporary local problem, please try again later"),
}


async def evaluate(tx: Transaction, rt: Runtime, upto: Stage,
                   after: Stage | None = None) -> Verdict:
    """Run every enabled check of the stages ``(after, upto]`` and merge the results.

    A check that raises is logged and answered with ``[policy] fail_action``
    (default DUNNO): never a crash, never a silent pass without a log line.
    Checks that want to stop later ones (e.g. an SPF reject makes greylisting
    pointless) see earlier results in ``tx.results``.
    """
    verdict = Verdict()
    cfg = rt.config
    for stage, specs in pipeline().items():
        if stage > upto or (after is not None and stage <= after):
            continue
        for spec in specs:
            mode = cfg.mode(spec.name) if hasattr(cfg, spec.name) else Mode.ENFORCE
            if mode is Mode.OFF:
                continue
            try:
                result = await spec.fn(tx, rt)
            except Exception as exc:  # a bug or a store failure: fail mode, logged
                log.exception("check=%s error=%s client=%s queue_id=%s", spec.name,
                              type(exc).__name__, tx.client_address, tx.queue_id or "-")
                result = CheckResult(spec.name, reason=f"error:{type(exc).__name__}",
                                     decision=FAIL_ACTIONS.get(cfg.policy.fail_action))
                mode = Mode.ENFORCE
            if result is None:
                continue
            tx.results[spec.name] = result
            verdict.add(result, mode)
    return verdict


def symbol(rt: Runtime, name: str, detail: str = "") -> Symbol:
    """A symbol with its score from config (``[scores]`` or the built-in default)."""
    return Symbol(name, rt.config.score(name), detail)
