"""Plan a client's noise before a run: DP-SGD noise for phase 1 and score noise for the output route.

Every epsilon is record-level ``(epsilon, delta)``-DP for one preference record of one client
(add/remove relation). Each route is planned to meet ``target_epsilon`` *alone*; the guarantee a
client ends with is the smaller route (see :mod:`mor_secure.privacy.accounting`).

* DP-SGD: Opacus' data loader with Poisson sampling, as ``make_private`` builds it from a loader of
  ``batch_size``: ``steps_per_epoch = ceil(num_records / batch_size)``, ``sample_rate =
  1 / steps_per_epoch``, ``steps = epochs * steps_per_epoch``. The noise multiplier is Opacus'
  ``get_noise_multiplier`` (``opacus_accountant``, default ``"prv"``); if the primary accountant
  (dp-accounting PLD) disagrees and puts it above the target, it is raised by bisection over
  that accountant, so :class:`~mor_secure.privacy.budget.BudgetGuard` accepts the training.
* Output route: the smallest per-release noise std (relative 1e-3) such that ``score_releases``
  releases of ``score_count`` scores clipped to ``[-clip_bound, clip_bound]`` compose to at most
  the target under the primary accountant (bisection over it).
* Per phase (``phase_releases``, e.g. ``{"router_fit": 1, "grpo": 200}`` in run order): the epsilon
  each phase would spend on each route, and the stated guarantee after it. Training is phase
  ``rm_training``; it releases nothing by itself, and on the DP-SGD route later phases cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from opacus.accountants.utils import get_noise_multiplier

from mor_secure.errors import ConfigError
from mor_secure.privacy.accounting import ACCOUNTANTS, PRIMARY_ACCOUNTANT, client_guarantee, epsilon_dpsgd, epsilon_output
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease

_REL_TOL = 1e-3


@dataclass(frozen=True)
class DpSgdPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    num_records: int
    opacus_accountant: str
    epsilon: Mapping[str, float]  # by accountant

    def event(self, *, max_grad_norm: float) -> DpSgdTraining:
        """The ledger event of the training this plan describes."""
        return DpSgdTraining(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            max_grad_norm=max_grad_norm,
            num_records=self.num_records,
        )


@dataclass(frozen=True)
class OutputPlan:
    releases: int
    count: int
    clip_bound: float
    noise_std: float
    noise_multiplier: float  # noise_std / (2 * clip_bound * sqrt(count))
    epsilon: Mapping[str, float]  # by accountant, all releases composed
    phase_releases: Mapping[str, int] = field(default_factory=dict)  # in run order; empty: not split

    def event(self) -> GaussianScoreRelease:
        """The ledger event of one release this plan describes."""
        return GaussianScoreRelease(noise_std=self.noise_std, clip_bound=self.clip_bound, count=self.count)


@dataclass(frozen=True)
class Plan:
    target_epsilon: float
    delta: float
    dpsgd: DpSgdPlan | None
    output: OutputPlan | None

    def to_dict(self) -> dict:
        return {**asdict(self), "phases": self.phases()}

    def phases(self) -> list[dict]:
        """Epsilon (primary accountant) each phase would spend, in run order: ``dpsgd`` and ``output``
        (the phase alone on each route), ``output_cumulative`` and ``stated`` (the guarantee after the
        phase: the smaller route so far; 0 until the first release)."""
        rows, dpsgd_eps = [], math.inf
        if self.dpsgd:
            dpsgd_eps = self.dpsgd.epsilon[PRIMARY_ACCOUNTANT]
            rows.append({"phase": "rm_training", "releases": 0, "dpsgd": dpsgd_eps, "output": 0.0,
                         "output_cumulative": 0.0, "stated": 0.0})
        if self.output and self.output.phase_releases:
            event, done = self.output.event(), 0
            for phase, n in self.output.phase_releases.items():
                done += n
                cumulative = epsilon_output([event] * done, self.delta)
                rows.append({"phase": phase, "releases": n, "dpsgd": 0.0 if self.dpsgd else math.inf,
                             "output": epsilon_output([event] * n, self.delta), "output_cumulative": cumulative,
                             "stated": min(dpsgd_eps, cumulative)})
        return rows

    def render(self) -> str:
        lines = [f"Privacy plan per client: target (epsilon={self.target_epsilon:g}, delta={self.delta:g}) "
                 "for one preference record (add/remove), each route alone."]
        if self.dpsgd:
            d = self.dpsgd
            lines.append(
                f"DP-SGD: N={d.num_records}, batch={d.batch_size} -> sample_rate={d.sample_rate:.4g}, "
                f"{d.steps_per_epoch} steps/epoch x {d.epochs} epochs = {d.steps} steps; "
                f"noise_multiplier={d.noise_multiplier:.4f} (Opacus {d.opacus_accountant})"
            )
            lines += _table(d.epsilon)
        if self.output:
            o = self.output
            lines.append(
                f"Output route: {o.releases} releases x {o.count} scores in [-{o.clip_bound:g}, {o.clip_bound:g}]; "
                f"noise_std={o.noise_std:.4f} per score (noise_multiplier={o.noise_multiplier:.4f})"
            )
            lines += _table(o.epsilon)
        rows = self.phases()
        if len(rows) > 1:
            lines.append(f"Epsilon each phase would spend ({PRIMARY_ACCOUNTANT}; 'stated' is the guarantee after the phase):")
            lines.append(f"  {'phase':<14} {'releases':>8} {'DP-SGD route':>13} {'output route':>13} "
                         f"{'output so far':>14} {'stated':>10}")
            lines += [f"  {r['phase']:<14} {r['releases']:>8} {r['dpsgd']:>13.4f} {r['output']:>13.4f} "
                      f"{r['output_cumulative']:>14.4f} {r['stated']:>10.4f}" for r in rows]
        return "\n".join(lines)


def _table(epsilons: Mapping[str, float]) -> list[str]:
    rows = [f"  {'accountant':<12} {'epsilon':>10}"]
    rows += [f"  {name + (' *' if name == PRIMARY_ACCOUNTANT else ''):<12} {eps:>10.4f}" for name, eps in epsilons.items()]
    return rows


def _smallest_noise(eps_of: Callable[[float], float], target: float, start: float) -> float:
    """Smallest noise (relative tolerance ``_REL_TOL``) with ``eps_of(noise) <= target``; ``eps_of``
    is decreasing in the noise and computed by a maintained accountant."""
    lo, hi = 0.0, start
    while eps_of(hi) > target:
        lo, hi = hi, 2 * hi
        if hi > 1e8:
            raise ConfigError(f"target_epsilon={target} cannot be reached with finite noise; raise it.")
    while hi - lo > _REL_TOL * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps_of(mid) <= target else (mid, hi)
    return hi


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}. Found {value!r}.")
    return value


def dpsgd_schedule(num_records: int, batch_size: int, epochs: int) -> tuple[float, int, int]:
    """``(sample_rate, steps_per_epoch, steps)`` of Opacus' Poisson ``DPDataLoader`` built by
    ``make_private`` from a loader of ``batch_size``: ``len(loader) = ceil(num_records / batch_size)``
    steps per epoch at ``sample_rate = 1 / len(loader)``."""
    steps_per_epoch = math.ceil(num_records / batch_size)
    return 1 / steps_per_epoch, steps_per_epoch, epochs * steps_per_epoch


def calibrate_dpsgd(
    *, target_epsilon: float, delta: float, num_records: int, epochs: int, batch_size: int,
    max_grad_norm: float = 1.0, opacus_accountant: str = "prv",
) -> DpSgdTraining:
    """The ledger event of a DP-SGD training that meets ``(target_epsilon, delta)``: the schedule
    Opacus will run (:func:`dpsgd_schedule`) and the noise multiplier from Opacus'
    ``get_noise_multiplier``, raised by bisection if the primary accountant (dp-accounting PLD) puts
    it above the target, so the client's budget guard accepts exactly this training."""
    sample_rate, _, steps = dpsgd_schedule(num_records, batch_size, epochs)

    def training(z: float) -> DpSgdTraining:
        return DpSgdTraining(noise_multiplier=z, sample_rate=sample_rate, steps=steps, max_grad_norm=max_grad_norm,
                             num_records=num_records)

    try:
        z = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                 steps=steps, accountant=opacus_accountant)
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise ConfigError(f"target_epsilon={target_epsilon} is out of reach for {steps} steps at "
                          f"sample_rate={sample_rate:.4g}: {exc}") from exc
    if epsilon_dpsgd([training(z)], delta) > target_epsilon:  # the primary accountant must agree
        z = _smallest_noise(lambda s: epsilon_dpsgd([training(s)], delta), target_epsilon, z)
    return training(float(z))


def _plan_dpsgd(target: float, delta: float, num_records: int, epochs: int, batch_size: int, accountant: str) -> DpSgdPlan:
    _, steps_per_epoch, _ = dpsgd_schedule(num_records, batch_size, epochs)
    event = calibrate_dpsgd(target_epsilon=target, delta=delta, num_records=num_records, epochs=epochs,
                            batch_size=batch_size, opacus_accountant=accountant)
    eps = client_guarantee([event], delta, ACCOUNTANTS).by_accountant["dpsgd"]
    return DpSgdPlan(event.noise_multiplier, event.sample_rate, event.steps, steps_per_epoch, epochs, batch_size,
                     num_records, accountant, dict(eps))


def _plan_output(target: float, delta: float, releases: int, count: int, clip_bound: float,
                 phase_releases: Mapping[str, int]) -> OutputPlan:
    def events(std: float) -> list[GaussianScoreRelease]:
        return [GaussianScoreRelease(noise_std=std, clip_bound=clip_bound, count=count)] * releases

    sensitivity = events(1.0)[0].l2_sensitivity
    std = _smallest_noise(lambda s: epsilon_output(events(s), delta), target, sensitivity)
    eps = client_guarantee(events(std), delta, ACCOUNTANTS).by_accountant["output"]
    return OutputPlan(releases, count, clip_bound, std, std / sensitivity, dict(eps), dict(phase_releases))


def plan_budget(
    *,
    target_epsilon: float,
    delta: float,
    num_records: int,
    epochs: int | None,
    batch_size: int,
    score_releases: int = 0,
    score_count: int = 0,
    clip_bound: float | None = None,
    opacus_accountant: str = "prv",
    phase_releases: Mapping[str, int] | None = None,
) -> Plan:
    """Plan DP-SGD noise (``epochs=None``: no DP training) and per-release score noise
    (``score_releases=0``: none) so that each route alone meets ``(target_epsilon, delta)``.
    ``phase_releases`` (phase -> releases, in run order) splits the releases by phase; it replaces
    ``score_releases``."""
    phase_releases = dict(phase_releases or {})
    for phase, n in phase_releases.items():
        if not isinstance(phase, str) or not phase or phase == "rm_training":
            raise ConfigError(f"phase_releases keys must be release phases (not rm_training). Found {phase!r}.")
        _positive_int(f"phase_releases[{phase!r}]", n)
    if phase_releases:
        if score_releases not in (0, sum(phase_releases.values())):
            raise ConfigError(f"score_releases={score_releases} disagrees with phase_releases (total "
                              f"{sum(phase_releases.values())}); give one of them.")
        score_releases = sum(phase_releases.values())
    if not isinstance(target_epsilon, (int, float)) or not 0 < target_epsilon < math.inf:
        raise ConfigError(f"target_epsilon must be a finite number > 0. Found {target_epsilon!r}.")
    _positive_int("num_records", num_records)
    if not isinstance(delta, (int, float)) or not 0 < delta < 1 / num_records:
        raise ConfigError(f"delta must be in (0, 1/num_records = {1 / num_records:.3g}). Found {delta!r}.")
    if opacus_accountant not in ("prv", "rdp"):
        raise ConfigError(f"opacus_accountant must be 'prv' or 'rdp'. Found {opacus_accountant!r}.")
    if epochs is not None:
        _positive_int("epochs", epochs)
        if _positive_int("batch_size", batch_size) > num_records:
            raise ConfigError(f"batch_size must be <= num_records={num_records}. Found {batch_size}.")
    if _positive_int("score_releases", score_releases, minimum=0):
        _positive_int("score_count", score_count)
        if not isinstance(clip_bound, (int, float)) or not 0 < clip_bound < math.inf:
            raise ConfigError(f"clip_bound (scores are clipped to [-B, B]) must be a finite number > 0. Found {clip_bound!r}.")
    dpsgd = _plan_dpsgd(target_epsilon, delta, num_records, epochs, batch_size, opacus_accountant) if epochs else None
    output = (_plan_output(target_epsilon, delta, score_releases, score_count, clip_bound, phase_releases)
              if score_releases else None)
    return Plan(target_epsilon, delta, dpsgd, output)
