#!/usr/bin/env python3
"""Regenerate the config reference table in README.md from the schema in config.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mxguard import config

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in config.iter_keys():
        shown = config._toml_value(default)
        cell = doc.replace("|", "\\|")
        rows.append(f"| `{key}` | `{shown}` | {cell} |")
    rows.append("| `scores.SYMBOL` | see `mxguard config show` | score of a symbol "
                "(overrides the built-in score) |")
    return "\n".join(rows)


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
