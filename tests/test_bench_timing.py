"""The RM step timer of ``bench perf`` (a): real ``train_reward_model`` runs that take turns step by
step, so a DP step is timed right beside the non-private step it is compared with."""

import functools

import pytest

from mor_secure.bench.timing import paired_ratios, train_interleaved, train_once
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


TIMEOUT_S = 300  # a rotation that never passes the turn on fails the test instead of hanging it


def build(name: str, log: list[str], fail_at: int | None = None) -> RewardModel:
    """A tiny LLaVA RM whose every forward pass notes ``name`` (after the timer's own hooks would
    have waited for the turn: a forward hook runs once the pass is done); with ``fail_at``, forward
    pass number ``fail_at`` (from 0) raises instead."""
    rm = RewardModel(build_vlm("llava", vocabulary(), seed=0), lora_r=2)

    def note(*_):
        if fail_at is not None and sum(n == name for n in log) == fail_at:
            raise RuntimeError(f"{name}: planted failure")
        log.append(name)

    rm.register_forward_hook(note)
    return rm


def test_runs_take_turns_one_step_each_and_each_is_timed(pairs):
    log: list[str] = []
    runs = {name: (functools.partial(build, name, log), dp, "hooks")
            for name, dp in (("none", False), ("hooks", True), ("again", True))}
    got = train_interleaved(runs, pairs, settings_base=SETTINGS, timeout_s=TIMEOUT_S)
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
    got = train_interleaved(runs, pairs, settings_base=SETTINGS, timeout_s=TIMEOUT_S)
    assert isinstance(got["ghost"], ValueError)
    assert "ghost" not in log
    assert log == [name for _ in range(STEPS) for name in ("none", "hooks") for _ in range(2)]
    assert got["none"]["steps"] == got["hooks"]["steps"] == STEPS
    with pytest.raises(ValueError):
        train_once(functools.partial(build, "ghost", []), pairs, dp=True, mode="ghost", settings_base=SETTINGS)
    alone = train_once(functools.partial(build, "alone", []), pairs, dp=False, mode="hooks", settings_base=SETTINGS)
    assert alone["steps"] == STEPS and len(alone["cpu_intervals"]) == STEPS - 2


def test_a_run_that_fails_mid_rotation_passes_the_turn_on(pairs):
    """A run whose third step fails (its fifth forward pass raises) leaves while holding the turn: the
    others go on taking turns to their last step."""
    log: list[str] = []
    runs = {"none": (functools.partial(build, "none", log), False, "hooks"),
            "broken": (functools.partial(build, "broken", log, fail_at=4), True, "hooks"),
            "hooks": (functools.partial(build, "hooks", log), True, "hooks")}
    got = train_interleaved(runs, pairs, settings_base=SETTINGS, timeout_s=TIMEOUT_S)
    assert isinstance(got["broken"], RuntimeError) and "planted failure" in str(got["broken"])
    both = [name for _ in range(STEPS) for name in ("none", "hooks") for _ in range(2)]
    # steps 0 and 1 of all three in turn; from step 2 on, the two that are left
    expected = [name for _ in range(2) for name in runs for _ in range(2)] + both[8:]
    assert log == expected
    assert got["none"]["steps"] == got["hooks"]["steps"] == STEPS


def test_paired_ratios_pair_steps_of_the_same_turn():
    """Each DP step over the non-private step at the same index of the same repeat; the median over all
    pairs and each repeat's median. A drift that doubles both sides from one step to the next (the
    host slowing down) leaves every paired ratio at 1.5, while the unpaired medians would mix steps."""
    bases = [{"cpu_intervals": [0.2, 0.4, 0.2]}, {"cpu_intervals": [0.1, 0.1, 0.4]}]
    sides = [{"cpu_intervals": [0.3, 0.6, 0.3]}, {"cpu_intervals": [0.15, 0.15, 0.6]}]
    pooled, per_repeat = paired_ratios(sides, bases)
    assert pooled == pytest.approx(1.5) and per_repeat == pytest.approx([1.5, 1.5])
    sides[1]["cpu_intervals"] = [0.2, 0.3, 0.8]  # ratios 2, 3, 2
    pooled, per_repeat = paired_ratios(sides, bases)
    assert per_repeat == pytest.approx([1.5, 2.0]) and pooled == pytest.approx(1.75)  # median of 1.5 x3, 2, 3, 2
    with pytest.raises(ValueError):  # steps that do not line up are an error, not a silent truncation
        paired_ratios([{"cpu_intervals": [0.3]}], [{"cpu_intervals": [0.2, 0.2]}])


def test_cpu_sampler_reads_another_process_cpu_between_two_moments():
    """The SuperLink's CPU per round trip in ``bench perf`` (b): a child that computes for a while and
    then sleeps shows that CPU time in the first span and next to none in the second; outside the
    sampled span there is no value."""
    import subprocess
    import sys
    import time

    from mor_secure.bench.timing import CpuSampler

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() < t + 0.6: pass\ntime.sleep(30)"])
    try:
        sampler = CpuSampler(child.pid, every_s=0.02)
        start = time.time()
        deadline = start + 60
        while time.time() < deadline and (sampler.samples[-1][1] if sampler.samples else 0) < 0.6:
            time.sleep(0.05)
        time.sleep(0.3)  # the child's busy part is over: 0.6 s, and its start, now behind it
        busy_end = time.time()
        time.sleep(0.5)
        idle_end = time.time()
        time.sleep(0.1)
        sampler.stop()
    finally:
        child.kill()
        child.wait(timeout=30)
    assert sampler.between(sampler.samples[0][0], busy_end) == pytest.approx(0.6, abs=0.15)
    assert sampler.between(busy_end + 0.05, idle_end) < 0.05
    assert sampler.at(start - 60) is None and sampler.between(start, idle_end + 60) is None
