#!/usr/bin/env python3
"""Regenerate README.md's generated tables: the config reference (from the schema in
config.py) and the table of checks (from the pipeline table in mxguard.checks)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mxguard import config
from mxguard.checks import PIPELINE

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"
CHECKS_BEGIN = "<!-- checks-table:begin -->"
CHECKS_END = "<!-- checks-table:end -->"
METRICS_BEGIN = "<!-- metrics-table:begin -->"
METRICS_END = "<!-- metrics-table:end -->"


def checks_table() -> str:
    """One row per pipeline row, in execution order."""
    rows = ["| # | check | stage | direction | mode key | what it does | symbols | config |",
            "|---|---|---|---|---|---|---|---|"]
    for n, spec in enumerate(PIPELINE.rows, 1):
        symbols = ", ".join(f"`{s}`" for s in spec.symbols) or "–"
        mode = f"`[{spec.mode_key}] mode`" if spec.mode_key else "always"
        rows.append(f"| {n} | `{spec.name}` | {spec.stage.name} | {spec.direction.value} | "
                    f"{mode} | {spec.doc} | {symbols} | `{spec.config}` |")
    return "\n".join(rows)


def replace(text: str, begin: str, end: str, body: str) -> str:
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in config.iter_keys():
        shown = config.toml_value(default)
        cell = doc.replace("|", "\\|")
        rows.append(f"| `{key}` | `{shown}` | {cell} |")
    rows.append("| `scores.SYMBOL` | see `mxguard config show` | score of a symbol "
                "(overrides the built-in score) |")
    return "\n".join(rows)


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = replace(readme.read_text(), BEGIN, END, table())
    if CHECKS_BEGIN in text:
        text = replace(text, CHECKS_BEGIN, CHECKS_END, checks_table())
    if METRICS_BEGIN in text:
        from mxguard.web.metrics import reference_table

        text = replace(text, METRICS_BEGIN, METRICS_END, reference_table().rstrip("\n"))
    readme.write_text(text)


if __name__ == "__main__":
    main()
