"""Phase 3: TRL GRPO with a KL penalty raises the oracle reward of the policy on a tiny task.

One-token answers, as in the demo. The reward here is the oracle itself, wrapped as one
in-process 'client' (a planted reward, so the test isolates GRPO from reward-model quality);
the router has one client.
"""

import numpy as np
import pytest
import torch

from mor_secure.alignment.grpo import MixtureReward, build_dataset, run_grpo
from mor_secure.alignment.policy import generate_answers, oracle_accuracy, prompt_features, warmup
from mor_secure.config import GrpoSection
from mor_secure.errors import ConfigError
from mor_secure.data import first_word, make_samples, vocabulary
from mor_secure.models.factory import build_vlm
from mor_secure.rewards.router import Router


def test_grpo_raises_oracle_accuracy(tmp_path):
    torch.manual_seed(0)
    policy = build_vlm("llava", vocabulary(), seed=0)
    train = make_samples("shapes", "colour", 128, seed=1, pool="public")
    test = make_samples("shapes", "colour", 64, seed=2)
    warmup(policy, [s["image"] for s in train], [s["family"] for s in train], epochs=2, lr=2e-3, batch_size=32,
           seed=0, progress=False)
    policy.save(tmp_path / "base")
    policy.model.config._name_or_path = str(tmp_path / "base")

    def accuracy():
        answers = generate_answers(policy, [s["image"] for s in test], [s["question"] for s in test], max_new_tokens=1)
        return oracle_accuracy([s["family"] for s in test], [s["answer"] for s in test], answers)["mean"]

    before = accuracy()
    images, questions = [s["image"] for s in train], [s["question"] for s in train]
    truth = [s["answer"] for s in train]

    def oracle_scorer(imgs, qs, responses, index):
        # index maps responses to the distinct prompts of this batch; recover each prompt's answer
        answers = {id(img): truth[images.index(img)] for img in imgs}
        scores = np.array([[1.0 if first_word(r) == answers[id(imgs[i])] else 0.0]
                           for r, i in zip(responses, index)])
        return scores, np.ones_like(scores, dtype=bool)

    router = Router(policy.hidden_size, ["oracle"])
    reward = MixtureReward(oracle_scorer, router, prompt_features(policy, images, questions), images, questions)
    cfg = GrpoSection(steps=60, prompts_per_step=16, num_generations=8, beta=0.04, lr=1e-3, max_completion_length=1)
    history = run_grpo(policy, build_dataset(images, questions, [s["family"] for s in train]), reward, cfg,
                       out_dir=tmp_path / "trainer", seed=0, progress=False)
    after = accuracy()
    assert len(history) == 60 and all(np.isfinite(h["kl"]) for h in history)
    assert max(h["kl"] for h in history) > 0, "the KL penalty to the reference must be active"
    early = np.mean([h["reward"] for h in history[:10]])
    late = np.mean([h["reward"] for h in history[-10:]])
    assert late > early + 0.2, f"reward did not rise: {early:.2f} -> {late:.2f}"
    assert after >= before + 0.25, f"oracle accuracy {before:.2f} -> {after:.2f}"


def test_steps_per_generation_scores_k_steps_in_one_round_trip(tmp_path):
    """``grpo.steps_per_generation: k``: the reward (one round trip to the clients) is called once per
    k optimiser steps with k steps' responses, the policy still trains at every step, and the
    history has one row per round trip."""
    policy = build_vlm("llava", vocabulary(), seed=0)
    policy.save(tmp_path / "base")
    policy.model.config._name_or_path = str(tmp_path / "base")
    train = make_samples("shapes", "colour", 32, seed=1, pool="public")
    images, questions = [s["image"] for s in train], [s["question"] for s in train]
    calls = []

    def scorer(imgs, qs, responses, index):
        calls.append(len(responses))
        scores = np.array([[float(len(r))] for r in responses]) + np.random.default_rng(len(calls)).normal(
            0, 1, (len(responses), 1))
        return scores, np.ones_like(scores, dtype=bool)

    reward = MixtureReward(scorer, Router(policy.hidden_size, ["c"]), prompt_features(policy, images, questions),
                           images, questions)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    cfg = GrpoSection(steps=8, prompts_per_step=2, num_generations=4, beta=0.04, lr=1e-3, max_completion_length=1,
                      steps_per_generation=4)
    history = run_grpo(policy, build_dataset(images, questions, [s["family"] for s in train]), reward, cfg,
                       out_dir=tmp_path / "trainer", seed=0, progress=False)
    assert calls == [4 * 2 * 4, 4 * 2 * 4], calls  # 2 round trips of 4 steps x 2 prompts x 4 samples
    assert [h["step"] for h in history] == [1, 5]
    moved = [n for n, p in policy.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "the policy did not train"
    assert GrpoSection().steps_per_generation == 1  # the default samples and scores at every step
    # fewer prompts than one round trip samples: TRL would train no step at all and only log it
    with pytest.raises(ConfigError, match="4 x 2|prompts_per_step x grpo.steps_per_generation = 16 prompts"):
        run_grpo(policy, build_dataset(images[:8], questions[:8], ["colour"] * 8), reward,
                 GrpoSection(steps=8, prompts_per_step=4, num_generations=2, steps_per_generation=4),
                 out_dir=tmp_path / "trainer2", seed=0, progress=False)
