"""Plain counters that code outside the decision path increments in place.

Per process, never reset, never locked (one event loop per process; a
``Counter`` increment of a key is one dict operation). Nothing here knows
Prometheus: :mod:`mxguard.web.metrics` reads these numbers when it writes a
snapshot or answers ``/metrics``.

* :data:`REFUSED`: connections refused per door (``[policy]`` / ``[milter]``
  ``max_connections``), counted in :func:`mxguard.server.policy.admit`.
* :data:`STORE_OPS`, :data:`STORE_ERRORS`: calls of each store method and the
  calls that raised, counted by :func:`instrument`, which the daemon applies
  to its store objects once at start (no store module is edited for it).
* :data:`BAYES_LEARNED`: messages newly learned per class (``spam``/``ham``:
  autolearn, ``mxguard learn`` through the daemon, the dashboard), and
  :data:`BAYES_MESSAGES`, the store's totals as last seen by a lookup.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any, TypeVar

REFUSED: Counter[str] = Counter()  # door -> connections refused
STORE_OPS: Counter[tuple[str, str]] = Counter()  # (store, op) -> calls
STORE_ERRORS: Counter[str] = Counter()  # store -> calls that raised
BAYES_LEARNED: Counter[str] = Counter()  # "spam" / "ham" -> messages newly learned
BAYES_MESSAGES: dict[str, int] = {}  # "spam" / "ham" -> learned in the store (last seen)

# Outcomes of BayesStore.learn that count a message (mxguard.store.bayes_store)
_COUNTED = frozenset(("learned", "relearned"))

S = TypeVar("S")


def _note_bayes(op: str, args: tuple[Any, ...], result: Any) -> None:
    """The Bayes figures a store call tells: totals (lookup), messages learned (learn)."""
    if op == "lookup":
        nspam, nham = getattr(result, "nspam", None), getattr(result, "nham", None)
        if isinstance(nspam, int) and isinstance(nham, int):
            BAYES_MESSAGES["spam"], BAYES_MESSAGES["ham"] = nspam, nham
    elif op == "learn" and args and isinstance(result, list):
        for item, outcome in zip(args[0], result, strict=False):
            if outcome in _COUNTED:
                BAYES_LEARNED["spam" if getattr(item, "spam", False) else "ham"] += 1


def _counted(fn: Any, store: str, op: str, bayes: bool) -> Any:
    key = (store, op)
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def acall(*args: Any, **kwargs: Any) -> Any:
            STORE_OPS[key] += 1
            try:
                result = await fn(*args, **kwargs)
            except Exception:
                STORE_ERRORS[store] += 1
                raise
            if bayes:
                _note_bayes(op, args, result)
            return result
        return acall

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        STORE_OPS[key] += 1
        try:
            result = fn(*args, **kwargs)
        except Exception:
            STORE_ERRORS[store] += 1
            raise
        if bayes:
            _note_bayes(op, args, result)
        return result
    return call


def instrument(obj: S, store: str, interface: type) -> S:
    """Count the calls of ``obj``'s methods that ``interface`` (the store's ABC)
    declares, as ``store``; returns ``obj`` itself (its type is unchanged, so
    ``isinstance`` checks still hold). Wrapping again is a no-op. The backends
    never call their own public methods, so a call is counted once."""
    if getattr(obj, "_mxguard_counted", False):
        return obj
    for op, member in inspect.getmembers(interface, callable):
        if op.startswith("_") or op == "close" or isinstance(member, type):
            continue
        bound = getattr(obj, op, None)
        if bound is not None:
            setattr(obj, op, _counted(bound, store, op, store == "bayes"))
    setattr(obj, "_mxguard_counted", True)  # noqa: B010 - obj is any store
    return obj


def reset() -> None:
    """Zero everything (tests)."""
    for c in (REFUSED, STORE_OPS, STORE_ERRORS, BAYES_LEARNED):
        c.clear()
    BAYES_MESSAGES.clear()


__all__ = ["BAYES_LEARNED", "BAYES_MESSAGES", "REFUSED", "STORE_ERRORS", "STORE_OPS",
           "instrument", "reset"]
