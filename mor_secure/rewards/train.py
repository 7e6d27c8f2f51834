"""Phase 1: a client trains its reward model on its own preference pairs.

Loss: Bradley-Terry, ``-log sigmoid(r(x, y+) - r(x, y-))``. With ``dp=True`` training is
DP-SGD through Opacus: Poisson sampling, per-pair gradient clipping to ``max_grad_norm``,
Gaussian noise. The protected unit is one preference pair (one record of this client): both
responses of a pair go through the model in two forward passes of the same Opacus
``GradSampleModule``, whose hooks sum the two contributions into one per-pair gradient
before clipping, so clipping bounds one record's influence.

The noise multiplier is calibrated with Opacus' RDP accountant (the most conservative of the
maintained accountants we report), so every accountant in the report is at or below the
target epsilon. The planned ``DpSgdTraining`` event is handed to ``authorize`` *before* the
first step (write-ahead): a crash mid-training over-reports, never under-reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from mor_secure.errors import ConfigError
from mor_secure.privacy.events import DpSgdTraining
from mor_secure.privacy.planner import calibrate_dpsgd
from mor_secure.rewards.reward_model import RewardModel, bradley_terry_loss

log = logging.getLogger(__name__)
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    dp: bool
    target_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "hooks"
    optimizer: str = "sgd"
    momentum: float = 0.9
    seed: int = 0


def make_optimizer(rm: RewardModel, settings: TrainSettings) -> torch.optim.Optimizer:
    """SGD with momentum for DP-SGD (measured: Adam moves every coordinate by about ``lr`` per step
    even when a coordinate carries only DP noise, and the reward scale drifts; with SGD the same
    runs learn). Adam is available for non-private comparison runs."""
    params = rm.trainable_parameters()
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    raise ConfigError(f"training.optimizer must be 'sgd' or 'adam'. Found {settings.optimizer!r}.")


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    event: DpSgdTraining | None = None
    opacus_steps: int = 0  # DP-SGD steps Opacus' own accountant saw (must equal event.steps)


class PairTensors:
    """All pairs pre-encoded once: image tensors shared by a pair, then chosen and rejected text."""

    def __init__(self, rm: RewardModel, pairs: Sequence[dict]) -> None:
        images = [p["image"] for p in pairs]
        chosen = rm.vlm.encode(images, [f"{p['question']} {p['chosen']}" for p in pairs])
        rejected = rm.vlm.encode(images, [f"{p['question']} {p['rejected']}" for p in pairs])
        self.text_keys = [k for k in chosen if k in TEXT_KEYS]
        self.image_keys = [k for k in chosen if k not in TEXT_KEYS]
        tensors = [chosen[k] for k in self.image_keys]
        tensors += [chosen[k] for k in self.text_keys] + [rejected[k] for k in self.text_keys]
        self.dataset = TensorDataset(*tensors)

    def split(self, batch: Sequence[torch.Tensor]) -> tuple[dict, dict]:
        n_img, n_txt = len(self.image_keys), len(self.text_keys)
        image = dict(zip(self.image_keys, batch[:n_img]))
        chosen = {**image, **dict(zip(self.text_keys, batch[n_img:n_img + n_txt]))}
        rejected = {**image, **dict(zip(self.text_keys, batch[n_img + n_txt:]))}
        return chosen, rejected


def plan_dpsgd(num_records: int, settings: TrainSettings) -> DpSgdTraining:
    """The DP-SGD event training will run: Opacus' DPDataLoader schedule (ceil(N/batch) steps per
    epoch at sample rate 1/that), noise calibrated with Opacus RDP and checked by the primary
    accountant."""
    if settings.target_epsilon is None or settings.delta is None:
        raise ConfigError("privacy.epsilon and privacy.delta must be set when privacy.dp_sgd is true.")
    return calibrate_dpsgd(target_epsilon=settings.target_epsilon, delta=settings.delta, num_records=num_records,
                           epochs=settings.epochs, batch_size=settings.batch_size,
                           max_grad_norm=settings.max_grad_norm, opacus_accountant="rdp")


def _noise_only_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> None:
    """An empty Poisson batch still takes a DP-SGD step of pure noise, as the accounted mechanism
    does: skipping it would reveal that no record was sampled."""
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def train_reward_model(
    rm: RewardModel,
    pairs: Sequence[dict],
    settings: TrainSettings,
    *,
    authorize: Callable[[DpSgdTraining], object] | None = None,
    progress: bool = True,
    desc: str = "reward model",
    encoded: PairTensors | None = None,
) -> TrainResult:
    """Train ``rm`` in place. With DP, ``authorize(event)`` must record the event first.

    ``encoded``: ``pairs`` already encoded by ``PairTensors`` with the same processor (a caller that
    trains on the same pairs several times, such as FedAvg rounds, encodes them once)."""
    if not pairs:
        raise ConfigError("the client has no preference pairs to train on; check data.train_pairs_per_client.")
    if encoded is not None and len(encoded.dataset) != len(pairs):
        raise ValueError(f"encoded holds {len(encoded.dataset)} pairs, not the {len(pairs)} given")
    torch.manual_seed(settings.seed)
    data = encoded if encoded is not None else PairTensors(rm, pairs)
    optimizer = make_optimizer(rm, settings)
    loader = DataLoader(data.dataset, batch_size=settings.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(settings.seed))
    model: torch.nn.Module = rm
    event = None
    if settings.dp:
        event = plan_dpsgd(len(pairs), settings)
        if authorize is None:
            raise ConfigError("DP-SGD training needs a ledger: pass authorize= (the client's budget guard).")
        authorize(event)  # write-ahead; raises BudgetExceededError before any step
        rm.train()  # Opacus refuses a module in eval mode (e.g. after rm.score)
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=rm,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=event.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=settings.grad_sample_mode,
        )
    result = TrainResult(steps=0, event=event)
    device = rm.device  # batches are encoded on the CPU and follow the model (a GPU where it was moved)
    model.train()
    total = settings.epochs * len(loader)
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(settings.epochs):
            for batch in loader:
                bar.update(1)
                if batch[0].shape[0] == 0:  # an empty Poisson batch
                    if settings.dp:
                        _noise_only_step(optimizer, rm.trainable_parameters())
                        result.steps += 1
                    continue
                chosen, rejected = data.split([t.to(device) for t in batch])
                loss = bradley_terry_loss(model(**chosen), model(**rejected))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                result.steps += 1
                result.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if settings.dp:
        result.opacus_steps = sum(n for _, _, n in engine.accountant.history)
        model._close()  # remove Opacus hooks; rm keeps the trained weights
    rm.eval()
    if result.losses and not math.isfinite(result.losses[-1]):
        raise FloatingPointError(f"{desc}: training diverged (loss {result.losses[-1]}); lower training.lr.")
    return result


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, pairs: Sequence[dict]) -> float:
    """Share of pairs where r(chosen) > r(rejected). Benchmark harness only: never released."""
    images = [p["image"] for p in pairs]
    questions = [p["question"] for p in pairs]
    chosen = rm.score(images, questions, [p["chosen"] for p in pairs])
    rejected = rm.score(images, questions, [p["rejected"] for p in pairs])
    return float((chosen > rejected).float().mean())
