"""A server killed mid-GRPO resumes with ``mor-secure run --resume``: completed phases are not run
again, GRPO continues from its last checkpoint, ledgers keep every entry, budgets still hold.

The first run is a child process (``tests/helpers/server_run.py``): the real ServerApp phases and
the real ClientApps over an in-process Flower grid. It pauses right after the clients answered
GRPO step 5 (checkpoints at steps 2 and 4 are on disk), and the test kills it with SIGKILL. The
resume is the real command, ``mor-secure run --resume RUN_DIR``, through Flower's simulation
engine, with new node ids.

Client ``beta`` releases through the output route only, with a budget that covers exactly seven
releases (the router fit and six GRPO steps). Before the kill it made six; after the resume it
must make one (step 5 again) and refuse the next: a resumed client spends from what its ledger
already holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.hardening import record

from mor_secure.cli import main as cli_main
from mor_secure.config import parse_config
from mor_secure.privacy.accounting import client_guarantee
from mor_secure.privacy.events import GaussianScoreRelease
from mor_secure.privacy.ledger import load_public_key, verify_ledger
from mor_secure.runner import prepare_run

pytestmark = pytest.mark.slow
HELPER = Path(__file__).parent / "helpers" / "server_run.py"
STEPS, CHECKPOINT_EVERY, KILL_AT = 6, 2, 5  # killed while taking step 5: checkpoint-4 is the last
SIGMA, BOUND, DELTA = 10.0, 1.0, 1e-5
OBJECTIVE, PROMPTS, GENERATIONS = 8, 2, 2
PHASES = ["rm_training", "warmup", "router_fit", "grpo", "evaluation"]


def beta_budget() -> float:
    """Midway between the epsilon of 7 and of 8 of beta's releases: the 8th must be refused."""
    events = ([GaussianScoreRelease(noise_std=SIGMA, clip_bound=BOUND, count=2 * OBJECTIVE)]
              + [GaussianScoreRelease(noise_std=SIGMA, clip_bound=BOUND, count=PROMPTS * GENERATIONS)] * 7)
    seven, eight = (client_guarantee(events[:k], DELTA, ()).epsilon for k in (7, 8))
    assert eight - seven > 0.1
    return (seven + eight) / 2


def config(out: Path):
    training = {"epochs": 1, "batch_size": 8, "lr": 0.5, "lora_r": 2}
    return parse_config({
        "run": {"name": "resume", "seed": 0, "output_dir": str(out)},
        "data": {"track": "shapes", "image_size": 16, "pairs_per_client": 16, "heldout_pairs_per_client": 0,
                 "public_prompts": 8, "objective_pairs": OBJECTIVE, "eval_prompts": 8},
        "clients": [
            {"name": "alpha", "model": {"family": "llava"}, "families": ["colour"], "training": training,
             "privacy": {"dp_sgd": True, "epsilon": 8.0, "delta": DELTA}, "budget": {"epsilon": 8.0, "delta": DELTA}},
            {"name": "beta", "model": {"family": "llava"}, "families": ["count"], "training": training,
             "privacy": {"dp_sgd": False}, "scores": {"clip_bound": BOUND, "noise_std": SIGMA},
             "budget": {"epsilon": beta_budget(), "delta": DELTA}},
        ],
        "policy": {"warmup": {"epochs": 1, "batch_size": 8}},
        "router": {"steps": 10},
        "grpo": {"steps": STEPS, "prompts_per_step": PROMPTS, "num_generations": GENERATIONS,
                 "max_completion_length": 1, "checkpoint_steps": CHECKPOINT_EVERY},
    })


def digest(path: Path) -> str:
    """Hash of a file, or of every file under a folder (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(str(f.relative_to(path.parent)).encode() + f.read_bytes())
    return h.hexdigest()


def ledger_lines(run_dir: Path, client: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "clients" / client / "ledger.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    run_dir = prepare_run(config(root), root / "run")
    marker = root / "paused.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(root / "first.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(HELPER), str(run_dir), "--pause-after-grpo-step",
                                 str(KILL_AT), str(marker)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), (root / "first.log").read_text()[-3000:]
            time.sleep(0.2)  # the marker is written just before the pause
            # what the run had produced when it was killed
            before = {
                "record": json.loads((run_dir / "run_record.json").read_text()),
                "paused": json.loads(marker.read_text()),
                "ledgers": {c: (run_dir / "clients" / c / "ledger.jsonl").read_bytes() for c in ("alpha", "beta")},
                "digests": {name: digest(run_dir / name) for name in (
                    "policy_base", "router.pt", "metrics/rm_training.json", "metrics/warmup.json",
                    "metrics/router_fit.json", "clients/alpha/rm", "clients/beta/rm")},
            }
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    t0 = time.time()
    resumed = subprocess.run([sys.executable, "-m", "mor_secure.cli", "run", "--resume", str(run_dir), "--no-progress"],
                             capture_output=True, text=True, timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return run_dir, before, resumed.stdout, t0


def test_the_kill_landed_mid_grpo_after_a_checkpoint(crashed_and_resumed):
    run_dir, before, _, _ = crashed_and_resumed
    assert before["record"]["status"] == "running" and before["record"]["current_phase"] == "grpo"
    assert before["record"]["phases_completed"] == PHASES[:3]
    assert before["paused"]["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    # before the kill each client had released for the router fit and GRPO steps 1..5
    phases = [e["context"]["phase"] for e in ledger_lines(run_dir, "beta")][:6]
    assert before["ledgers"]["beta"].count(b"\n") == 6 and phases == ["router_fit"] + ["grpo"] * 5


def test_resumed_run_completes_without_redoing_finished_phases(crashed_and_resumed):
    run_dir, before, stdout, _ = crashed_and_resumed
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["status"] == "completed" and record["phases_completed"] == PHASES
    assert [r["phases_completed"] for r in record["resumed"]] == [PHASES[:3]]
    assert record["grpo_resumed_from"] == [4]
    # phase 1's reward models, the warm-up policy, the router and their metrics: untouched
    for name, value in before["digests"].items():
        assert digest(run_dir / name) == value, f"{name} was redone on resume"
    grpo = json.loads((run_dir / "metrics" / "grpo.json").read_text())
    assert grpo["resumed_from_step"] == 4
    assert [h["step"] for h in grpo["history"]] == list(range(1, STEPS + 1))
    assert (run_dir / "policy_aligned" / "config.json").is_file()
    assert not list((run_dir / "grpo_trainer").glob("checkpoint-*")), "spent checkpoints are removed"
    assert "| aligned |" in stdout and "phases completed: rm_training, warmup, router_fit" in stdout


def test_ledgers_keep_every_entry_and_verify(crashed_and_resumed, capsys):
    run_dir, before, _, _ = crashed_and_resumed
    lost = 0
    for client, old in before["ledgers"].items():
        path = run_dir / "clients" / client / "ledger.jsonl"
        now = path.read_bytes().splitlines(keepends=True)
        kept = old.splitlines(keepends=True)
        lost += sum(1 for i, line in enumerate(kept) if i >= len(now) or now[i] != line)
        assert verify_ledger(path, load_public_key(path.parent / "ledger_key.pub")).ok
        assert cli_main(["ledger", "verify", str(path)]) == 0
        assert f"verifies ({len(now)} entries" in capsys.readouterr().out
    assert lost == 0, f"{lost} ledger entries written before the kill changed or went missing"
    # alpha (budget to spare): one new release per GRPO step after the checkpoint (5 and 6), nothing else
    new = ledger_lines(run_dir, "alpha")[before["ledgers"]["alpha"].count(b"\n"):]
    assert [e["context"]["phase"] for e in new] == ["grpo"] * (STEPS - 4)
    assert all(e["event"]["kind"] == "gaussian_score_release" for e in new)
    record("tests/test_resume.py::test_ledgers_keep_every_entry_and_verify", faults=1, runs=1, runs_finished=1,
           ledger_entries_lost=lost)


def test_budget_is_enforced_across_the_resume(crashed_and_resumed):
    run_dir, before, _, t0 = crashed_and_resumed
    lines = ledger_lines(run_dir, "beta")
    assert len(lines) == 7, "beta's budget covers exactly seven releases, counted over both runs"
    assert [e["context"]["phase"] for e in lines[6:]] == ["grpo"]
    budget = yaml.safe_load((run_dir / "config.yaml").read_text())["clients"][1]["budget"]["epsilon"]
    events = [GaussianScoreRelease(noise_std=SIGMA, clip_bound=BOUND, count=e["event"]["count"]) for e in lines]
    assert client_guarantee(events, DELTA, ()).epsilon <= budget
    refusals = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    refusals = [e for e in refusals if e["kind"] == "budget_refused"]
    assert [(e["client"], e["phase"]) for e in refusals] == [("beta", "grpo")] and refusals[0]["time"] >= t0
    record_ = json.loads((run_dir / "run_record.json").read_text())
    assert record_["left_mixture"] == ["beta"]


def test_resume_refuses_a_completed_run_or_a_folder_that_is_not_a_run(crashed_and_resumed, tmp_path, capsys):
    run_dir, *_ = crashed_and_resumed
    assert cli_main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "already completed" in err and "mor-secure run CONFIG" in err
    (tmp_path / "notes.txt").write_text("not a run")
    for folder in (tmp_path, tmp_path / "missing"):
        assert cli_main(["run", "--resume", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "run folder" in err and "mor-secure run CONFIG" in err and "Traceback" not in err
    assert cli_main(["run", "configs/smoke.yaml", "--resume", str(run_dir)]) == 2
    assert "give no CONFIG" in capsys.readouterr().err
    record("tests/test_resume.py::test_resume_refuses_a_completed_run_or_a_folder_that_is_not_a_run", inputs=4,
           bad_inputs=4)


def test_a_folder_in_use_by_a_running_server_is_refused(tmp_path):
    from mor_secure.errors import ConfigError
    from mor_secure.federation.resume import RunLock, check_resumable

    (tmp_path / "config.yaml").write_text("clients: []\n")
    (tmp_path / "run_record.json").write_text(json.dumps({"run_id": "r", "status": "failed"}))
    assert check_resumable(tmp_path)["status"] == "failed"
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=f"in use by a running server \\(pid {os.getpid()}\\)"):
            check_resumable(tmp_path)
    assert check_resumable(tmp_path)["run_id"] == "r"  # released with its holder
