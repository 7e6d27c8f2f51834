"""Contract tests every client model family must pass (build, encode, forward, save/load, RM)."""

import pytest
import torch

from mor_secure.data import make_samples, vocabulary
from mor_secure.errors import ConfigError
from mor_secure.models.factory import FAMILIES, build_vlm, load_vlm
from mor_secure.rewards.reward_model import RewardModel

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def samples():
    return make_samples("shapes", "colour", 4, seed=3)


def test_at_least_three_distinct_model_classes():
    classes = {FAMILIES[f].model_cls for f in FAMILY_NAMES}
    assert len(classes) >= 3


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_forward_and_roundtrip(family, samples, tmp_path):
    vlm = build_vlm(family, vocabulary(), seed=0)
    texts = [f"{s['question']} {s['answer']}" for s in samples]
    batch = vlm.encode([s["image"] for s in samples], texts)
    hidden = vlm.model.model(**batch).last_hidden_state
    assert hidden.shape[0] == len(samples) and hidden.shape[-1] == vlm.hidden_size
    # the image really enters the model: other pixels change the final states
    other = vlm.encode([samples[0]["image"].rotate(90)] * len(samples), texts)
    assert not torch.allclose(vlm.model.model(**other).last_hidden_state[0], hidden[0])
    vlm.save(tmp_path / family)
    loaded = load_vlm(tmp_path / family)
    assert type(loaded.model) is type(vlm.model)
    again = loaded.model.model(**loaded.encode([s["image"] for s in samples], texts)).last_hidden_state
    assert torch.allclose(again, hidden, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_reward_model_trainable_set_and_persistence(family, samples, tmp_path):
    rm = RewardModel(build_vlm(family, vocabulary(), seed=0), lora_r=4)
    names = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any(n.startswith("head.") for n in names)
    assert not any("vision" in n and "lora_" not in n for n in names), "vision tower must stay frozen"
    scores = rm.score([s["image"] for s in samples], [s["question"] for s in samples], [s["answer"] for s in samples])
    assert scores.shape == (len(samples),) and torch.isfinite(scores).all()
    rm.save(tmp_path / "rm")
    again = RewardModel.load(tmp_path / "rm")
    rescored = again.score([s["image"] for s in samples], [s["question"] for s in samples],
                           [s["answer"] for s in samples])
    assert torch.allclose(rescored, scores, atol=1e-5)


def test_load_vlm_names_missing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_vlm(tmp_path)


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="model.family"):
        build_vlm("gpt2", vocabulary())
