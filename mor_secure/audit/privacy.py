"""``mor-secure audit privacy``: a one-run canary audit of client reward-model training.

Method (Steinke, Nasr and Jagielski 2023, arXiv:2305.08846; math in :mod:`.bounds`): ``m``
canaries (:mod:`.canaries`), each included with probability 1/2 in one client's training data
next to ordinary benchmark pairs; ONE training run per setting with the code that ships
(:func:`mor_secure.rewards.train.train_reward_model`, Opacus DP-SGD, a reward model on a VLM from
:func:`mor_secure.models.factory.build_vlm`); each canary is scored by how much training moved its
Bradley-Terry margin ``r(x, chosen) - r(x, rejected)`` (trained model minus the initial model,
which does not depend on the data); the top-k scored canaries are guessed "in", the bottom-k
"out", and the guesses give an epsilon lower bound at the stated confidence.

A lower bound far below the theoretical epsilon is expected (one-run audits of DP-SGD with
input-space canaries are loose); a lower bound *above* it would show a bug in the DP training or
its accounting. The non-private run shows the audit has power.

Known approximation: the number of records (base pairs plus included canaries) is realised per
run and the noise is calibrated to it, as it is for a real client (the dataset size is treated as
public, see threat_model.md). The result records the epsilon of the run's actual Opacus sampling
(``1 / ceil(N / B)`` per step, ``ceil(N / B)`` steps per epoch) next to the planned one.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mor_secure.audit.bounds import audit_bound
from mor_secure.audit.canaries import CanarySet, canary_vocabulary, make_canaries
from mor_secure.data import make_client_pairs, vocabulary
from mor_secure.errors import ConfigError
from mor_secure.models.factory import build_vlm
from mor_secure.privacy.accounting import epsilon_dpsgd
from mor_secure.privacy.events import DpSgdTraining
from mor_secure.privacy.planner import dpsgd_schedule
from mor_secure.rewards.reward_model import RewardModel
from mor_secure.rewards.train import TrainSettings, train_reward_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuditModel(_Strict):
    family: str = Field("llava", description="Reward-model backbone family (models.factory.FAMILIES).")
    size: str = Field("tiny", description="Size preset of the randomly initialised VLM.")
    lora_r: int = Field(8, ge=1)


class AuditTraining(_Strict):
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: str = Field("adam", description="'sgd' or 'adam'; the same for every setting.")
    lr: float = Field(1e-3, gt=0)
    max_grad_norm: float = Field(1.0, gt=0, description="DP-SGD per-pair clipping norm.")


class AuditConfig(_Strict):
    """One audit: the same canaries and inclusion bits, one training run per setting."""

    name: str = "privacy-audit"
    seed: int = Field(0, ge=0, description="Seeds canaries, inclusion bits, data, model and training.")
    canaries: int = Field(1000, ge=2, description="m: canaries, each included with probability 1/2.")
    base_pairs: int = Field(256, ge=1, description="Ordinary benchmark pairs always in the training data.")
    track: str = "shapes"
    families: list[str] = Field(default_factory=lambda: ["colour"])
    image_size: int = Field(16, ge=16)
    model: AuditModel = AuditModel()
    training: AuditTraining = AuditTraining()
    epsilons: list[float | None] = Field(
        default_factory=lambda: [1.0, 4.0, 8.0, None],
        description="Target epsilon of each run; null = trained without DP (shows the audit's power).")
    delta: float = Field(1e-5, gt=0, lt=1, description="DP-SGD delta and the delta of the bound.")
    confidence: float = Field(0.95, gt=0, lt=1)
    rules: list[tuple[int, int]] = Field(
        default_factory=lambda: [(0, 100), (0, 200), (50, 200), (100, 100)],
        description="Guessing rules (k_in, k_out) fixed before the run; Bonferroni over them.")

    @model_validator(mode="after")
    def _check(self) -> "AuditConfig":
        for k_pos, k_neg in self.rules:
            if k_pos < 0 or k_neg < 0 or not 0 < k_pos + k_neg <= self.canaries:
                raise ValueError(f"rules: each (k_in, k_out) needs 0 < k_in + k_out <= canaries={self.canaries}. "
                                 f"Found ({k_pos}, {k_neg}).")
        if not self.rules:
            raise ValueError("rules: declare at least one (k_in, k_out) guessing rule.")
        if self.delta >= 1 / (self.base_pairs + self.canaries):
            raise ValueError(f"delta={self.delta} must be below 1/(base_pairs + canaries) for a meaningful guarantee.")
        for eps in self.epsilons:
            if eps is not None and not 0 < eps < math.inf:
                raise ValueError(f"epsilons: each must be a finite number > 0 or null (no DP). Found {eps!r}.")
        return self


def load_audit_config(path: str | Path, overrides: list[str] | None = None) -> AuditConfig:
    """Load an audit YAML (e.g. ``configs/audit_privacy.yaml``); ``overrides`` are ``key=value``."""
    from mor_secure.config import apply_override

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"audit config {str(path)!r} not found; e.g. configs/audit_privacy.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        apply_override(data, item)
    try:
        return AuditConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@torch.no_grad()
def canary_margins(rm: RewardModel, canaries: CanarySet) -> np.ndarray:
    """Bradley-Terry margin ``r(x, chosen) - r(x, rejected)`` of every canary, shape (m,)."""
    images = [p["image"] for p in canaries.pairs]
    questions = [p["question"] for p in canaries.pairs]
    chosen = rm.score(images, questions, [p["chosen"] for p in canaries.pairs])
    rejected = rm.score(images, questions, [p["rejected"] for p in canaries.pairs])
    return (chosen - rejected).numpy().astype(np.float64)


def _opacus_event(planned: DpSgdTraining, num_records: int, batch_size: int, epochs: int) -> DpSgdTraining:
    """The sampling Opacus actually runs: ``make_private`` turns a loader of ``ceil(N/B)`` batches
    into Poisson sampling at ``1/ceil(N/B)`` for ``ceil(N/B)`` steps per epoch."""
    sample_rate, _, steps = dpsgd_schedule(num_records, batch_size, epochs)
    return DpSgdTraining(noise_multiplier=planned.noise_multiplier, sample_rate=sample_rate,
                         steps=steps, max_grad_norm=planned.max_grad_norm, num_records=num_records)


def run_setting(cfg: AuditConfig, canaries: CanarySet, base: list[dict], epsilon: float | None,
                *, progress: bool = False) -> dict[str, Any]:
    """One training run at target ``epsilon`` (``None``: no DP) and its audit result."""
    vocab = vocabulary() + canary_vocabulary(canaries.m)
    vlm = build_vlm(cfg.model.family, vocab, size=cfg.model.size, image_size=cfg.image_size, seed=cfg.seed)
    rm = RewardModel(vlm, lora_r=cfg.model.lora_r, seed=cfg.seed)
    before = canary_margins(rm, canaries)  # the initial model: independent of the data
    t = cfg.training
    settings = TrainSettings(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, dp=epsilon is not None,
                             target_epsilon=epsilon, delta=cfg.delta if epsilon is not None else None,
                             max_grad_norm=t.max_grad_norm, optimizer=t.optimizer, seed=cfg.seed)
    pairs = base + canaries.members()
    events: list[DpSgdTraining] = []
    rm.train()  # Opacus refuses a module in eval mode; scoring above left it there
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train_reward_model(rm, pairs, settings, authorize=events.append, progress=progress,
                                desc=f"audit eps={epsilon}")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    scores = canary_margins(rm, canaries) - before
    bound = audit_bound(scores, canaries.included, cfg.rules, cfg.delta, cfg.confidence)
    out: dict[str, Any] = {
        "target_epsilon": epsilon,
        "dp": epsilon is not None,
        "num_records": len(pairs),
        "included_canaries": int(canaries.included.sum()),
        "steps": result.steps,
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "final_loss": float(np.mean(result.losses[-10:])) if result.losses else None,
        "epsilon_lower_bound": bound.epsilon_lb,
        "best_rule": asdict(bound.best),
        "rules": [{**asdict(g), "epsilon_lower_bound": eps} for g, eps in bound.per_rule],
        "score_mean_in": float(scores[canaries.included].mean()),
        "score_mean_out": float(scores[~canaries.included].mean()),
        "score_std_out": float(scores[~canaries.included].std()),
        "scores": [round(float(s), 5) for s in scores],
    }
    if events:
        planned = events[0]
        actual = _opacus_event(planned, len(pairs), t.batch_size, t.epochs)
        out["dpsgd"] = {
            "planned_event": asdict(planned),
            "opacus_event": asdict(actual),
            "epsilon_planned_pld": epsilon_dpsgd([planned], cfg.delta),
            "epsilon_opacus_pld": epsilon_dpsgd([actual], cfg.delta),
        }
        out["theoretical_epsilon"] = max(epsilon, out["dpsgd"]["epsilon_opacus_pld"])
    else:
        out["theoretical_epsilon"] = math.inf
    return out


def run_privacy_audit(cfg: AuditConfig, *, progress: bool = False, log=print) -> dict[str, Any]:
    """Every setting of ``cfg`` on the same canaries; returns the JSON-ready result."""
    canaries = make_canaries(cfg.canaries, cfg.seed, cfg.image_size)
    base = make_client_pairs(cfg.track, cfg.families, cfg.base_pairs, seed=cfg.seed, image_size=cfg.image_size)
    started, cpu_started = time.perf_counter(), time.process_time()
    runs = []
    for eps in cfg.epsilons:
        run = run_setting(cfg, canaries, base, eps, progress=progress)
        log(f"eps={eps}: lower bound {run['epsilon_lower_bound']:.3f} at {cfg.confidence:.0%} "
            f"(best rule k_in={run['best_rule']['k_pos']}, k_out={run['best_rule']['k_neg']}: "
            f"{run['best_rule']['v']}/{run['best_rule']['r']} correct), {run['train_seconds']} s")
        runs.append(run)
    return {
        "method": "one-run canary audit, Steinke, Nasr and Jagielski 2023 (arXiv:2305.08846), approximate-DP bound of its Appendix D",
        "config": cfg.model_dump(mode="json"),
        "inclusion": [int(b) for b in canaries.included],
        "runs": runs,
        "total_seconds": round(time.perf_counter() - started, 1),
        "total_cpu_seconds": round(time.process_time() - cpu_started, 1),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
    }


def check_audit(result: dict[str, Any]) -> list[str]:
    """Problems with an audit result: a DP lower bound above its theoretical epsilon, or no power
    (the non-private bound not above every DP one). Empty when the audit passes."""
    problems = []
    runs = result["runs"]
    for run in runs:
        if run["dp"] and run["epsilon_lower_bound"] > run["theoretical_epsilon"]:
            problems.append(f"eps={run['target_epsilon']}: lower bound {run['epsilon_lower_bound']:.3f} exceeds "
                            f"the theoretical epsilon {run['theoretical_epsilon']:.3f}: DP training or accounting is wrong")
    private = [r["epsilon_lower_bound"] for r in runs if r["dp"]]
    for run in runs:
        if not run["dp"] and private and run["epsilon_lower_bound"] <= min(private):
            problems.append(f"no power: the non-private lower bound {run['epsilon_lower_bound']:.3f} is not above "
                            f"the smallest DP one {min(private):.3f}")
    return problems


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    return path


def render_table(result: dict[str, Any]) -> str:
    """A Markdown table of the runs."""
    conf = result["config"]["confidence"]
    lines = [f"| setting | target eps | eps as run (PLD) | eps lower bound ({conf:.0%}) | best rule (k_in, k_out): "
             "correct/guesses | steps (ledger / run) | train CPU s |", "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        b = run["best_rule"]
        if run["dp"]:
            d = run["dpsgd"]
            head = (f"| DP-SGD eps={run['target_epsilon']:g} | {run['target_epsilon']:g} | {d['epsilon_opacus_pld']:.3f} ")
            steps = f"{d['planned_event']['steps']} / {run['steps']}"
        else:
            head, steps = "| no DP | - | inf ", f"- / {run['steps']}"
        lines.append(f"{head}| {run['epsilon_lower_bound']:.3f} | ({b['k_pos']}, {b['k_neg']}): {b['v']}/{b['r']} "
                     f"| {steps} | {run.get('train_cpu_seconds', run['train_seconds'])} |")
    return "\n".join(lines)
