"""Client-side budget enforcement: refuse any release that would exceed the client's budget.

A budget is a record-level ``(epsilon, delta)``-DP target per client (unit: one preference record
of this client, add/remove relation), checked with the primary accountant (dp-accounting PLD)
by the rule of :mod:`mor_secure.privacy.accounting`: the guarantee is the smaller of the DP-SGD
route and the output route. Consequences (DESIGN section 3):

* a DP-trained client whose DP-SGD route fits the budget releases scores for free (even with
  ``noise_std == 0``): they are post-processing;
* a client without DP training spends output-route budget with every noised release, and a
  release with ``noise_std == 0`` is always refused;
* a ``DpSgdTraining`` releases nothing by itself, but one whose DP-SGD route would exceed the
  budget (or its phase's cap) is refused: it could never cover any release.

Phase caps (optional, e.g. ``{"router_fit": 1.0, "grpo": 2.0}``) limit what each phase spends. A
phase's spend on a route is that route's cost-bearing events of the phase, composed
(:func:`~mor_secure.privacy.accounting.phase_epsilon`). A state is within budget when some route
has epsilon <= budget and every capped phase within its cap on that route: a DP-trained client
whose output route is momentarily smaller is not refused for output-route phase spend that the
DP-SGD route makes free. A pre-existing cap violation blocks every later release (fail closed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mor_secure.errors import BudgetExceededError, ConfigError
from mor_secure.privacy.accounting import client_guarantee, phase_epsilon
from mor_secure.privacy.events import DpSgdTraining, PrivacyEvent
from mor_secure.privacy.ledger import Ledger

_PRIMARY_ONLY = ()  # client_guarantee always computes the primary accountant


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Budget:
    """A client's privacy budget: ``(epsilon, delta)``-DP per preference record, optional phase caps."""

    epsilon: float
    delta: float
    phase_caps: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _is_number(self.epsilon) or self.epsilon <= 0:
            raise ConfigError(f"budget.epsilon must be a finite number > 0. Found {self.epsilon!r}.")
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            raise ConfigError(f"budget.delta must be in (0, 1), typically < 1/num_records. Found {self.delta!r}.")
        caps = {} if self.phase_caps is None else self.phase_caps
        if not isinstance(caps, Mapping):
            raise ConfigError(f"budget.phase_caps must be a mapping phase -> epsilon. Found {caps!r}.")
        for phase, cap in caps.items():
            if not isinstance(phase, str) or not phase:
                raise ConfigError(f"budget.phase_caps keys must be phase names. Found {phase!r}.")
            if not _is_number(cap) or not 0 < cap <= self.epsilon:
                raise ConfigError(
                    f"budget.phase_caps[{phase!r}] must be in (0, budget.epsilon={self.epsilon}]. Found {cap!r}."
                )
        object.__setattr__(self, "phase_caps", MappingProxyType(dict(caps)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        """From a config mapping ``{epsilon, delta, phase_caps?}``; unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"budget must be a mapping with epsilon and delta. Found {data!r}.")
        unknown = set(data) - {"epsilon", "delta", "phase_caps"}
        if unknown:
            raise ConfigError(f"budget has unknown keys {sorted(unknown)}; allowed: epsilon, delta, phase_caps.")
        for key in ("epsilon", "delta"):
            if key not in data:
                raise ConfigError(f"budget.{key} is missing. Set it, e.g. epsilon: 4.0, delta: 1.0e-5.")
        return cls(epsilon=data["epsilon"], delta=data["delta"], phase_caps=data.get("phase_caps") or {})

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "phase_caps": dict(self.phase_caps)}


class BudgetRefusedError(BudgetExceededError):
    """A release was refused; nothing was written. ``requested_epsilon`` is the epsilon the release
    would have led to, ``budget`` the limit it would cross, ``phase`` the capped phase (``None``
    for the overall budget)."""

    def __init__(self, requested_epsilon: float, budget: float, phase: str | None, what: str) -> None:
        self.requested_epsilon = requested_epsilon
        self.budget = budget
        self.phase = phase
        limit = f"phase cap of {phase!r}" if phase else "budget"
        super().__init__(
            f"release refused, nothing written: {what} would be epsilon={requested_epsilon:.4g} > {limit} "
            f"epsilon={budget:.4g}. Fix: add noise (noise_std / noise_multiplier), release fewer scores, "
            f"or stop releasing; the server drops this client from the mixture."
        )


def _route_refusal(
    entries: list[tuple[PrivacyEvent, Mapping[str, Any]]], budget: Budget, route: str, route_eps: float
) -> BudgetRefusedError | None:
    """Why ``route`` cannot carry the guarantee within ``budget`` (``None`` if it can)."""
    if route_eps > budget.epsilon:
        return BudgetRefusedError(route_eps, budget.epsilon, None, f"the {route} route")
    for phase, cap in budget.phase_caps.items():
        spent = phase_epsilon(entries, phase, budget.delta, route)
        if spent > cap:
            return BudgetRefusedError(spent, cap, phase, f"phase {phase!r} on the {route} route")
    return None


def check_within_budget(entries: list[tuple[PrivacyEvent, Mapping[str, Any]]], budget: Budget) -> None:
    """Raise :class:`BudgetRefusedError` unless the ledger ``entries`` (the new one last) fit ``budget``:
    some route must stay within the budget with every capped phase within its cap (tried smaller
    route first; the refusal reported is that of the smaller route), and a new ``DpSgdTraining``
    must keep the DP-SGD route itself within budget and caps."""
    guarantee = client_guarantee([e for e, _ in entries], budget.delta, _PRIMARY_ONLY)
    eps = {"dpsgd": guarantee.route_dpsgd, "output": guarantee.route_output}
    if guarantee.epsilon > budget.epsilon:
        what = f"the guarantee (DP-SGD route epsilon={eps['dpsgd']:.4g}, output route epsilon={eps['output']:.4g})"
        raise BudgetRefusedError(guarantee.epsilon, budget.epsilon, None, what)
    refusals = []
    for route in sorted(eps, key=lambda r: (eps[r], r != guarantee.route)):  # the stated route first
        refusal = _route_refusal(entries, budget, route, eps[route])
        if refusal is None:
            break  # ``route`` carries the guarantee within budget and caps
        refusals.append(refusal)
    else:
        raise refusals[0]
    if isinstance(entries[-1][0], DpSgdTraining) and route != "dpsgd":
        refusal = _route_refusal(entries, budget, "dpsgd", eps["dpsgd"])
        if refusal is not None:
            raise refusal


class BudgetGuard:
    """Authorise releases against a client's budget and record them in its ledger (write-ahead)."""

    def __init__(self, ledger: Ledger, budget: Budget) -> None:
        self.ledger = ledger
        self.budget = budget

    def authorize(self, event: PrivacyEvent, context: Mapping[str, Any]) -> dict[str, Any]:
        """Check the whole event against the budget, then append it (fsync'd) and return the entry.

        Raises :class:`BudgetRefusedError` (a ``BudgetExceededError``) without writing anything if the
        ledger's events plus ``event`` would exceed the budget or a phase cap. Release only after
        this returns. Check and append happen under the ledger's writer lock.
        """
        return self.ledger.append(event, context, check=lambda entries: check_within_budget(entries, self.budget))

    def remaining(self) -> float:
        return remaining(self.ledger, self.budget)


def remaining(ledger: Ledger, budget: Budget) -> float:
    """Budget epsilon minus the current guarantee's epsilon (primary accountant), floored at 0."""
    spent = client_guarantee([e for e, _ in ledger.events()], budget.delta, _PRIMARY_ONLY).epsilon
    return max(0.0, budget.epsilon - spent)
