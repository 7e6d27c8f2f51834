"""Smoke test of ``mor-secure bench alignment --quick`` (the full benchmark is run by hand; BENCHMARKS.md):
one seed of the held-out variant of the shapes track, a subset of the methods, through the real CLI.
Checks the structure only: rows and families present, accuracies finite in [0, 1], router weights
summing to one, the section landing in the BENCHMARKS.md named by --out (other sections kept), the
three plots written, and a rerun with the same settings measuring nothing again."""

import json
import math

import pytest

from mor_secure.bench.markdown import read_section, update_section
from mor_secure.cli import main

pytestmark = pytest.mark.slow

METHODS = ["base", "uniform", "fedavg", "centralized", "mor:eps8"]


def test_quick_bench_alignment_writes_table_section_and_plots(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    update_section(out, "other", "Another benchmark", "kept as it is")
    results = tmp_path / "results.json"
    argv = ["bench", "alignment", "--quick", "--tracks", "shapes-heldout", "--seeds", "1",
            "--methods", ",".join(METHODS), "--out", str(out), "--results", str(results),
            "--work-dir", str(tmp_path / "work"), "--no-progress"]
    assert main(argv) == 0

    data = json.loads(results.read_text())
    track = data["tracks"]["shapes-heldout"]
    assert track["heldout"] == ["size"]
    assert all("size" not in c["families"] for c in track["clients"].values())
    families = track["families"]
    assert set(families) == {"colour", "shape", "count", "position", "size"}
    rows = track["seeds"]["0"]
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        acc = row["accuracy"]
        assert set(acc) == set(families) | {"mean"}, method
        assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in acc.values()), method
    weights = rows["mor:eps8"]["router_weights"]
    assert set(weights) == set(families)
    for fam, w in weights.items():
        assert set(w) == set(track["clients"]) and abs(sum(w.values()) - 1.0) < 1e-4, fam
    assert rows["fedavg"]["fedavg_rounds"] == 2 and rows["fedavg"]["local_epochs_per_round"] == 1

    section = read_section(out, "alignment")
    assert section is not None
    assert "`mor-secure bench alignment --tracks shapes-heldout --seeds 1 --methods " in section and "--quick`" in section
    assert "CPUs" in section  # the machine line
    for label in ("| base policy (no alignment) |", "| uniform mixture (no router) |", "| FedAvg RM",
                  "| centralized RM, no DP (upper bound) |", "| MoR, ε = 8 |", "size (held out)"):
        assert label in section, label
    assert read_section(out, "other").endswith("kept as it is")
    for name in ("alignment_privacy_utility.png", "alignment_by_family.png", "alignment_router_weights.png"):
        png = tmp_path / "benchmarks" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(benchmarks/{name})" in section

    # the same command again: every row is in the results file, nothing is measured twice
    stamps = {m: r["finished"] for m, r in rows.items()}
    assert main(argv) == 0
    again = json.loads(results.read_text())["tracks"]["shapes-heldout"]["seeds"]["0"]
    assert {m: r["finished"] for m, r in again.items()} == stamps
