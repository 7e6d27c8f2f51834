"""``mor-secure audit privacy``: the real command on a tiny config, the canaries, and the committed result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from mor_secure.audit.bounds import audit_bound
from mor_secure.audit.canaries import canary_vocabulary, make_canaries
from mor_secure.audit.privacy import AuditConfig, _opacus_event, check_audit, load_audit_config
from mor_secure.cli import main
from mor_secure.data import vocabulary
from mor_secure.errors import ConfigError
from mor_secure.privacy.events import DpSgdTraining

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "audits" / "privacy_audit.json"


def test_audit_command_writes_bounds_for_every_setting(tmp_path, capsys):
    out = tmp_path / "audit.json"
    rc = main(["audit", "privacy", "configs/audit_smoke.yaml", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    cfg = load_audit_config("configs/audit_smoke.yaml")
    assert [r["target_epsilon"] for r in result["runs"]] == cfg.epsilons
    assert rc == (1 if check_audit(result) else 0)
    assert "| DP-SGD eps=8 |" in printed and "| no DP |" in printed
    included = np.array(result["inclusion"], dtype=bool)
    assert len(included) == cfg.canaries
    for run in result["runs"]:
        assert len(run["scores"]) == cfg.canaries and run["steps"] > 0
        assert run["num_records"] == cfg.base_pairs + included.sum()
        again = audit_bound(run["scores"], included, cfg.rules, cfg.delta, cfg.confidence)
        assert again.epsilon_lb == pytest.approx(run["epsilon_lower_bound"], abs=1e-9)
        if run["dp"]:
            event = run["dpsgd"]["planned_event"]
            assert event["noise_multiplier"] > 0 and event["num_records"] == run["num_records"]
            assert 0 <= run["epsilon_lower_bound"] <= run["theoretical_epsilon"]
            assert run["theoretical_epsilon"] >= run["target_epsilon"]


def test_committed_audit_bounds_stay_below_theoretical_epsilon():
    result = json.loads(COMMITTED.read_text())
    cfg = load_audit_config(ROOT / "configs" / "audit_privacy.yaml")
    assert result["config"] == cfg.model_dump(mode="json"), "audits/ must hold the result of configs/audit_privacy.yaml"
    assert [r["target_epsilon"] for r in result["runs"]] == [1.0, 4.0, 8.0, None]
    included = np.array(result["inclusion"], dtype=bool)
    assert np.array_equal(included, make_canaries(cfg.canaries, cfg.seed, cfg.image_size).included)
    bounds = {}
    for run in result["runs"]:
        again = audit_bound(run["scores"], included, cfg.rules, cfg.delta, cfg.confidence)
        assert again.epsilon_lb == pytest.approx(run["epsilon_lower_bound"], abs=1e-9)
        bounds[run["target_epsilon"]] = run["epsilon_lower_bound"]
        if run["dp"]:
            assert run["epsilon_lower_bound"] <= run["target_epsilon"] <= run["theoretical_epsilon"]
    assert bounds[None] > bounds[1.0] + 1.0, f"the audit has no power: {bounds}"
    assert check_audit(result) == []


def test_canaries_are_deterministic_unique_and_half_included():
    a, b = make_canaries(400, seed=3, image_size=16), make_canaries(400, seed=3, image_size=16)
    assert np.array_equal(a.included, b.included)
    assert [p["chosen"] for p in a.pairs] == [p["chosen"] for p in b.pairs]
    assert 150 < a.included.sum() < 250
    words = canary_vocabulary(400)
    assert len(set(words)) == len(words) and not set(words) & set(vocabulary())
    # the preferred response is a fair coin per canary, so unseen canaries carry no shared signal
    first = np.mean([p["chosen"].startswith("canarya") for p in a.pairs])
    assert 0.4 < first < 0.6
    assert len({p["image"].tobytes() for p in a.pairs}) == 400
    assert len(a.members()) == a.included.sum()


def test_opacus_event_is_what_opacus_runs():
    # The audit states epsilon for the sampling Opacus really does, which differs from the
    # ledger's planned event when batch_size does not divide the record count.
    n, batch = 47, 16
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch))
    planned = DpSgdTraining(noise_multiplier=1.0, sample_rate=batch / n, steps=2 * (n // batch),
                            max_grad_norm=1.0, num_records=n)
    actual = _opacus_event(planned, n, batch, epochs=2)
    assert actual.sample_rate == pytest.approx(loader.sample_rate) and actual.steps == 2 * len(loader)
    assert len(loader) == math.ceil(n / batch)


@pytest.mark.parametrize("override, fragment", [
    ({"rules": [[0, 5000]]}, "rules"),
    ({"epsilons": [-1.0]}, "epsilons"),
    ({"delta": 0.1}, "delta"),
    ({"canaries": 1}, "canaries"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_config_names_the_field(tmp_path, override, fragment):
    data = yaml.safe_load((ROOT / "configs" / "audit_privacy.yaml").read_text())
    data.update(override)
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=fragment):
        load_audit_config(path)


def test_shipped_configs_are_valid():
    for name in ("audit_privacy.yaml", "audit_smoke.yaml"):
        assert isinstance(load_audit_config(ROOT / "configs" / name), AuditConfig)
