"""Figures for the Hardening table in audits/README.md, written by the tests that produce them.

A test calls ``record("tests/test_x.py::test_y", bad_inputs=1, ...)`` after its checks passed
(one call per parametrised case or hypothesis example). Nothing is written unless the environment
variable ``MOR_HARDENING_OUT`` names a folder: ``scripts/hardening_table.py`` sets it, runs the
tests, and builds the table from the JSON lines found there. Figures:

  inputs               inputs fed to a decoder or parser (fuzzed ones may be valid)
  bad_inputs           of those, the malformed or hostile ones, each refused with a reason
  faults               faults injected (a process killed, a client silenced or raising)
  runs / runs_finished runs (GRPO loops, server runs, client processes) started / that finished
  ledger_entries_lost  ledger entries written before a fault and missing after it
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FIELDS = ("inputs", "bad_inputs", "faults", "runs", "runs_finished", "ledger_entries_lost")


def record(test: str, **figures: int) -> None:
    out = os.environ.get("MOR_HARDENING_OUT")
    if not out:
        return
    unknown = set(figures) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown hardening figures {sorted(unknown)}; known: {FIELDS}")
    row = {"test": test, "time": time.time(), **{k: int(v) for k, v in figures.items()}}
    path = Path(out) / "hardening.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
