"""A run folder with real, signed client ledgers for the report tests (no training, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mor_secure.privacy.budget import Budget, BudgetGuard
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease
from mor_secure.privacy.ledger import Ledger, generate_signing_key

DELTA = 1e-5
TRAIN = DpSgdTraining(noise_multiplier=1.0, sample_rate=0.02, steps=100, max_grad_norm=1.0, num_records=50)
NOISED = GaussianScoreRelease(noise_std=60.0, clip_bound=1.0, count=4)
CLEAR = GaussianScoreRelease(noise_std=0.0, clip_bound=1.0, count=4)
MID = GaussianScoreRelease(noise_std=20.0, clip_bound=1.0, count=4)
CONFIG = {
    "clients": [
        {"name": "hospital-a", "budget": {"epsilon": 3.0, "delta": DELTA}},
        {"name": "bank b", "budget": {"epsilon": 2.0, "delta": DELTA, "phase_caps": {"router_fit": 1.0}}},
        {"name": "tampered", "budget": {"epsilon": 3.0, "delta": DELTA}},
        {"name": "absent", "budget": {"epsilon": 3.0, "delta": DELTA}},
        {"name": "clinic-c", "budget": {"epsilon": 3.0, "delta": DELTA}},
    ]
}
REFUSAL = {"time": 1795600000.0, "kind": "budget_refused", "client": "bank b", "phase": "grpo", "code": 4001,
           "reason": "release refused, nothing written: the output route would be epsilon=2.01 > budget epsilon=2"}


def client_ledger(run_dir: Path, name: str, budget: dict, releases) -> Path:
    """``clients/<name>/`` with a key pair and a ledger of ``releases`` ((event, phase) pairs), each
    authorised by the client's budget guard."""
    d = run_dir / "clients" / name
    d.mkdir(parents=True)
    key = generate_signing_key(d / "ledger_key.pem", d / "ledger_key.pub")
    guard = BudgetGuard(Ledger(d / "ledger.jsonl", signing_key=key), Budget.from_dict(budget))
    for event, phase in releases:
        guard.authorize(event, {"run_id": "run-7", "phase": phase, "purpose": "test", "client": name})
    return d / "ledger.jsonl"


def make_run_dir(run_dir: Path) -> Path:
    """Five clients: DP-trained with free releases; output route with a phase cap and a logged
    refusal; a ledger altered in place at entry 2; one with no ledger at all; and one that released
    before training (not covered by it) and whose stated route turns from output to DP-SGD at entry 6."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    record = {"run_id": "run-7", "insecure_flags": ["insecure_no_tls"],
              "clients": {"hospital-a": {"model_class": "LlavaRewardModel"}}}
    (run_dir / "run_record.json").write_text(json.dumps(record))
    (run_dir / "events.jsonl").write_text(json.dumps(REFUSAL) + "\n" + '{"kind": "dropped", "cli\n')
    budgets = {c["name"]: c["budget"] for c in CONFIG["clients"]}
    client_ledger(run_dir, "hospital-a", budgets["hospital-a"],
                  [(TRAIN, "rm_training"), (CLEAR, "router_fit"), (CLEAR, "grpo"), (CLEAR, "grpo")])
    client_ledger(run_dir, "bank b", budgets["bank b"], [(NOISED, "router_fit"), (NOISED, "grpo"), (NOISED, "grpo")])
    client_ledger(run_dir, "clinic-c", budgets["clinic-c"],
                  [(MID, "router_fit"), (TRAIN, "rm_training")] + [(MID, "grpo")] * 5)
    tampered = client_ledger(run_dir, "tampered", budgets["tampered"], [(NOISED, "grpo")] * 3)
    raw = tampered.read_bytes()
    start = raw.index(b"\n") + 1  # change the noise of entry 2 in place
    tampered.write_bytes(raw[:start] + raw[start:].replace(b'"noise_std":60.0', b'"noise_std":90.0', 1))
    return run_dir
