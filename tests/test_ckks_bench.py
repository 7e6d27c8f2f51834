"""Smoke test of ``mor-secure bench ckks`` (the benchmark itself is run by hand; BENCHMARKS.md):
both modes run at tiny sizes, step by step in one run, the CKKS parts are timed in the CKKS steps, and the command
writes its own section of the BENCHMARKS.md named by --out, leaving the other sections alone."""

import pytest

import mor_secure.deploy.bench as bench
from mor_secure.bench.markdown import read_section, update_section
from mor_secure.cli import main

pytestmark = pytest.mark.slow


def test_bench_runs_both_modes_and_writes_its_section(tmp_path, monkeypatch):
    (row,) = bench.bench_ckks(counts=(1,), steps=4, repeats=1, prompts_per_step=1, num_generations=2)
    assert row["clients"] == 1 and row["responses_per_step"] == 2
    for mode in ("plain", "ckks"):
        assert row[mode]["step_s"] > 0 and row[mode]["reward_s"] > 0 and row[mode]["cpu_step_s"] > 0
    assert row["plain"]["ciphertext_bytes"] == 0 and row["ckks"]["ciphertext_bytes"] > 50_000
    assert row["ckks"]["bytes_up"] > row["plain"]["bytes_up"]
    assert row["pairs"] == 1
    # the CKKS parts were timed in the CKKS steps only, and the wrappers are gone afterwards
    parts = row["ckks"]["parts_ms"]
    for label in ("encrypt", "decrypt", "server check", "server sum", "decryption round", "wire query.score reply"):
        assert parts[label] > 0, label
    assert "encrypt" not in row["plain"]["parts_ms"] and "wire query.score reply" in row["plain"]["parts_ms"]
    assert bench.ClientNode.encrypt.__qualname__ == "ClientNode.encrypt"
    assert bench.ckks.weighted_sum.__qualname__ == "weighted_sum"

    out = tmp_path / "BENCHMARKS.md"
    update_section(out, "other", "Another benchmark", "kept as it is")
    monkeypatch.setattr(bench, "bench_ckks", lambda *a, **kw: [row])
    argv = ["bench", "ckks", "--clients", "1", "--steps", "4", "--repeats", "1", "--prompts-per-step", "1",
            "--num-generations", "2", "--out", str(out)]
    assert main(argv) == 0
    section = read_section(out, "ckks")
    assert section.startswith("## CKKS aggregation per GRPO step")
    assert "What it measures" in section and "Reading the results" in section and "Where the CPU time goes" in section
    assert "| 1 | 2 |" in section
    # --steps 4 is the default, so the recorded command leaves it out
    assert "`mor-secure bench ckks --clients 1 --prompts-per-step 1 --num-generations 2 --repeats 1`" in section
    assert read_section(out, "other") == "## Another benchmark\n\nkept as it is"
