"""Privacy accounting over ledger events, with maintained accountants only.

Unit and relation: one preference record of one client; neighbouring datasets differ by adding
or removing one record. Every epsilon here is for ``(epsilon, delta)``-DP at the given ``delta``.

Accountants (names used everywhere, side by side in reports):

* ``dpa_pld`` -- Google dp-accounting ``PLDAccountant`` (**primary**: guarantees and budgets are
  stated with it). Pessimistic discretisation, so its epsilon is an upper bound. Interval
  ``1e-3 * 2**k`` with the smallest ``k >= 0`` such that the interval is at least ``1e-4`` times
  the ``dpa_rdp`` epsilon: 1e-3 for epsilon in [5, 10] (within ~0.1% of 1e-4 in our checks, ~20x
  faster), halved until it is at most ``2e-4`` times that epsilon for small epsilons (so the
  discretisation error stays well under 1% of epsilon), coarser (nested, still an upper bound) for vacuous epsilons that would be slow;
  reported as ``inf`` when the ``dpa_rdp`` epsilon exceeds ``PLD_VACUOUS_EPSILON`` (1e5), where
  PLD's discretisation overflows and no privacy is left anyway.
* ``dpa_rdp`` -- dp-accounting ``RdpAccountant`` (default orders).
* ``opacus_rdp`` / ``opacus_prv`` -- Opacus ``RDPAccountant`` / ``PRVAccountant`` with history
  ``(noise_multiplier, sample_rate, steps)``; ``n`` equal score releases are ``(z, 1.0, n)``.

Mechanisms: ``DpSgdTraining`` is ``steps`` self-compositions of
``PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier))`` (assumes Poisson
sampling as Opacus' DPDataLoader does, and a public dataset size). ``GaussianScoreRelease`` is
``GaussianDpEvent(noise_std / (2 * clip_bound * sqrt(count)))`` (scores clipped to [-B, B]);
``noise_std == 0`` is not DP: epsilon is infinite.

Routes (DESIGN section 3). The *DP-SGD route* covers every release made after the first
``DpSgdTraining`` entry as post-processing of DP-trained models; it composes all trainings plus
any release recorded *before* the first training (not covered by it), and is infinite when no
training is recorded. The *output route* composes all score releases. The stated guarantee is
the smaller route under the primary accountant. The output route never decreases as events are
added; the DP-SGD route never decreases once it exists (it is infinite before the first training,
and from then on it already includes every earlier release, so it is at least the output route
of that moment). Hence the guarantee never decreases. Training itself releases nothing: until the first score release
the guarantee is 0, and from then on the DP-SGD route caps it. Composition is commutative, so
equal events are grouped by their parameters before composing (bookkeeping, not math).
Nothing is cached across calls.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dp_accounting as dpa
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant

from mor_secure.errors import PrivacyError
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease, PrivacyEvent

PRIMARY_ACCOUNTANT = "dpa_pld"
ACCOUNTANTS = ("dpa_pld", "dpa_rdp", "opacus_rdp", "opacus_prv")
ROUTES = ("dpsgd", "output")
PLD_BASE_INTERVAL = 1e-3
PLD_VACUOUS_EPSILON = 1e5


PRV_MAX_EPSILON = 200.0


def _check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta!r}.")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}. Found {accountant!r}.")


def _compose(trainings: Sequence[DpSgdTraining], releases: Sequence[GaussianScoreRelease], delta: float, accountant: str) -> float:
    """Epsilon of composing the given DP-SGD trainings and Gaussian releases under one accountant."""
    if any(r.noise_std == 0 for r in releases):
        return math.inf
    if not trainings and not releases:
        return 0.0
    sgd = Counter()
    for t in trainings:
        sgd[(t.noise_multiplier, t.sample_rate)] += t.steps
    gauss = Counter(r.noise_multiplier for r in releases)
    return _compose_histogram(tuple(sorted(sgd.items())), tuple(sorted(gauss.items())), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _compose_histogram(sgd: tuple, gauss: tuple, delta: float, accountant: str) -> float:
    """Epsilon of a composition given as its histogram ``((z, q), steps)`` / ``(z, count)``.

    A pure function of its arguments, so it is memoised: the budget check before every release
    recomputes both routes, and the DP-SGD route (releases after training cost nothing on it)
    is the same composition each time (measured: about 50 ms per client per GRPO step before)."""
    sgd, gauss = dict(sgd), dict(gauss)
    if accountant.startswith("opacus_"):
        history = [(z, q, n) for (z, q), n in sgd.items()] + [(z, 1.0, n) for z, n in gauss.items()]
        if accountant == "opacus_prv":
            rdp = RDPAccountant()
            rdp.history = history
            rdp_eps = rdp.get_epsilon(delta=delta)
            if rdp_eps > PRV_MAX_EPSILON:
                # PRV's discretisation grid grows with epsilon and exhausts memory (TiB) long before
                # it overflows; the guarantee is stated with PLD anyway.
                raise PrivacyError(f"opacus_prv not computed: RDP epsilon {rdp_eps:.3g} > {PRV_MAX_EPSILON} "
                                   "is outside the PRV accountant's practical range")
        acct = RDPAccountant() if accountant == "opacus_rdp" else PRVAccountant()
        acct.history = history
        try:
            with np.errstate(divide="ignore", over="ignore"):  # PRV evaluates log(1 - q) at q = 1
                return float(acct.get_epsilon(delta=delta))
        except (RuntimeError, ValueError, FloatingPointError, MemoryError) as exc:
            raise PrivacyError(f"{accountant} failed on history {history}: {exc}") from exc
    event = dpa.ComposedDpEvent(
        [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), n) for (z, q), n in sgd.items()]
        + [dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), n) for z, n in gauss.items()]
    )
    rdp_eps = RdpAccountant().compose(event).get_epsilon(delta)
    if accountant == "dpa_rdp":
        return float(rdp_eps)
    if rdp_eps > PLD_VACUOUS_EPSILON:  # PLD's grid would overflow; inf is a true (trivial) bound
        return math.inf
    interval = PLD_BASE_INTERVAL
    while interval < 1e-4 * rdp_eps:  # nested grids: a coarser interval stays an upper bound
        interval *= 2
    while interval > 1e-6 and interval > 2e-4 * rdp_eps:  # small epsilons: keep the error relative
        interval /= 2
    return float(PLDAccountant(value_discretization_interval=interval).compose(event).get_epsilon(delta))


def _first_training(events: Sequence[PrivacyEvent]) -> int:
    return next((i for i, e in enumerate(events) if isinstance(e, DpSgdTraining)), len(events))


def _bears_cost(route: str, index: int, event: PrivacyEvent, first_training: int) -> bool:
    """Whether ``event`` (at ``index``) costs epsilon on ``route``."""
    if route == "output":
        return isinstance(event, GaussianScoreRelease)
    return isinstance(event, DpSgdTraining) or index < first_training


def _route_epsilon(events: Sequence[PrivacyEvent], route: str, delta: float, accountant: str, keep=None) -> float:
    """Compose ``route``'s cost-bearing events (those at indices ``keep`` accepts, if given)."""
    _check_delta(delta)
    _check_accountant(accountant)
    first = _first_training(events)
    if route == "dpsgd" and first == len(events):
        return math.inf  # no DP-SGD training recorded: the DP-SGD route does not exist
    mine = [e for i, e in enumerate(events) if _bears_cost(route, i, e, first) and (keep is None or keep(i))]
    trainings = [e for e in mine if isinstance(e, DpSgdTraining)]
    return _compose(trainings, [e for e in mine if isinstance(e, GaussianScoreRelease)], delta, accountant)


def epsilon_dpsgd(events: Sequence[PrivacyEvent], delta: float, accountant: str = PRIMARY_ACCOUNTANT) -> float:
    """DP-SGD route epsilon at ``delta``: all trainings plus releases recorded before the first
    training; ``inf`` if no ``DpSgdTraining`` is recorded (the model is not DP)."""
    return _route_epsilon(events, "dpsgd", delta, accountant)


def epsilon_output(events: Sequence[PrivacyEvent], delta: float, accountant: str = PRIMARY_ACCOUNTANT) -> float:
    """Output route epsilon at ``delta``: composition of every ``GaussianScoreRelease``
    (0 if none; ``inf`` if any has ``noise_std == 0``)."""
    return _route_epsilon(events, "output", delta, accountant)


_ROUTE_FUNCTIONS = {"dpsgd": epsilon_dpsgd, "output": epsilon_output}


@dataclass(frozen=True)
class Guarantee:
    """A client's record-level ``(epsilon, delta)``-DP guarantee (add/remove one preference record).

    ``by_accountant[route][accountant]`` holds every computed epsilon (``nan`` where a secondary
    accountant failed; see ``notes``). The guarantee is stated with the primary accountant:
    ``epsilon = min(route_dpsgd, route_output)``.
    """

    delta: float
    by_accountant: Mapping[str, Mapping[str, float]]
    primary: str = PRIMARY_ACCOUNTANT
    notes: tuple[str, ...] = field(default=())

    @property
    def route_dpsgd(self) -> float:
        return self.by_accountant["dpsgd"][self.primary]

    @property
    def route_output(self) -> float:
        return self.by_accountant["output"][self.primary]

    @property
    def epsilon(self) -> float:
        return min(self.route_dpsgd, self.route_output)

    @property
    def route(self) -> str:
        """The route the guarantee is stated by (DP-SGD on ties)."""
        return "dpsgd" if self.route_dpsgd <= self.route_output else "output"

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "route": self.route,
            "primary_accountant": self.primary,
            "route_dpsgd": self.route_dpsgd,
            "route_output": self.route_output,
            "by_accountant": {r: dict(v) for r, v in self.by_accountant.items()},
            "notes": list(self.notes),
        }


def client_guarantee(events: Sequence[PrivacyEvent], delta: float, accountants: Sequence[str] = ACCOUNTANTS) -> Guarantee:
    """Both routes under the primary accountant (always) and the other ``accountants`` side by side."""
    _check_delta(delta)
    names = [PRIMARY_ACCOUNTANT] + [a for a in accountants if a != PRIMARY_ACCOUNTANT]
    table: dict[str, dict[str, float]] = {route: {} for route in ROUTES}
    notes = []
    for route, fn in _ROUTE_FUNCTIONS.items():
        for name in names:
            try:
                table[route][name] = fn(events, delta, name)
            except PrivacyError as exc:
                if name == PRIMARY_ACCOUNTANT:
                    raise
                table[route][name] = math.nan
                notes.append(f"{route}/{name}: {exc}")
    return Guarantee(delta=delta, by_accountant=table, notes=tuple(notes))


def phase_epsilon(
    entries: Sequence[tuple[PrivacyEvent, Mapping[str, Any]]], phase: str, delta: float, route: str
) -> float:
    """Primary-accountant epsilon that ``phase`` spends on ``route``: the composition of that route's
    cost-bearing events whose ``context["phase"] == phase`` (DP-SGD route: trainings and releases
    before the first training; output route: releases). ``inf`` on the DP-SGD route if no training
    is recorded at all. Used for per-phase caps; the guarantee itself is :func:`client_guarantee`."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}. Found {route!r}.")
    events = [e for e, _ in entries]
    return _route_epsilon(events, route, delta, PRIMARY_ACCOUNTANT, keep=lambda i: entries[i][1].get("phase") == phase)


def epsilon_curve(
    events: Sequence[PrivacyEvent], delta: float, accountant: str = PRIMARY_ACCOUNTANT, max_points: int = 60
) -> list[tuple[int, float]]:
    """``(n, epsilon)`` pairs: the guarantee after the first ``n`` entries (``n`` = ledger seq), at
    most ``max_points`` evenly spaced points, always including the last entry."""
    n = len(events)
    if n == 0:
        return []
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2. Found {max_points!r}.")
    points = sorted({round(1 + i * (n - 1) / (max_points - 1)) for i in range(max_points)}) if n > max_points else range(1, n + 1)
    return [
        (k, min(epsilon_dpsgd(events[:k], delta, accountant), epsilon_output(events[:k], delta, accountant)))
        for k in points
    ]
