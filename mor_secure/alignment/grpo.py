"""Phase 3: align the server's policy with TRL's GRPOTrainer on the Mixture-of-Rewards.

The reward of a completion is ``R(x, y) = sum_k w_k(x) a_k s_k(x, y)``: the clients' clipped,
noised scores (fetched through Flower by ``scorer``), mixed with the fitted router. GRPO
normalises rewards within each prompt's group of ``num_generations`` samples and adds a KL
penalty ``beta`` to the frozen reference (TRL builds the reference as a frozen copy of the
policy it is handed, which is the warmed-up base policy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from mor_secure.alignment.policy import chat_prompt
from mor_secure.config import GrpoSection
from mor_secure.errors import ConfigError
from mor_secure.models.factory import VLM
from mor_secure.rewards.router import Router

log = logging.getLogger(__name__)

# scorer(images of the distinct prompts, their questions, responses, prompt index per response)
#   -> (scores (N, K) float, present (N, K) bool)
Scorer = Callable[[list[Image.Image], list[str], list[str], np.ndarray], tuple[np.ndarray, np.ndarray]]


def completion_text(completion) -> str:
    """TRL hands conversational completions as ``[{"role": "assistant", "content": text}]``."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)


@dataclass
class RewardLog:
    steps: list[dict] = field(default_factory=list)


class MixtureReward:
    """The GRPO reward function: ask the clients, mix with the router."""

    __name__ = "mixture_reward"  # TRL names the logged reward column after the function

    def __init__(self, scorer: Scorer, router: Router, features: torch.Tensor, images: Sequence[Image.Image],
                 questions: Sequence[str]) -> None:
        self.scorer = scorer
        self.router = router
        self.features = features  # (P, H): reference features of every public prompt, by row index
        self.images = images
        self.questions = questions
        self.log = RewardLog()

    def __call__(self, prompts, completions, idx, **_: object) -> list[float]:
        idx = np.asarray(idx, dtype=np.int64)
        unique, inverse = np.unique(idx, return_inverse=True)
        responses = [completion_text(c) for c in completions]
        scores, present = self.scorer([self.images[i] for i in unique], [self.questions[i] for i in unique],
                                      responses, inverse.astype(np.int64))
        with torch.no_grad():
            reward = self.router.reward(self.features[idx], torch.as_tensor(scores, dtype=torch.float32),
                                        torch.as_tensor(present))
        self.log.steps.append({"reward_mean": float(reward.mean()), "clients_present": present.any(0).tolist()})
        return reward.tolist()


class _RewardCurve(TrainerCallback):
    """Collects the logged reward/KL per step and drives one progress bar."""

    def __init__(self, total: int, progress: bool) -> None:
        self.history: list[dict] = []
        self.bar = tqdm(total=total, desc="GRPO", disable=not progress, leave=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:  # logged at each reward round trip (TRL's generation steps)
            row = {"step": state.global_step, "reward": float(logs["reward"]),
                   "reward_std": float(logs.get("reward_std", float("nan"))),
                   "kl": float(logs.get("kl", float("nan"))), "loss": float(logs.get("loss", float("nan")))}
            self.history.append(row)
            self.bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def build_dataset(images: Sequence[Image.Image], questions: Sequence[str], families: Sequence[str]) -> Dataset:
    return Dataset.from_dict({
        "prompt": [chat_prompt(q) for q in questions],
        "image": list(images),
        "family": list(families),
        "idx": list(range(len(images))),
    })


def run_grpo(policy: VLM, dataset: Dataset, reward: MixtureReward, cfg: GrpoSection, *, out_dir: Path,
             seed: int, progress: bool = True, checkpoint_steps: int = 0,
             resume_from: Path | None = None) -> list[dict]:
    """Train ``policy.model`` in place; returns the reward/KL history of the steps run here: one row
    per reward round trip, i.e. every step when ``cfg.steps_per_generation`` is 1, else at steps 1,
    1 + k, 1 + 2k, ... (``step`` is TRL's global step; ``kl`` and ``loss`` are means since the last row).

    ``checkpoint_steps`` > 0: TRL saves a checkpoint (policy, optimiser, scheduler, RNG and trainer
    state) under ``out_dir`` every that many steps, the last two kept. ``resume_from``: continue
    from such a checkpoint (weights, optimiser and step count restored; the history returned then
    starts after it).
    """
    args = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=policy.model.device.type == "cpu",  # a policy moved to a GPU trains there
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,  # counts completions
        steps_per_generation=cfg.steps_per_generation,  # one reward round trip per this many steps
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,  # > 0: TRL keeps a frozen reference and adds the KL penalty
        logging_steps=1,
        save_strategy="steps" if checkpoint_steps else "no",
        save_steps=max(1, checkpoint_steps),
        save_total_limit=2,
        report_to="none",
        use_vllm=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=seed,
    )
    if len(dataset) < cfg.prompts_per_step * cfg.steps_per_generation:  # TRL would train zero steps, silently
        raise ConfigError(f"GRPO: one reward round trip samples grpo.prompts_per_step x grpo.steps_per_generation = "
                          f"{cfg.prompts_per_step * cfg.steps_per_generation} prompts, but the dataset has "
                          f"{len(dataset)}; lower one of them or give more public prompts")
    curve = _RewardCurve(cfg.steps, progress)
    trainer = GRPOTrainer(model=policy.model, processing_class=policy.processor, reward_funcs=[reward],
                          args=args, train_dataset=dataset, callbacks=[curve])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if trainer.beta <= 0 or trainer.ref_model is None:
        raise RuntimeError("GRPO must run with a frozen reference and beta > 0; check grpo.beta")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    policy.model = trainer.model
    policy.model.eval()
    return curve.history
