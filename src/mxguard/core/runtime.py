"""What every check may use: the config and the shared services, swapped as one
object on reload (SIGHUP); and the one rule for CPU-heavy work off the loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mxguard.config import Config
from mxguard.core.transaction import Symbol

if TYPE_CHECKING:
    from mxguard.dns import Resolver

T = TypeVar("T")

# Messages up to this size are parsed and scanned on the event loop itself.
# Both are mostly Python (they hold the GIL), so a worker thread gains no
# parallelism for them, only two thread hops and GIL hand-overs that the loop
# waits through (up to the 5 ms switch interval) while other mail is in flight.
# Bigger messages still go to a thread, so a big message never stalls the loop
# for long. Measured with bench/e2e.py (2 cores, 10 clients): at 2.3 KB inline
# gave +7-23% msgs/s and -0.4 ms CPU per message; at 52 KB it was a wash
# (worse with one worker, better with two), hence the bound.
INLINE_BYTES = 32 * 1024


@dataclass
class Runtime:
    """Everything a check may use; swapped as one object on reload (SIGHUP).

    ``dry_run``: a check must not change state (``mxguard scan``: no autolearn,
    no stored results)."""

    config: Config
    resolver: Resolver
    services: dict[str, Any] = field(default_factory=dict)  # e.g. "greylist" -> Greylister
    clock: Callable[[], float] = time.time
    dry_run: bool = False


class HasRuntime(Protocol):
    """What a door needs of the daemon: the current Runtime (swapped on reload)."""

    @property
    def runtime(self) -> Runtime: ...


def symbol(rt: Runtime, name: str, detail: str = "") -> Symbol:
    """A symbol with its score from config (``[scores]`` or the built-in default)."""
    return Symbol(name, rt.config.score(name), detail)


async def off_loop(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in place for a message of ``size`` bytes up to
    :data:`INLINE_BYTES`, else in a worker thread."""
    if size <= INLINE_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


__all__ = ["INLINE_BYTES", "HasRuntime", "Runtime", "off_loop", "symbol"]
