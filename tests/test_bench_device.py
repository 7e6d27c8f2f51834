"""``mor-secure bench device``: the real-size benchmark's smoke run on the CPU (tiny models), its
clear refusal where no GPU is seen, and the library code following a model's device.

The GPU run itself (size ``base``, about 1.2B parameters) cannot run here; its results are in
benchmarks/device_results.json and BENCHMARKS.md, with the command and the machine."""

import json
import math
import sys

import pytest
import torch

from mor_secure.bench import device
from mor_secure.bench.markdown import read_section
from mor_secure.cli import main
from mor_secure.errors import ConfigError


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_bench_device_runs_every_part_and_writes_its_section(tmp_path):
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "device.json"
    perf = tmp_path / "perf_results.json"  # bench perf (b)'s figures: 0.5 s in-process, 3x over TLS
    perf.write_text(json.dumps({"date": "2026-01-01 00:00 UTC", "result": {"grpo": {"sides": {
        "direct": {"step_s": 0.5}, "tls_executor": {"step_s": 1.5, "ratio": 3.0}}}}}))
    assert main(["bench", "device", "--device", "cpu", "--quick", "--no-progress", "--out", str(out),
                 "--results", str(results), "--perf-results", str(perf)]) == 0
    runs = json.loads(results.read_text())["runs"]
    assert [r["command"] for r in runs] == ["mor-secure bench device --device cpu --quick"]
    info = runs[0]["result"]
    row = info["rm"]["families"]["llava"]
    assert _finite_positive(row["none_s"]) and _finite_positive(row["modes"]["hooks"]["ratio"])
    assert row["trainable_params"] < row["params"]  # the backbone is frozen: LoRA, projector, head
    g = info["grpo"]
    assert g["steps"] == 3 and _finite_positive(g["step_s"]) and len(g["scoring_s"]) == 3
    assert g["rm_params"].keys() == {"llava", "idefics3", "paligemma"}
    body = read_section(out, "device")
    assert "mor-secure bench device --device cpu --quick" in body
    # the transport estimate: the 1.0 s extra per step that perf measured, over this run's step
    assert "measured 1.00 s extra per GRPO step" in body and "an estimate from two measurements" in body
    expected = (g["step_s"] + 1.0) / g["step_s"]
    assert f"**{expected:.2f}x**" in body
    # the section renders again from the results alone
    assert device.report(results, None, perf).strip() == body.split("\n", 2)[2].strip()
    # another command's run is kept beside it, and the runs are compared; a rerun replaces its own
    other = {**runs[0], "command": "mor-secure bench device --batch-size 48"}
    other["result"] = json.loads(json.dumps(info))
    other["result"]["batch_size"] = 48
    other["result"]["rm"]["families"]["llava"]["best_ratio"] = 1.25
    results.write_text(json.dumps({"runs": [other, runs[0]]}))
    assert main(["bench", "device", "--device", "cpu", "--quick", "--no-progress", "--out", str(out),
                 "--results", str(results), "--perf-results", str(perf)]) == 0
    stored = json.loads(results.read_text())["runs"]
    assert [r["command"] for r in stored] == ["mor-secure bench device --batch-size 48",
                                              "mor-secure bench device --device cpu --quick"]
    assert stored[1]["date"] >= runs[0]["date"]
    body = read_section(out, "device")
    assert "### `mor-secure bench device --batch-size 48`" in body
    assert "llava " + f"{stored[1]['result']['rm']['families']['llava']['best_ratio']:.2f}x at 4 pairs" in body
    assert "1.25x at 48 pairs" in body


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--device cuda: PyTorch sees no CUDA device.*--device cpu --size tiny"):
        device.resolve_device("cuda")
    with pytest.raises(ConfigError, match="use cuda, cuda:N or cpu"):
        device.resolve_device("meta")


def test_bench_device_needs_no_flower_or_tenseal(tmp_path):
    """It runs on an accelerator machine with only the model stack installed."""
    import subprocess

    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('flwr', 'tenseal', 'ray'):\n"
            "            raise ImportError('not installed here: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import mor_secure.cli, mor_secure.bench.device\n"
            "from mor_secure.cli import build_parser\n"
            "build_parser().parse_args(['bench', 'device'])\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_base_size_is_real_size():
    from mor_secure.data import vocabulary
    from mor_secure.models.factory import build_vlm

    for family, low in (("llava", 1.1e9), ("idefics3", 1.1e9), ("paligemma", 0.9e9)):
        vlm = build_vlm(family, vocabulary(), size="base", image_size=128, device="meta")  # shapes only
        assert sum(p.numel() for p in vlm.model.parameters()) > low
        # 256 image tokens (LLaVA, PaliGemma) fit the language model's positions
        assert vlm.model.config.text_config.max_position_embeddings >= 256 + 128
