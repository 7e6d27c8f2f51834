"""Smoke test of ``mor-secure bench perf --quick`` (the full benchmark is run by hand; BENCHMARKS.md):
every part runs at tiny sizes through the real CLI, its ratios are finite and positive, and the
section lands in the BENCHMARKS.md named by --out, leaving the file's other sections alone."""

import json
import math

import pytest

from mor_secure.bench.markdown import read_section, update_section
from mor_secure.cli import main

pytestmark = pytest.mark.slow


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_bench_perf_writes_its_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    update_section(out, "other", "Another benchmark", "kept as it is")
    raw = tmp_path / "perf.json"
    assert main(["bench", "perf", "--quick", "--no-progress", "--out", str(out), "--json", str(raw)]) == 0
    result = json.loads(raw.read_text())

    # (a) DP-SGD over non-private, per grad-sample mode; modes our RM cannot use are named with their error
    a = result["dpsgd"]
    assert "hooks" in a["working_modes"]
    assert set(a["working_modes"]) | set(a["failed_modes"]) == {"hooks", "functorch", "ew", "ghost"}
    for row in a["families"].values():
        assert _finite_positive(row["none_s"])
        for mode in a["working_modes"]:
            assert _finite_positive(row["modes"][mode]["ratio"])
            assert all(_finite_positive(r) for r in row["modes"][mode]["ratio_by_repeat"])
        assert row["best_mode"] in a["working_modes"]

    # (b) GRPO step: Flower messages (in-process grid in quick mode) over in-process rewards
    sides = result["grpo"]["sides"]
    assert set(sides) == {"direct", "grid"}
    assert _finite_positive(sides["direct"]["step_s"]) and _finite_positive(sides["grid"]["ratio"])
    assert sides["grid"]["events"] == 0  # no rejected or dropped reply

    # (c) one Flower round per client count, every client answered, bytes both ways
    rows = result["rounds"]["rows"]
    assert sorted(int(k) for k in rows) == [3, 8]
    for k, row in rows.items():
        assert row["answered"] == int(k) and _finite_positive(row["round_s"])
        assert row["bytes_down"] > row["bytes_up"] > 0

    assert result["load"]["wall_s"] > 0
    text = out.read_text()
    section = read_section(out, "perf")
    assert section is not None and "mor-secure bench perf --quick" in section
    assert "x86_64" in section or "CPUs" in section  # the machine line
    assert "| llava |" in section and "| 3 |" in section and "| 8 |" in section
    assert read_section(out, "other").endswith("kept as it is")
    assert text.count("<!-- bench:perf -->") == 1
