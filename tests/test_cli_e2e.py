"""The real command, end to end, through Flower's simulation engine (Ray), on the smoke config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mor_secure.privacy.ledger import load_public_key, verify_ledger

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mor_secure.cli", "run", "configs/smoke.yaml", "--run-dir", str(run_dir),
         "--no-progress"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout


def test_run_completes_and_prints_the_evaluation_table(smoke_run):
    run_dir, stdout = smoke_run
    assert "| policy |" in stdout and "| base |" in stdout and "| aligned |" in stdout
    assert "Privacy report:" in stdout
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["status"] == "completed"
    assert record["phases_completed"] == ["rm_training", "warmup", "router_fit", "grpo", "evaluation"]
    # three different transformers model classes, named in the run record
    assert record["model_classes"] == sorted({"LlavaForConditionalGeneration", "Idefics3ForConditionalGeneration",
                                              "PaliGemmaForConditionalGeneration"})
    for name in ("config.yaml", "evaluation.md", "grpo_reward.png", "privacy_report.html", "router.pt",
                 "metrics/evaluation.json", "metrics/grpo.json", "policy_aligned/config.json"):
        assert (run_dir / name).exists(), name
    evaluation = json.loads((run_dir / "metrics" / "evaluation.json").read_text())
    assert set(evaluation["oracle_accuracy"]) == {"base", "aligned"}


def test_every_release_is_in_a_verified_ledger(smoke_run):
    run_dir, _ = smoke_run
    import yaml

    grpo_steps = yaml.safe_load((run_dir / "config.yaml").read_text())["grpo"]["steps"]
    for client in json.loads((run_dir / "clients.json").read_text()):
        folder = run_dir / "clients" / client
        result = verify_ledger(folder / "ledger.jsonl", load_public_key(folder / "ledger_key.pub"))
        assert result.ok, result.reason
        lines = [json.loads(x) for x in (folder / "ledger.jsonl").read_text().splitlines()]
        kinds = [e["event"]["kind"] for e in lines]
        phases = [e["context"]["phase"] for e in lines]
        # DP-SGD training first, then one release for the router fit and one per GRPO step
        assert kinds[0] == "dpsgd_training" and phases[0] == "rm_training"
        assert phases.count("router_fit") == 1 and phases.count("grpo") == grpo_steps


def test_cli_reports_config_errors_clearly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path("configs/smoke.yaml").read_text().replace("beta: 0.04", "") + "\ngrpo: {beta: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "mor_secure.cli", "run", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "grpo" in proc.stderr and "Traceback" not in proc.stderr
