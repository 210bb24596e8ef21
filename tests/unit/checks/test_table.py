"""The pipeline table: well-formed rows, and README's "How it works" table is the
one generated from it."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from mxguard.checks import PIPELINE
from mxguard.config import SYMBOL_SCORES, Config
from mxguard.core.transaction import Stage

ROOT = Path(__file__).resolve().parents[3]


def test_rows_are_unique_per_stage_and_name_real_config() -> None:
    seen = {(r.name, r.stage) for r in PIPELINE.rows}
    assert len(seen) == len(PIPELINE.rows)
    cfg = Config()
    for row in PIPELINE.rows:
        if row.mode_key is not None:
            assert dataclasses.is_dataclass(getattr(cfg, row.mode_key))
            assert hasattr(getattr(cfg, row.mode_key), "mode"), row.mode_key
        for sym in row.symbols:
            assert sym.startswith(("<", "RBL_", "URIBL_")) or sym in SYMBOL_SCORES, sym


def test_config_knows_the_check_names() -> None:
    from mxguard.config import CHECK_NAMES

    assert tuple(sorted({r.name for r in PIPELINE.rows})) == CHECK_NAMES


def test_policy_rows_come_before_the_message_rows() -> None:
    stages = [r.stage for r in PIPELINE.rows]
    assert stages == sorted(stages)
    assert {r.name for r in PIPELINE.by_stage[Stage.DONE]} == {"autolearn", "spam_headers",
                                                               "report_safe", "dmarc_failure",
                                                               "explain_header"}


def test_every_scored_symbol_is_emitted_by_some_row() -> None:
    emitted = {s for r in PIPELINE.rows for s in r.symbols}
    assert set(SYMBOL_SCORES) <= emitted, set(SYMBOL_SCORES) - emitted


def test_readme_shows_the_generated_table() -> None:
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" /
                                                  "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    readme = (ROOT / "README.md").read_text()
    assert gen.checks_table() in readme, "run scripts/gen_config_reference.py"
