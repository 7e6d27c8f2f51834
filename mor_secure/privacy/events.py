"""Privacy events: immutable records of every release that depends on a client's private data.

The protected unit is one preference record of one client; the neighbouring relation is
add/remove one record. Each event carries exactly what a maintained accountant (Opacus,
Google's dp-accounting) needs to compute its privacy cost, and nothing private.

Two kinds of release exist:

* ``DpSgdTraining`` -- the client trained its reward model with DP-SGD (Opacus): Poisson
  sampling with rate ``sample_rate``, Gaussian noise ``noise_multiplier`` relative to the
  per-sample clipping norm, for ``steps`` steps. Every later output of that model is
  post-processing (the *DP-SGD route*).
* ``GaussianScoreRelease`` -- the client released ``count`` reward scores, each clipped to
  ``[-clip_bound, clip_bound]`` and perturbed with Gaussian noise of standard deviation
  ``noise_std`` (the *output route*). Changing one training record may change every score by
  up to ``2 * clip_bound``, so the vector's L2 sensitivity is ``2 * clip_bound * sqrt(count)``.
  A release with ``noise_std == 0`` is a non-private release: its output-route epsilon is
  infinite, and it is only allowed when the DP-SGD route covers it.

In the ledger each event also spells out its ``mechanism`` and ``l2_sensitivity`` (derived from the
fields and checked on reading), so that an auditor can recompute epsilon from the file alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Union

from mor_secure.errors import LedgerError


def _check_finite_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number. Found {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}. Found {value!r}.")


@dataclass(frozen=True)
class DpSgdTraining:
    """DP-SGD training of a reward model (Poisson-subsampled Gaussian mechanism, composed)."""

    kind: ClassVar[str] = "dpsgd_training"
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    num_records: int

    def __post_init__(self) -> None:
        _check_finite_positive("noise_multiplier", self.noise_multiplier)
        _check_finite_positive("max_grad_norm", self.max_grad_norm)
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]. Found {self.sample_rate!r}.")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer. Found {self.steps!r}.")
        if not isinstance(self.num_records, int) or self.num_records < 1:
            raise ValueError(f"num_records must be a positive integer. Found {self.num_records!r}.")


@dataclass(frozen=True)
class GaussianScoreRelease:
    """One released vector of ``count`` clipped, Gaussian-noised reward scores."""

    kind: ClassVar[str] = "gaussian_score_release"
    noise_std: float
    clip_bound: float
    count: int

    def __post_init__(self) -> None:
        _check_finite_positive("noise_std", self.noise_std, allow_zero=True)
        _check_finite_positive("clip_bound", self.clip_bound)
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be a positive integer. Found {self.count!r}.")

    @property
    def l2_sensitivity(self) -> float:
        return 2.0 * self.clip_bound * math.sqrt(self.count)

    @property
    def noise_multiplier(self) -> float:
        """Noise std over L2 sensitivity (0 means no noise: infinite output-route epsilon)."""
        return self.noise_std / self.l2_sensitivity


PrivacyEvent = Union[DpSgdTraining, GaussianScoreRelease]
EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in (DpSgdTraining, GaussianScoreRelease)}


def _derived(event: PrivacyEvent) -> dict[str, Any]:
    """What an outside reader of the ledger needs spelled out, derived from the fields: the mechanism
    and the L2 sensitivity the noise is calibrated to (DP-SGD: the per-example clipping norm)."""
    if isinstance(event, DpSgdTraining):
        return {"mechanism": "poisson_subsampled_gaussian", "l2_sensitivity": event.max_grad_norm}
    return {"mechanism": "gaussian", "l2_sensitivity": event.l2_sensitivity}


def event_to_dict(event: PrivacyEvent) -> dict[str, Any]:
    """The ledger's JSON form: ``kind``, the fields, and the derived ``mechanism`` and ``l2_sensitivity``."""
    return {"kind": event.kind, **asdict(event), **_derived(event)}


def event_from_dict(data: dict[str, Any]) -> PrivacyEvent:
    """Inverse of :func:`event_to_dict`; derived keys, when present, must match the fields."""
    data = dict(data)
    kind = data.pop("kind", None)
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise LedgerError(f"unknown privacy event kind {kind!r}; expected one of {sorted(EVENT_TYPES)}.")
    derived = {key: data.pop(key) for key in ("mechanism", "l2_sensitivity") if key in data}
    try:
        event = cls(**data)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"malformed {kind} event {data!r}: {exc}") from exc
    expected = _derived(event)
    for key, value in derived.items():
        if value != expected[key]:
            raise LedgerError(f"{kind} event says {key}={value!r} but its fields give {expected[key]!r}.")
    return event
