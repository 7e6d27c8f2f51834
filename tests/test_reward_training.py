"""Phase 1: DP-SGD (Opacus) on LoRA reward models really trains, and records its event first."""

import numpy as np
import pytest
import torch

from mor_secure.data import make_client_pairs, make_samples, vocabulary
from mor_secure.errors import ConfigError
from mor_secure.models.factory import build_vlm
from mor_secure.privacy.events import DpSgdTraining
from mor_secure.rewards.reward_model import LORA_TARGETS, VISION_LORA_TARGETS, RewardModel
from mor_secure.rewards.train import PairTensors, TrainSettings, pairwise_accuracy, plan_dpsgd, train_reward_model


def planted_pairs(n: int, seed: int) -> list[dict]:
    """A planted preference: for every image, the response 'yes' beats 'no'."""
    samples = make_samples("shapes", "colour", n, seed=seed)
    return [{"image": s["image"], "question": s["question"], "chosen": "yes", "rejected": "no"} for s in samples]


def lora_state(rm: RewardModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in rm.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("family,targets", [("llava", LORA_TARGETS), ("idefics3", LORA_TARGETS),
                                            ("paligemma", LORA_TARGETS), ("paligemma", VISION_LORA_TARGETS)])
def test_dp_sgd_changes_lora_and_learns_planted_preference(family, targets):
    rm = RewardModel(build_vlm(family, vocabulary(), seed=0), lora_r=4, lora_targets=targets)
    before = lora_state(rm)
    events: list[DpSgdTraining] = []
    # lr 0.2: at 0.5 the Idefics3 RM's loss oscillated on a 2-core x86_64 CI host (final losses 0.003, 0.38,
    # 1.6; held-out accuracy 0.5), while at 0.2 every family here reaches 1.0 there (measured)
    settings = TrainSettings(epochs=5, batch_size=32, lr=0.2, dp=True, target_epsilon=8.0, delta=1e-5)
    result = train_reward_model(rm, planted_pairs(256, seed=1), settings, authorize=events.append, progress=False)
    after = lora_state(rm)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    # Opacus issue 820: LoRA updates silently lost. Every LoRA B matrix must have moved off zero.
    assert changed and all(after[n].abs().sum() > 0 for n in after if "lora_B" in n)
    assert len(events) == 1 and events[0] == result.event
    assert events[0].noise_multiplier > 0.3 and events[0].num_records == 256
    assert pairwise_accuracy(rm, planted_pairs(64, seed=9)) >= 0.95


def test_event_is_authorised_before_any_step():
    rm = RewardModel(build_vlm("llava", vocabulary(), seed=0), lora_r=4)
    before = lora_state(rm)

    def refuse(event):
        raise RuntimeError("refused")

    settings = TrainSettings(epochs=1, batch_size=16, lr=1e-2, dp=True, target_epsilon=1.0, delta=1e-5)
    with pytest.raises(RuntimeError, match="refused"):
        train_reward_model(rm, planted_pairs(32, seed=1), settings, authorize=refuse, progress=False)
    assert all(torch.equal(before[n], p) for n, p in lora_state(rm).items()), "no step may run before authorisation"


def test_planned_noise_meets_target_with_opacus_rdp():
    from opacus.accountants import RDPAccountant

    settings = TrainSettings(epochs=5, batch_size=64, lr=1e-3, dp=True, target_epsilon=4.0, delta=1e-5)
    event = plan_dpsgd(2000, settings)
    acct = RDPAccountant()
    acct.history = [(event.noise_multiplier, event.sample_rate, event.steps)]
    eps = acct.get_epsilon(1e-5)
    assert 3.6 <= eps <= 4.0


def test_dp_requires_ledger_and_target():
    rm = RewardModel(build_vlm("llava", vocabulary(), seed=0), lora_r=2)
    with pytest.raises(ConfigError, match="ledger"):
        train_reward_model(rm, planted_pairs(16, 1), TrainSettings(1, 8, 1e-3, True, 8.0, 1e-5), progress=False)
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        plan_dpsgd(100, TrainSettings(1, 8, 1e-3, True, None, None))


def test_non_private_rm_learns_visual_preference():
    """Without DP the RM learns the colour family from pixels (held-out pairs)."""
    torch.manual_seed(0)
    rm = RewardModel(build_vlm("llava", vocabulary(), seed=0), lora_r=8)
    train = make_client_pairs("shapes", ["colour"], 600, seed=1, foreign_fraction=0.0)
    test = make_client_pairs("shapes", ["colour"], 120, seed=2, foreign_fraction=0.0)
    settings = TrainSettings(epochs=6, batch_size=32, lr=1e-3, dp=False, optimizer="adam")
    result = train_reward_model(rm, train, settings, progress=False)
    assert result.event is None and np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert pairwise_accuracy(rm, test) >= 0.85


def test_every_planned_step_is_taken_even_on_empty_poisson_batches():
    """With 4 records and expected batch 1, about a third of Poisson batches are empty; each must
    still be a (noise-only) DP-SGD step, so the steps taken are exactly the steps accounted."""
    rm = RewardModel(build_vlm("llava", vocabulary(), seed=0), lora_r=2)
    settings = TrainSettings(epochs=5, batch_size=1, lr=0.1, dp=True, target_epsilon=8.0, delta=1e-5, seed=3)
    events: list[DpSgdTraining] = []
    result = train_reward_model(rm, planted_pairs(4, seed=1), settings, authorize=events.append, progress=False)
    assert events[0].steps == 20 and events[0].sample_rate == pytest.approx(0.25)
    assert result.steps == events[0].steps == result.opacus_steps  # Opacus' accountant counted each one
    assert len(result.losses) < result.steps  # some batches were empty (seeded), and still stepped


def test_pre_encoded_pairs_train_exactly_as_encoding_them_there():
    """``encoded=`` (FedAvg rounds encode a client's pairs once) changes nothing in the training;
    encodings of other pairs are refused."""
    pairs = planted_pairs(16, seed=1)
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.1, dp=False, seed=5)
    trained = []
    for pre_encoded in (False, True):
        rm = RewardModel(build_vlm("llava", vocabulary(), seed=0), lora_r=2, seed=0)
        encoded = PairTensors(rm, pairs) if pre_encoded else None
        result = train_reward_model(rm, pairs, settings, progress=False, encoded=encoded)
        trained.append((lora_state(rm), result.losses))
    (a, losses_a), (b, losses_b) = trained
    assert losses_a == losses_b and all(torch.equal(a[n], b[n]) for n in a)
    rm = RewardModel(build_vlm("llava", vocabulary(), seed=0), lora_r=2)
    with pytest.raises(ValueError, match="encoded holds 16 pairs"):
        train_reward_model(rm, pairs[:8], settings, progress=False, encoded=PairTensors(rm, pairs))


REPRO_SCRIPT = """
import sys, torch
from mor_secure.bench.alignment import rm_digest
from mor_secure.data import make_samples, vocabulary
from mor_secure.models.factory import build_vlm
from mor_secure.rewards.reward_model import RewardModel
from mor_secure.rewards.train import TrainSettings, train_reward_model

torch.set_num_threads(1)
torch.rand(int(sys.argv[1]))  # a different global RNG state before training: training must not depend on it
pairs = [{"image": s["image"], "question": s["question"], "chosen": "yes", "rejected": "no"}
         for s in make_samples("shapes", "colour", 32, seed=1)]
rm = RewardModel(build_vlm("idefics3", vocabulary(), seed=0), lora_r=2, seed=3)
train_reward_model(rm, pairs, TrainSettings(epochs=1, batch_size=16, lr=0.2, dp=True, target_epsilon=8.0,
                                            delta=1e-5, seed=3), authorize=lambda event: None, progress=False)
print(rm_digest(rm))
"""


def test_dp_sgd_training_is_bit_reproducible_across_processes():
    """A client's RM trained again from the same data, config and seed in another process (as benchmark
    processes run side by side do) is the same RM to the bit: Poisson sampling, DP noise and dropout all
    draw from the seeded generator. (Across machines it can differ: other CPU kernels sum in another
    order, and DP-SGD's noisy steps carry that along.)"""
    import subprocess
    import sys

    digests = [subprocess.run([sys.executable, "-c", REPRO_SCRIPT, str(n)], capture_output=True, text=True,
                              check=True, timeout=300).stdout.split()[-1] for n in (1, 5)]
    assert digests[0] == digests[1] and len(digests[0]) == 16, digests
