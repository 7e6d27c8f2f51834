"""``mor-secure run`` with ``federation.encryption=ckks``: the simulation issues its own kits,
GRPO rewards go through encrypted mixing, and the server process never holds a secret key."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SMALL = ["data.pairs_per_client=32", "data.heldout_pairs_per_client=16", "data.public_prompts=8",
         "data.objective_pairs=8", "data.eval_prompts=8", "router.steps=10", "federation.encryption=ckks"]


def test_simulation_run_with_ckks(tmp_path):
    run_dir = tmp_path / "run"
    sets = [x for item in SMALL for x in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "mor_secure.cli", "run", "configs/smoke.yaml", *sets,
                           "--run-dir", str(run_dir), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["status"] == "completed" and record["encryption"] == "ckks"
    assert record["server_kit"] == str(run_dir / "kits" / "server")
    grpo = json.loads((run_dir / "metrics" / "grpo.json").read_text())
    assert grpo["encryption"] == "ckks" and grpo["ciphertext_bytes"] > 0
    audit = json.loads((run_dir / "key_audit.json").read_text())
    assert audit["encrypted_mixing_on"]["private"] == 0 and audit["encrypted_mixing_on"]["public"] >= 1
    assert audit["after_run"]["private"] == 0
    events = (run_dir / "events.jsonl").read_text().splitlines() if (run_dir / "events.jsonl").exists() else []
    assert not [e for e in events if json.loads(e)["kind"] in ("rejected", "decrypt_failed", "no_scores")]
