"""Timing pieces the benchmarks share: medians, per-step RM training times, a timed GRPO reward.

Kept apart from ``perf`` (which builds a Flower ServerApp when imported) so that ``bench device``
runs where only the model stack is installed.
"""

from __future__ import annotations

import bisect
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


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


class _Turns:
    """Threads that take turns in a fixed order: one holds the turn at a time, the others wait."""

    def __init__(self, names: Sequence[str]) -> None:
        self.order = list(names)
        self.current = self.order[0]
        self.cv = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.current == name)

    def _pass_on(self, name: str) -> None:  # the caller holds the lock and the turn
        k = self.order.index(name)
        self.current = self.order[(k + 1) % len(self.order)]
        self.cv.notify_all()

    def done(self, name: str) -> None:
        """``name``'s turn ends; the next in order takes it."""
        with self.cv:
            if self.current != name:
                raise RuntimeError(f"{name} ended a turn that {self.current} holds")
            self._pass_on(name)

    def leave(self, name: str) -> None:
        """``name`` leaves the rotation; if it held the turn, the next in order takes it."""
        with self.cv:
            if self.current == name and len(self.order) > 1:
                self._pass_on(name)
            self.order.remove(name)
            self.cv.notify_all()


def paired_ratios(sides: Sequence[dict], bases: Sequence[dict], key: str = "cpu_intervals") -> tuple[float, list[float]]:
    """Steps timed while taking turns (``train_interleaved``), one run per repeat on each side: each
    step of ``sides`` over the step of ``bases`` at the same index in the same repeat. Returns the
    median over every pair of every repeat, and each repeat's median."""
    per_repeat = [[d / b for d, b in zip(side[key], base[key], strict=True)] for side, base in zip(sides, bases, strict=True)]
    return median([x for rep in per_repeat for x in rep]), [median(rep) for rep in per_repeat]


def train_interleaved(runs: dict[str, tuple[Callable[[], object], bool, str]], pairs: list[dict], *,
                      settings_base, sync: Callable[[], None] | None = None,
                      timeout_s: float | None = None) -> dict[str, dict | BaseException]:
    """Real ``train_reward_model`` runs, one per entry ``name: (build_rm, dp, grad_sample_mode)``, that
    take turns step by step in the order given: step k of every run, then step k + 1 of every run.

    Each run is its own thread and only the thread holding the turn computes (the others wait on a
    condition, using no CPU), so each step is timed alone, in wall-clock and in its thread's CPU time,
    while the steps it is compared with run just before and after it: a machine whose speed drifts
    (a shared host) slows both sides of a comparison alike. A run holds the turn from its start
    (building the RM, encoding, Opacus' setup) to the start of its second step, then for one step at a
    time, and from its last step to its end. A step is timed from its first forward pass to the next
    step's, per-step times from hooks on the RM; the first step (caches) and the last (no next step
    marks its end) are left out. ``sync`` (an accelerator's synchronize) runs before each time is read.
    Returns, per name, the timings or the exception that ended the run; TimeoutError, naming the run
    whose turn it is, when the runs take longer than ``timeout_s`` together."""
    from dataclasses import replace

    from mor_secure.rewards.train import train_reward_model

    sync = sync or (lambda: None)
    turns = _Turns(list(runs))
    out: dict[str, dict | BaseException] = {}

    def one(name: str, build_rm: Callable[[], object], dp: bool, mode: str) -> None:
        starts: list[tuple[float, float]] = []  # each step's start (wall, thread CPU), once it holds the turn
        ends: list[tuple[float, float]] = []  # each step's end but the last: the next step's first forward
        forward_cpu: list[float] = []  # CPU time of each forward pass
        forward_wall: list[float] = []
        passes = [0]
        t0: list[tuple[float, float]] = []

        def pre(_m, _a):
            sync()
            if passes[0] % 2 == 0:  # a step's first forward pass (two per step: chosen, rejected)
                if starts:  # the previous step ends here; the other runs take their step
                    ends.append((time.perf_counter(), time.thread_time()))
                    turns.done(name)
                    turns.wait(name)
                starts.append((time.perf_counter(), time.thread_time()))
            passes[0] += 1
            t0.append((time.perf_counter(), time.thread_time()))

        def post(_m, _a, _o):
            sync()
            forward_cpu.append(time.thread_time() - t0[-1][1])
            forward_wall.append(time.perf_counter() - t0[-1][0])

        try:
            turns.wait(name)
            torch.get_num_threads()  # applies the process's thread count (set_num_threads) to this thread
            rm = build_rm()
            rm.register_forward_pre_hook(pre)
            rm.register_forward_hook(post)
            settings = replace(settings_base, dp=dp, grad_sample_mode=mode)
            result = train_reward_model(rm, pairs, settings, authorize=lambda _event: None, progress=False)
            if passes[0] != 2 * result.steps:
                raise RuntimeError(f"{passes[0]} forward passes for {result.steps} steps (an empty Poisson batch?)")
            s, e = np.asarray(starts[1:len(ends)]), np.asarray(ends[1:])  # the first step left out
            wall, cpu = e[:, 0] - s[:, 0], e[:, 1] - s[:, 1]
            fwd = (np.asarray(forward_cpu[0::2]) + np.asarray(forward_cpu[1::2]))[1:len(ends)]
            fwd_wall = (np.asarray(forward_wall[0::2]) + np.asarray(forward_wall[1::2]))[1:len(ends)]
            out[name] = {"step_s": median(wall.tolist()), "step_cpu_s": median(cpu.tolist()), "intervals": wall.tolist(),
                         "forward_cpu_s": median(fwd.tolist()), "rest_cpu_s": median((cpu - fwd).tolist()),
                         "forward_s": median(fwd_wall.tolist()), "rest_s": median((wall - fwd_wall).tolist()),
                         "cpu_intervals": cpu.tolist(), "steps": result.steps,
                         "loss_last": result.losses[-1] if result.losses else float("nan")}
        except BaseException as exc:  # noqa: BLE001 - the caller decides (a DP mode that fails is a result)
            out[name] = exc
        finally:
            turns.leave(name)

    threads = [threading.Thread(target=one, args=(name, *spec), name=f"rm-{name}", daemon=True)
               for name, spec in runs.items()]
    for t in threads:
        t.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise TimeoutError(f"RM training runs still going after {timeout_s} s; {turns.current}'s turn")
    return out


def train_once(build_rm: Callable[[], object], pairs: list[dict], *, dp: bool, mode: str, settings_base,
               sync: Callable[[], None] | None = None, timeout_s: float | None = None) -> dict:
    """One real ``train_reward_model`` run on ``build_rm()`` (``train_interleaved`` with one run);
    raises what the run raised."""
    return row_or_raise(train_interleaved({"run": (build_rm, dp, mode)}, pairs, settings_base=settings_base,
                                          sync=sync, timeout_s=timeout_s)["run"])


def row_or_raise(got: dict | BaseException) -> dict:
    """A run's timings from ``train_interleaved``, or the exception that ended it, raised."""
    if isinstance(got, BaseException):
        raise got
    return got


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


class CpuSampler:
    """The CPU time (user + system, its own threads, not its children's) of one process, sampled
    every ``every_s`` on a thread of this process until ``stop``; :meth:`between` interpolates
    between samples on the wall clock (``time.time``, the clock of ``federation.hops``)."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self._every = every_s
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._done.is_set():
            try:
                times = self._proc.cpu_times()
            except psutil.Error:  # the process ended
                return
            self.samples.append((time.time(), times.user + times.system))
            self._done.wait(self._every)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def at(self, t: float) -> float | None:
        """The process's CPU seconds at wall-clock ``t`` (linear between the samples around it);
        None outside the sampled span."""
        s = self.samples
        if len(s) < 2 or not s[0][0] <= t <= s[-1][0]:
            return None
        i = max(1, bisect.bisect_left(s, (t, float("-inf"))))
        (t0, c0), (t1, c1) = s[i - 1], s[i]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)

    def between(self, t0: float, t1: float) -> float | None:
        a, b = self.at(t0), self.at(t1)
        return None if a is None or b is None else b - a
