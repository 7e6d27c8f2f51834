"""A client that drops out mid-GRPO: the run goes on, the router renormalises, the event is logged.

Three real client folders (tiny DP-SGD reward models), the real ClientApp behind the real reward
channel over an in-process Flower grid, and TRL's GRPO on a tiny policy. After GRPO step 2 client
``beta`` fails, two ways:

* ``silent``: its node stops answering (the grid delivers nothing to it: Flower's "no reply
  within the timeout");
* ``raises``: its reward model raises while scoring (after its ledger entry was written: the
  write-ahead ledger over-counts that release, it never under-counts).

Checked for steps 3 and 4: every GRPO step still runs and gets a finite reward per completion from
alpha and gamma; that reward is the router's mixture renormalised over the clients present,
recomputed here with numpy from the router's logits; beta's failure is in events.jsonl with its
reason; every ledger verifies and keeps every entry it had when beta failed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.hardening import record

from mor_secure.alignment.grpo import MixtureReward, build_dataset, run_grpo
from mor_secure.alignment.policy import prompt_features
from mor_secure.config import GrpoSection, parse_config
from mor_secure.data import make_samples, vocabulary
from mor_secure.deploy.client_init import init_client_folder
from mor_secure.deploy.inproc import InProcessGrid
from mor_secure.federation.channel import Channel
from mor_secure.federation.client_app import make_client_app
from mor_secure.federation.client_node import ClientNode
from mor_secure.models.factory import build_vlm
from mor_secure.privacy.ledger import load_public_key, verify_ledger
from mor_secure.rewards.reward_model import RewardModel
from mor_secure.rewards.router import Router

NAMES = ["alpha", "beta", "gamma"]
STEPS, FAIL_AFTER = 4, 2
NODES = {100 + i: name for i, name in enumerate(NAMES)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three client folders with trained reward models, and a warm policy saved as the reference."""
    root = tmp_path_factory.mktemp("dropout")
    raw = yaml.safe_load(Path("configs/smoke.yaml").read_text())
    raw["data"].update(pairs_per_client=16, image_size=16)
    for c in raw["clients"]:
        c["model"] = {"family": "llava"}
        c["training"] = {"epochs": 1, "batch_size": 8, "lr": 0.5, "lora_r": 2}
    cfg = parse_config(raw)
    for name in NAMES:
        ClientNode(init_client_folder(cfg, name, root / "clients" / name)).train("setup", progress=False)
    policy = build_vlm("llava", vocabulary(), image_size=16, seed=0)
    policy.save(root / "policy_base")
    return root


class DroppingGrid(InProcessGrid):
    """Delivers nothing to ``silenced`` nodes (they never answer)."""

    silenced: set[int] = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_asked: set[int] = set()  # nodes the last call sent a message to (delivered or not)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.last_asked = {m.metadata.dst_node_id for m in messages}
        return super().send_and_receive([m for m in messages if m.metadata.dst_node_id not in self.silenced],
                                        timeout=timeout)


def test_silent_client_is_skipped_with_backoff_and_asked_again(trained, tmp_path):
    """A node that times out is skipped for the next 1, 2, 4, ... requests, not asked (and waited
    for) on every one; after the skips it is asked again, and once it answers it is back for good."""
    for name in NAMES:
        shutil.copytree(trained / "clients" / name, tmp_path / "clients" / name)
    grid = DroppingGrid(make_client_app(), {n: {"client-dir": str(tmp_path / "clients" / c)} for n, c in NODES.items()})
    grid.silenced = set()
    channel = Channel(grid, "backoff-run", tmp_path / "events.jsonl", timeout_s=60)
    channel.train_all(timeout_s=60)
    samples = make_samples("shapes", "colour", 2, seed=1, image_size=16, pool="public")
    images, questions = [s["image"] for s in samples], [s["question"] for s in samples]
    (beta,) = [n for n, c in NODES.items() if c == "beta"]
    asked_beta, present_beta = [], []
    for request in range(10):
        grid.silenced = {beta} if request < 5 else set()  # beta is silent for requests 0-4
        grid.last_asked = set()
        _, present = channel.score(images, questions, ["red", "blue"], np.arange(2), phase="grpo", purpose="test")
        asked_beta.append(beta in grid.last_asked)
        present_beta.append(bool(present[:, 1].all()))
    # asked at 0 (timeout, skip 1), skipped 1, asked 2 (timeout, skip 2), skipped 3-4, asked 5 (answers), then every time
    assert asked_beta == [True, False, True, False, False, True, True, True, True, True]
    assert present_beta == [False] * 5 + [True] * 5
    kinds = [e["kind"] for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())
             if e.get("client") == "beta"]
    assert kinds == ["dropped", "skipped", "dropped", "skipped", "skipped"]


class LateGrid(InProcessGrid):
    """Lists its nodes one more per ``get_node_ids`` call (at most ``up_to``): SuperNodes that
    register after the ServerApp starts, as in Flower's ``run_simulation`` (see
    ``Channel.wait_for_nodes``)."""

    def __init__(self, *args, up_to: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.up_to, self.calls = up_to, 0

    def get_node_ids(self):
        self.calls += 1
        return sorted(self.node_configs)[:min(self.calls - 1, self.up_to)]


def test_phase_one_waits_for_late_nodes_and_notes_the_missing(trained, tmp_path):
    for name in NAMES:
        shutil.copytree(trained / "clients" / name, tmp_path / "clients" / name)
    configs = {n: {"client-dir": str(tmp_path / "clients" / c)} for n, c in NODES.items()}
    late = LateGrid(make_client_app(), configs, up_to=3)
    assert sorted(Channel(late, "late", tmp_path / "late.jsonl", timeout_s=60).train_all(
        timeout_s=60, expected=3, wait_s=30)) == NAMES
    assert late.calls == 4 and not (tmp_path / "late.jsonl").exists()
    # without waiting, the same grid gives phase 1 no node at all
    assert Channel(LateGrid(make_client_app(), configs, up_to=3), "early", tmp_path / "early.jsonl",
                   timeout_s=60).train_all(timeout_s=60) == {}
    # a node that never comes: phase 1 goes on with the others after wait_s, and says so
    partial = Channel(LateGrid(make_client_app(), configs, up_to=2), "partial", tmp_path / "partial.jsonl",
                      timeout_s=60).train_all(timeout_s=60, expected=3, wait_s=0.5)
    assert sorted(partial) == NAMES[:2]
    (event,) = map(json.loads, (tmp_path / "partial.jsonl").read_text().splitlines())
    assert event["kind"] == "nodes_missing" and event["expected"] == 3 and event["present"] == 2


class RecordingReward(MixtureReward):
    """The real MixtureReward; keeps what each GRPO step asked and got, to recompute it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, prompts, completions, idx, **kw):
        out = super().__call__(prompts, completions, idx, **kw)
        self.calls.append({"idx": np.asarray(idx), "reward": np.asarray(out)})
        return out


@pytest.mark.parametrize("mode", ["silent", "raises"])
def test_client_dropping_out_mid_grpo_leaves_the_run_going_with_renormalised_weights(trained, tmp_path,
                                                                                     monkeypatch, mode):
    for name in NAMES:  # each case starts from the same trained clients, with its own ledgers
        shutil.copytree(trained / "clients" / name, tmp_path / "clients" / name)
    grid = DroppingGrid(make_client_app(), {n: {"client-dir": str(tmp_path / "clients" / c)} for n, c in NODES.items()})
    channel = Channel(grid, "dropout-run", tmp_path / "events.jsonl", timeout_s=60)
    assert sorted(channel.train_all(timeout_s=60)) == NAMES

    snapshot, asked = {}, []
    real_rm_score = RewardModel.score

    def failing_rm_score(self, *a, **kw):
        if getattr(self, "_fail", False):
            raise RuntimeError("reward model crashed while scoring")
        return real_rm_score(self, *a, **kw)

    monkeypatch.setattr(RewardModel, "score", failing_rm_score)

    def scorer(imgs, qs, responses, index):
        if len(asked) == FAIL_AFTER:  # beta fails from step 3 on
            snapshot.update({c: (tmp_path / "clients" / c / "ledger.jsonl").read_bytes() for c in NAMES})
            if mode == "silent":
                grid.silenced = {n for n, c in NODES.items() if c == "beta"}
            else:
                from mor_secure.federation.client_app import _NODES

                (node,) = [nd for nd in _NODES.values() if nd.folder == (tmp_path / "clients" / "beta").resolve()]
                node.reward_model._fail = True
        scores, present = channel.score(imgs, qs, responses, index, phase="grpo", purpose="score policy samples")
        asked.append((scores, present))
        return scores, present

    policy_dir = trained / "policy_base"
    from mor_secure.models.factory import load_vlm

    policy = load_vlm(policy_dir)
    policy.model.config._name_or_path = str(policy_dir)
    samples = make_samples("shapes", "colour", 8, seed=1, image_size=16, pool="public")
    images, questions = [s["image"] for s in samples], [s["question"] for s in samples]
    feats = prompt_features(policy, images, questions)
    torch.manual_seed(0)
    router = Router(feats.shape[1], channel.order, components=4)
    router.fit_projection(feats)
    with torch.no_grad():
        router.raw_scale.copy_(torch.tensor([0.5, -0.3, 1.0]))
    reward = RecordingReward(scorer, router, feats, images, questions)
    cfg = GrpoSection(steps=STEPS, prompts_per_step=2, num_generations=2, max_completion_length=1)
    history = run_grpo(policy, build_dataset(images, questions, [s["family"] for s in samples]), reward, cfg,
                       out_dir=tmp_path / "trainer", seed=0, progress=False)

    # the run went on: every step ran and was rewarded
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert all(np.isfinite(h["reward"]) for h in history)
    present_by_step = [s["clients_present"] for s in reward.log.steps]
    assert present_by_step == [[True, True, True]] * FAIL_AFTER + [[True, False, True]] * (STEPS - FAIL_AFTER)

    # after the dropout: rewards are the mixture renormalised over alpha and gamma (numpy, from the logits)
    with torch.no_grad():
        logits = router.logits(feats).numpy().astype(np.float64)
        scale = router.scale.numpy().astype(np.float64)
    for call, (scores, present) in list(zip(reward.calls, asked))[FAIL_AFTER:]:
        assert not present[:, 1].any() and present[:, [0, 2]].all()
        lg = np.where(present, logits[call["idx"]], -np.inf)
        w = np.exp(lg - lg.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        assert np.allclose(w.sum(axis=1), 1.0) and np.all(w[:, 1] == 0) and np.all(w[:, [0, 2]] > 0)
        want = (w * np.where(present, scores, 0.0) * scale).sum(axis=1)
        np.testing.assert_allclose(call["reward"], want, rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(call["reward"])) and np.any(want != 0)

    # the event is logged, once per step beta missed, with its reason; a silent client is not
    # asked at step 4 (backoff after its timeout at step 3), a failing one is asked every step
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    want = ([("dropped", "no reply within"), ("skipped", "no reply to an earlier request")] if mode == "silent"
            else [("client_error", "reward model crashed")] * (STEPS - FAIL_AFTER))
    mine = [e for e in events if e.get("client") == "beta"]
    assert [e["kind"] for e in mine] == [k for k, _ in want] and all(e["phase"] == "grpo" for e in mine)
    assert all(reason in e["reason"] for e, (_, reason) in zip(mine, want))
    assert [e for e in events if e.get("client") != "beta"] == []

    # ledgers: verify, and keep every entry they had when beta failed
    lost = 0
    for name in NAMES:
        path = tmp_path / "clients" / name / "ledger.jsonl"
        assert verify_ledger(path, load_public_key(path.parent / "ledger_key.pub")).ok, name
        before, now = snapshot[name].splitlines(), path.read_bytes().splitlines()
        lost += sum(1 for i, line in enumerate(before) if i >= len(now) or now[i] != line)
        grpo = [json.loads(x)["context"]["phase"] for x in now].count("grpo")
        # silent: beta never got steps 3-4; raises: entries written before its reward model failed
        assert grpo == (FAIL_AFTER if name == "beta" and mode == "silent" else STEPS), (name, grpo)
    assert lost == 0
    assert len(snapshot["beta"].splitlines()) == 1 + FAIL_AFTER  # training + steps 1-2 when it failed
    record("tests/test_dropout.py::test_client_dropping_out_mid_grpo_leaves_the_run_going_with_renormalised_weights",
           faults=1, runs=1, runs_finished=1, ledger_entries_lost=lost)
