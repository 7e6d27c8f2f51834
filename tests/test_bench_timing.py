"""The RM step timer of ``bench perf`` (a): real ``train_reward_model`` runs that take turns step by
step, so a DP step is timed right beside the non-private step it is compared with."""

import functools

import pytest

from mor_secure.bench.timing import train_interleaved, train_once
from mor_secure.data import make_samples, vocabulary
from mor_secure.models.factory import build_vlm
from mor_secure.rewards.reward_model import RewardModel
from mor_secure.rewards.train import TrainSettings

STEPS = 5
SETTINGS = TrainSettings(epochs=STEPS, batch_size=16, lr=0.1, dp=False, target_epsilon=8.0, delta=1e-5)


@pytest.fixture(scope="module")
def pairs():
    samples = make_samples("shapes", "colour", 16, seed=3)
    return [{"image": s["image"], "question": s["question"], "chosen": "yes", "rejected": "no"} for s in samples]


def build(name: str, log: list[str]) -> RewardModel:
    """A tiny LLaVA RM whose every forward pass notes ``name`` (after the timer's own hooks would
    have waited for the turn: a forward hook runs once the pass is done)."""
    rm = RewardModel(build_vlm("llava", vocabulary(), seed=0), lora_r=2)
    rm.register_forward_hook(lambda *_: log.append(name))
    return rm


def test_runs_take_turns_one_step_each_and_each_is_timed(pairs):
    log: list[str] = []
    runs = {name: (functools.partial(build, name, log), dp, "hooks")
            for name, dp in (("none", False), ("hooks", True), ("again", True))}
    got = train_interleaved(runs, pairs, settings_base=SETTINGS)
    # two forward passes per step (chosen, rejected); step k of every run, in order, then step k + 1
    assert log == [name for _ in range(STEPS) for name in runs for _ in range(2)]
    for name, row in got.items():
        assert isinstance(row, dict), f"{name}: {row!r}"
        assert row["steps"] == STEPS
        # the first step and the last are left out; every timed step took time, CPU time included
        assert len(row["intervals"]) == len(row["cpu_intervals"]) == STEPS - 2
        assert all(t > 0 for t in row["intervals"] + row["cpu_intervals"])
        assert 0 < row["forward_cpu_s"] < row["step_cpu_s"]


def test_a_run_that_fails_leaves_the_rotation_and_the_others_finish(pairs):
    """Opacus' ghost clipping needs a loss it wraps itself; our loop's call fails. That run's error is
    its result, and the remaining runs still take turns to the end."""
    log: list[str] = []
    runs = {"none": (functools.partial(build, "none", log), False, "hooks"),
            "ghost": (functools.partial(build, "ghost", log), True, "ghost"),
            "hooks": (functools.partial(build, "hooks", log), True, "hooks")}
    got = train_interleaved(runs, pairs, settings_base=SETTINGS)
    assert isinstance(got["ghost"], ValueError)
    assert "ghost" not in log
    assert log == [name for _ in range(STEPS) for name in ("none", "hooks") for _ in range(2)]
    assert got["none"]["steps"] == got["hooks"]["steps"] == STEPS
    with pytest.raises(ValueError):
        train_once(functools.partial(build, "ghost", []), pairs, dp=True, mode="ghost", settings_base=SETTINGS)
    alone = train_once(functools.partial(build, "alone", []), pairs, dp=False, mode="hooks", settings_base=SETTINGS)
    assert alone["steps"] == STEPS and len(alone["cpu_intervals"]) == STEPS - 2
