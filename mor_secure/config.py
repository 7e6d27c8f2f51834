"""Typed run configuration, validated once at the edge.

Every field has a documented meaning; privacy-relevant fields have no hidden defaults that
weaken a guarantee. Errors name the field, the bad value and the fix. Settings that remove a
protection are errors unless a flag named for the risk allows them, and the run record lists
every such flag in force (``insecure_flags``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mor_secure.data.families import FAMILIES, families_for_track
from mor_secure.errors import ConfigError
from mor_secure.models.factory import FAMILIES as MODEL_FAMILIES
from mor_secure.models.factory import SIZES


class _Strict(BaseModel):
    # NaN and infinity are refused in every float field (a NaN passes no bound and ``inf`` passes ``gt=0``)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RunSection(_Strict):
    name: str = Field("mor", description="Run name; the run folder is <output_dir>/<name>-<timestamp>.")
    seed: int = Field(0, description="Seed for data, models and training.")
    output_dir: str = Field("runs", description="Folder under which run folders are created.")


class DataSection(_Strict):
    track: Literal["shapes", "digits"] = "shapes"
    image_size: int = Field(32, ge=16, le=224)
    pairs_per_client: int = Field(2000, ge=16, description="Private preference pairs per client.")
    heldout_pairs_per_client: int = Field(
        300, ge=0, description="Held-out pairs the benchmark harness uses to measure each RM; never sent.")
    public_prompts: int = Field(400, ge=8, description="Server's public prompts (GRPO and warm-up).")
    objective_pairs: int = Field(200, ge=8, description="Server's labelled pairs that define the objective.")
    eval_prompts: int = Field(250, ge=8, description="Held-out prompts with oracle answers.")
    foreign_fraction: float = Field(0.1, ge=0, le=1)
    foreign_label_noise: float = Field(0.5, ge=0, le=1)
    malformed_fraction: float = Field(
        0.25, ge=0, le=1,
        description="Share of each client's pairs whose rejected response is off-topic or empty (format preference).")


class PerceptionSection(_Strict):
    """Perception pre-training of a randomly initialised model (``alignment/perception.py``): an
    unlabelled autoencoder on the benchmark's *public* images (never a client's records, so it
    costs no privacy). A real checkpoint already sees: leave ``steps`` at 0 there."""

    steps: int = Field(0, ge=0, description="0 (default) turns it off.")
    images: int = Field(400, ge=1, description="Public images generated for it (the server's public set).")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    resolution: int = Field(8, ge=2, le=64, description="Side of the low-resolution copy the decoder rebuilds.")


class ModelSpec(_Strict):
    family: str = Field("llava", description=f"One of {sorted(MODEL_FAMILIES)}.")
    size: str = Field("tiny", description=f"Preset for randomly initialised models: {sorted(SIZES)}.")
    checkpoint: str | None = Field(None, description="Local save_pretrained folder of a real model.")
    perception: PerceptionSection = PerceptionSection()

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in MODEL_FAMILIES:
            raise ValueError(f"must be one of {sorted(MODEL_FAMILIES)}; found {v!r}")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        if v not in SIZES:
            raise ValueError(f"must be one of {sorted(SIZES)}; found {v!r}")
        return v

    @model_validator(mode="after")
    def _perception_only_for_random_models(self) -> "ModelSpec":
        if self.checkpoint and self.perception.steps:
            raise ValueError("perception.steps must be 0 with a checkpoint: perception pre-training is for "
                             "randomly initialised models (a real checkpoint already sees); remove one of the two")
        return self


class PrivacySection(_Strict):
    dp_sgd: bool = Field(True, description="Train the reward model with DP-SGD (Opacus).")
    epsilon: float | None = Field(8.0, gt=0, description="DP-SGD target epsilon (one record of this client).")
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    allow_non_private: bool = Field(
        False, description="Risk flag: allow releases without any DP guarantee (comparison runs only).")


class BudgetSection(_Strict):
    epsilon: float = Field(..., gt=0, description="The client's total epsilon budget, enforced by the client.")
    delta: float = Field(..., gt=0, lt=1)
    phase_caps: dict[str, float] | None = None


class ScoreSection(_Strict):
    clip_bound: float = Field(5.0, gt=0, description="Scores are clipped to [-B, B] before release.")
    noise_std: float = Field(0.1, ge=0, description="Gaussian noise std added to every released score.")


class TrainingSection(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1, description="Expected batch size (Poisson sampling under DP-SGD).")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd (momentum 0.9) for DP-SGD; adam for non-DP.")
    lr: float = Field(0.5, gt=0)
    lora_r: int = Field(16, ge=1)
    lora_vision: bool = Field(
        False, description="Also put LoRA adapters on the vision encoder's layers (helps without DP; "
                           "measured worse under DP-SGD at epsilon 8, where more coordinates carry more noise).")


class ClientSection(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    model: ModelSpec = ModelSpec()
    families: list[str] = Field(..., min_length=1, description="Question families this client owns.")
    privacy: PrivacySection = PrivacySection()
    budget: BudgetSection
    scores: ScoreSection = ScoreSection()
    training: TrainingSection = TrainingSection()

    @model_validator(mode="after")
    def _privacy_consistent(self) -> "ClientSection":
        p, b = self.privacy, self.budget
        if p.dp_sgd:
            if p.epsilon is None:
                raise ValueError("privacy.epsilon must be set when privacy.dp_sgd is true")
            if p.epsilon > b.epsilon:
                raise ValueError(
                    f"privacy.epsilon ({p.epsilon}) exceeds budget.epsilon ({b.epsilon}); "
                    "lower privacy.epsilon or raise the budget")
            if p.delta > b.delta:
                raise ValueError(f"privacy.delta ({p.delta}) exceeds budget.delta ({b.delta})")
        elif self.scores.noise_std == 0 and not p.allow_non_private:
            raise ValueError(
                "privacy.dp_sgd is false and scores.noise_std is 0: every release would be non-private. "
                "Set scores.noise_std > 0 (output route), enable privacy.dp_sgd, or set "
                "privacy.allow_non_private: true for a comparison run")
        return self

    @property
    def insecure_flags(self) -> list[str]:
        return [f"clients.{self.name}.privacy.allow_non_private"] if self.privacy.allow_non_private else []


class WarmupSection(_Strict):
    epochs: int = Field(3, ge=0)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(32, ge=1)


class PolicySection(_Strict):
    model: ModelSpec = ModelSpec()
    warmup: WarmupSection = WarmupSection()


class RouterSection(_Strict):
    steps: int = Field(1000, ge=1)
    lr: float = Field(0.02, gt=0)
    components: int = Field(8, ge=1, description="Principal components of the features the router sees.")
    hidden: int = Field(0, ge=0, description="0: linear router; >0: one hidden layer of this width.")
    weight_decay: float = Field(0.0, ge=0)
    entropy_weight: float = Field(
        0.05, ge=0, description="Penalty on the mean entropy of the routing weights; pushes each input's "
                                "weight onto the client(s) whose scores explain it (0: pure likelihood).")


class GrpoSection(_Strict):
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    num_generations: int = Field(8, ge=2)
    beta: float = Field(0.04, gt=0, description="KL penalty to the frozen reference; MoR needs beta > 0.")
    lr: float = Field(2e-3, gt=0)
    max_completion_length: int = Field(3, ge=1)
    temperature: float = Field(1.0, gt=0)
    checkpoint_steps: int = Field(
        25, ge=0, description="Save a GRPO checkpoint every N steps; `mor-secure run --resume` continues "
                              "from the last one (0: none, a resumed GRPO starts over).")
    steps_per_generation: int = Field(
        1, ge=1, description="GRPO steps per reward round trip: the policy samples this many steps' prompts at "
                             "once, the clients score them in one round trip, and each of the next steps trains on "
                             "one slice (the later slices are slightly off-policy; TRL's clipped importance ratio "
                             "corrects for that). 1: sample and score at every step. A deployment whose round trip "
                             "costs a fixed latency pays it once per this many steps (BENCHMARKS.md, perf (b)). "
                             "The scores released are the same in number, so privacy accounting is unchanged.")


class FederationSection(_Strict):
    mode: Literal["simulation", "deployment"] = "simulation"
    encryption: Literal["none", "ckks"] = "none"
    insecure: bool = Field(False, description="Risk flag: deployment without TLS. Shown in run record and report.")
    round_timeout_s: float = Field(600, gt=0)


class RunConfig(_Strict):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    clients: list[ClientSection] = Field(..., min_length=1)
    policy: PolicySection = PolicySection()
    router: RouterSection = RouterSection()
    grpo: GrpoSection = GrpoSection()
    federation: FederationSection = FederationSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ValueError(f"clients[].name must be unique; found {names}")
        track_families = {f.name for f in families_for_track(self.data.track)}
        for i, client in enumerate(self.clients):
            for fam in client.families:
                if fam not in FAMILIES:
                    raise ValueError(f"clients[{i}].families: unknown family {fam!r}; known: {sorted(FAMILIES)}")
                if fam not in track_families:
                    raise ValueError(
                        f"clients[{i}].families: {fam!r} is not a family of data.track {self.data.track!r}; "
                        f"use one of {sorted(track_families)} or another data.track")
        batch = self.grpo.prompts_per_step * self.grpo.steps_per_generation
        if batch > self.data.public_prompts:  # TRL would train zero steps and only log a warning
            raise ValueError(
                f"grpo: one reward round trip samples grpo.prompts_per_step x grpo.steps_per_generation = {batch} "
                f"public prompts, more than data.public_prompts ({self.data.public_prompts}); lower one of the "
                "first two or raise data.public_prompts")
        return self

    @property
    def insecure_flags(self) -> list[str]:
        flags = [f for c in self.clients for f in c.insecure_flags]
        if self.federation.insecure:
            flags.append("federation.insecure")
        return flags

    def client(self, name: str) -> ClientSection:
        for c in self.clients:
            if c.name == name:
                return c
        raise ConfigError(f"no client named {name!r}; clients are {[c.name for c in self.clients]}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) else f" (found {value!r})"
        lines.append(f"  - {loc}: {msg}{shown}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: expected a mapping at the top level, found {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config; ``overrides`` are ``dotted.key=value`` strings (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass a file from configs/ (e.g. configs/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: bad dates, non-UTF-8 bytes
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    for item in overrides or []:
        apply_override(data, item)
    return parse_config(data, str(path))


def apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.field=value (e.g. grpo.steps=10)")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {exc}") from None
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config file's top level"
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {item!r}: {where} is a {type(node).__name__}, not a section or list, "
                              f"so it has no field {part!r}")
        if isinstance(node, list) and (not part.isdigit() or int(part) >= len(node)):
            raise ConfigError(f"override {item!r}: {part!r} is not a valid index into {where}, a list of {len(node)}")
        if depth == len(parts) - 1:
            node[int(part) if isinstance(node, list) else part] = value
        else:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
