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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

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
        return asdict(self)

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


def _plan_dpsgd(target: float, delta: float, num_records: int, epochs: int, batch_size: int, accountant: str) -> DpSgdPlan:
    steps_per_epoch = math.ceil(num_records / batch_size)
    sample_rate, steps = 1 / steps_per_epoch, epochs * steps_per_epoch

    def training(z: float) -> DpSgdTraining:
        return DpSgdTraining(noise_multiplier=z, sample_rate=sample_rate, steps=steps, max_grad_norm=1.0, num_records=num_records)

    try:
        z = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise ConfigError(f"target_epsilon={target} is out of reach for {steps} steps at sample_rate={sample_rate:.4g}: {exc}") from exc
    if epsilon_dpsgd([training(z)], delta) > target:  # the primary accountant must agree
        z = _smallest_noise(lambda s: epsilon_dpsgd([training(s)], delta), target, z)
    eps = client_guarantee([training(z)], delta, ACCOUNTANTS).by_accountant["dpsgd"]
    return DpSgdPlan(z, sample_rate, steps, steps_per_epoch, epochs, batch_size, num_records, accountant, dict(eps))


def _plan_output(target: float, delta: float, releases: int, count: int, clip_bound: float) -> OutputPlan:
    def events(std: float) -> list[GaussianScoreRelease]:
        return [GaussianScoreRelease(noise_std=std, clip_bound=clip_bound, count=count)] * releases

    sensitivity = events(1.0)[0].l2_sensitivity
    std = _smallest_noise(lambda s: epsilon_output(events(s), delta), target, sensitivity)
    eps = client_guarantee(events(std), delta, ACCOUNTANTS).by_accountant["output"]
    return OutputPlan(releases, count, clip_bound, std, std / sensitivity, dict(eps))


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
) -> Plan:
    """Plan DP-SGD noise (``epochs=None``: no DP training) and per-release score noise
    (``score_releases=0``: none) so that each route alone meets ``(target_epsilon, delta)``."""
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
    output = _plan_output(target_epsilon, delta, score_releases, score_count, clip_bound) if score_releases else None
    return Plan(target_epsilon, delta, dpsgd, output)
