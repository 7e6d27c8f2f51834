"""Smoke test of ``mor-secure bench ckks`` (the benchmark itself is run by hand; BENCHMARKS.md)."""

import pytest

from mor_secure.deploy.bench import bench_ckks, render

pytestmark = pytest.mark.slow


def test_bench_runs_both_modes_and_renders_a_table():
    (row,) = bench_ckks(counts=(1,), steps=2, repeats=1, prompts_per_step=1, num_generations=2)
    assert row["clients"] == 1 and row["responses_per_step"] == 2
    for mode in ("plain", "ckks"):
        assert row[mode]["step_s"] > 0 and row[mode]["reward_s"] > 0
    assert row["plain"]["ciphertext_bytes"] == 0 and row["ckks"]["ciphertext_bytes"] > 100_000
    assert row["ckks"]["bytes_up"] > row["plain"]["bytes_up"]
    text = render([row], "mor-secure bench ckks --clients 1", "2026-01-01")
    assert "| 1 | 2 |" in text and "mor-secure bench ckks --clients 1" in text
