"""An independent recomputation of a client's epsilon with dp-accounting's PLD accountant alone.

It reads events as plain dicts in the ledger's JSON form (``kind`` plus fields) and applies the
rules of DESIGN section 3 directly, without mor_secure's accounting code:

* output route: every score release, a Gaussian mechanism with noise multiplier
  ``noise_std / (2 * clip_bound * sqrt(count))`` (scores clipped to [-B, B]); infinite if any
  release has no noise;
* DP-SGD route: every training (``steps`` compositions of the Poisson-subsampled Gaussian) plus
  the releases recorded before the first training (not covered by it); infinite without a training.

The guarantee is the smaller route. Discretisation interval 1e-4 (pessimistic).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import dp_accounting as dpa
from dp_accounting.pld import PLDAccountant

INTERVAL = 1e-4


def pld_routes(events: Iterable[Mapping], delta: float) -> tuple[float, float]:
    """(DP-SGD route, output route) epsilon at ``delta``."""
    events = list(events)
    first = next((i for i, e in enumerate(events) if e["kind"] == "dpsgd_training"), None)
    dpsgd, output = PLDAccountant(value_discretization_interval=INTERVAL), PLDAccountant(value_discretization_interval=INTERVAL)
    dpsgd_inf, output_inf = first is None, False
    for i, e in enumerate(events):
        if e["kind"] == "dpsgd_training":
            dpsgd.compose(dpa.PoissonSampledDpEvent(e["sample_rate"], dpa.GaussianDpEvent(e["noise_multiplier"])), e["steps"])
            continue
        if e["kind"] != "gaussian_score_release":
            raise ValueError(f"unknown event kind {e['kind']!r}")
        covered = first is not None and i > first
        if e["noise_std"] == 0:
            output_inf, dpsgd_inf = True, dpsgd_inf or not covered
            continue
        gauss = dpa.GaussianDpEvent(e["noise_std"] / (2 * e["clip_bound"] * math.sqrt(e["count"])))
        output.compose(gauss)
        if not covered:
            dpsgd.compose(gauss)
    return (math.inf if dpsgd_inf else dpsgd.get_epsilon(delta)), (math.inf if output_inf else output.get_epsilon(delta))


def pld_epsilon(events: Iterable[Mapping], delta: float) -> float:
    """The guarantee: the smaller route."""
    return min(pld_routes(events, delta))
