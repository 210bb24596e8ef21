"""Compile a rule set into the compiled-rules cache, in a process of its own.

    python -m mxguard.content.rules_build --cache-dir DIR PATH...

What :func:`mxguard.content.rules.load_rules` starts at daemon start-up when
the cache for the configured rule files is missing: translating
SpamAssassin's ~1,500 regexes and compiling their Hyperscan databases takes
tens of seconds of CPU, which here runs at a lower priority and outside the
daemon's interpreter (no contention for its GIL) while the daemon serves with
the built-in rules. Worker processes that start together take turns on a
lock file in the cache directory: the first compiles, the others then read
what it wrote. Exit status 0 when the cache is there afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
from pathlib import Path

NICE = 10  # added to the priority of the compiling process


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mxguard.content.rules_build",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, required=True)
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args(argv)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    from mxguard.content.rules import build_ruleset

    args.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(args.cache_dir / ".build.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one compile at a time; later ones read its cache
        ruleset = build_ruleset(args.paths, cache_dir=args.cache_dir)
    finally:
        os.close(fd)
    return 0 if ruleset.stats.cache in ("hit", "written") else 1


if __name__ == "__main__":
    sys.exit(main())
