"""Timing pieces the benchmarks share: medians, per-step RM training times, a timed GRPO reward.

Kept apart from ``perf`` (which builds a Flower ServerApp when imported) so that ``bench device``
runs where only the model stack is installed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def ratios(xs: Sequence[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def client_rm(node):
    """A fresh RM built as ``ClientNode.train`` builds it (the client's family, LoRA, seed)."""
    from mor_secure.rewards.reward_model import LORA_TARGETS, VISION_LORA_TARGETS, RewardModel

    t = node.config.training
    return RewardModel(node.build_backbone(), lora_r=t.lora_r, seed=node.setup.seed,
                       lora_targets=VISION_LORA_TARGETS if t.lora_vision else LORA_TARGETS)


def try_mode(name: str, attempt: Callable[[], dict], *, working: list[str], families: Sequence[str],
             runs: dict[str, dict[str, list[dict]]], failed: dict[str, str]) -> dict | None:
    """``attempt()`` for one run of grad-sample mode ``name``. A DP mode Opacus or our training loop
    rejects is a result: its error (first line) goes to ``failed``, the mode leaves ``working`` and its
    runs so far leave ``runs``; None is returned. The non-private run (``"none"``) raises."""
    try:
        return attempt()
    except Exception as exc:  # noqa: BLE001 - a mode that fails is a result
        if name == "none":
            raise
        failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        working.remove(name)
        for fam in families:
            runs[fam].pop(name, None)
        return None


def train_once(build_rm: Callable[[], object], pairs: list[dict], *, dp: bool, mode: str, settings_base,
                sync: Callable[[], None] | None = None) -> dict:
    """One real ``train_reward_model`` run on ``build_rm()``; per-step times from a forward pre-hook
    on the RM. ``sync`` (an accelerator's synchronize) runs before each time is read, so a step's
    queued GPU work is counted in that step."""
    from dataclasses import replace

    from mor_secure.rewards.train import train_reward_model

    rm = build_rm()
    forwards: list[tuple[float, float]] = []
    forward_cpu: list[float] = []  # CPU time of each forward pass
    forward_wall: list[float] = []  # wall time of each forward pass
    sync = sync or (lambda: None)

    def pre(_m, _a):
        sync()
        forwards.append((time.perf_counter(), time.thread_time()))

    def post(_m, _a, _o):
        sync()
        forward_cpu.append(time.thread_time() - forwards[-1][1])
        forward_wall.append(time.perf_counter() - forwards[-1][0])

    rm.register_forward_pre_hook(pre)
    rm.register_forward_hook(post)
    settings = replace(settings_base, dp=dp, grad_sample_mode=mode)
    result = train_reward_model(rm, pairs, settings, authorize=lambda _event: None, progress=False)
    starts = np.asarray(forwards[::2])  # two forward passes per step: chosen, rejected
    if len(forwards) != 2 * result.steps:
        raise RuntimeError(f"{len(forwards)} forward passes for {result.steps} steps (an empty Poisson batch?)")
    wall, cpu = np.diff(starts[:, 0])[1:], np.diff(starts[:, 1])[1:]  # the first step (caches) is left out
    fwd = (np.asarray(forward_cpu[0::2]) + np.asarray(forward_cpu[1::2]))[1:-1]  # both passes, steps timed
    fwd_wall = (np.asarray(forward_wall[0::2]) + np.asarray(forward_wall[1::2]))[1:-1]
    return {"step_s": median(wall.tolist()), "step_cpu_s": median(cpu.tolist()), "intervals": wall.tolist(),
            "forward_cpu_s": median(fwd.tolist()), "rest_cpu_s": median((cpu - fwd).tolist()),
            "forward_s": median(fwd_wall.tolist()), "rest_s": median((wall - fwd_wall).tolist()),
            "cpu_intervals": cpu.tolist(), "steps": result.steps,
            "loss_last": result.losses[-1] if result.losses else float("nan")}





@dataclass
class TimedReward:
    """The GRPO reward, timed per call (TRL names the reward column after ``__name__``)."""

    inner: Callable
    starts: list[float]
    seconds: list[float]
    on_call: Callable[[], None] | None = None
    cpu_starts: list[float] = field(default_factory=list)
    __name__ = "mixture_reward"

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        self.cpu_starts.append(time.thread_time())
        out = self.inner(*args, **kwargs)
        self.starts.append(start)
        self.seconds.append(time.perf_counter() - start)
        if self.on_call is not None:
            self.on_call()
        return out
