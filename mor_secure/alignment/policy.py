"""The server's policy VLM: prompts, supervised warm-up, greedy answers, features and evaluation.

The warm-up teaches the *format* only: for each public prompt the target answer is drawn
uniformly from that family's answer words, never from the oracle. So the base policy answers
in the right vocabulary at about chance accuracy, and everything above chance after GRPO
comes from the clients' (private, mixed) preferences. A randomly initialised policy is first
given perception (``alignment/perception.py``: an unlabelled autoencoder on the public images,
no answers at all), which leaves it at chance too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mor_secure.data import get_family, oracle_correct
from mor_secure.models.factory import VLM


def chat_prompt(question: str) -> list[dict]:
    """The conversational prompt TRL and the chat template consume (image part first)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def prompt_texts(vlm: VLM, questions: Sequence[str]) -> list[str]:
    return [vlm.processor.apply_chat_template(chat_prompt(q), add_generation_prompt=True, tokenize=False)
            for q in questions]


def _batch(vlm: VLM, images: Sequence[Image.Image], texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The processor's tensors, on the device of the model's weights (a GPU where it was moved)."""
    device = vlm.model.device
    return {k: v.to(device) for k, v in
            vlm.processor(images=list(images), text=list(texts), padding=True, return_tensors="pt").items()}


def warmup(vlm: VLM, images: Sequence[Image.Image], families: Sequence[str], *, epochs: int, lr: float,
           batch_size: int, seed: int, progress: bool = True) -> list[float]:
    """Supervised format warm-up on public prompts with uniformly random (not oracle) answers."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tok = vlm.tokenizer
    model = vlm.model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    n = len(images)
    model.train()
    with tqdm(total=epochs * ((n + batch_size - 1) // batch_size), desc="policy warm-up",
              disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                fams = [get_family(families[i]) for i in idx]
                answers = [f.answers[rng.integers(len(f.answers))] for f in fams]
                prompts = prompt_texts(vlm, [f.question for f in fams])
                full = [f"{p}{a} {tok.eos_token}" for p, a in zip(prompts, answers)]
                batch = _batch(vlm, [images[i] for i in idx], full)
                prompt_len = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
                labels = batch["input_ids"].clone()
                labels[batch["attention_mask"] == 0] = -100
                seq_len = labels.shape[1]
                for row, plen in enumerate(prompt_len):
                    # left padding: the answer is the last (answer + eos) tokens of each row
                    n_answer = len(tok(full[row], add_special_tokens=False).input_ids) - plen
                    labels[row, : seq_len - n_answer] = -100
                loss = model(**batch, labels=labels).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def generate_answers(vlm: VLM, images: Sequence[Image.Image], questions: Sequence[str], *,
                     max_new_tokens: int = 3, batch_size: int = 64) -> list[str]:
    """Greedy completions (decoded, special tokens dropped)."""
    model, tok = vlm.model, vlm.tokenizer
    model.eval()
    image_token = getattr(model.config, "image_token_id", None)
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        texts = prompt_texts(vlm, questions[start:start + batch_size])
        batch = _batch(vlm, images[start:start + batch_size], texts)
        gen = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            # a generated image token would break the VLM's image-feature merge
            suppress_tokens=[image_token] if image_token is not None else None,
        )
        out += tok.batch_decode(gen[:, batch["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
    return [s.strip() for s in out]


@torch.no_grad()
def prompt_features(vlm: VLM, images: Sequence[Image.Image], questions: Sequence[str],
                    batch_size: int = 64) -> torch.Tensor:
    """Router features: final hidden states of the (frozen) model on the prompt, mean-pooled
    over the text positions (N, H). The image is seen through attention; its own positions are
    left out of the mean, since dozens of image tokens would otherwise drown the question
    (measured: per-family routing to the owning client fell from >0.9 to ~0.5 on some families)."""
    vlm.model.eval()
    image_token = getattr(vlm.model.config, "image_token_id", None)
    feats = []
    for start in range(0, len(images), batch_size):
        texts = prompt_texts(vlm, questions[start:start + batch_size])
        batch = _batch(vlm, images[start:start + batch_size], texts)
        hidden = vlm.model.model(**batch).last_hidden_state  # (B, T, H)
        keep = batch["attention_mask"].bool()
        if image_token is not None:
            keep &= batch["input_ids"] != image_token
        mask = keep.unsqueeze(-1).to(hidden.dtype)
        feats.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, vlm.hidden_size)


def oracle_accuracy(families: Sequence[str], answers: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
    """Oracle accuracy per family plus ``mean`` (the unweighted mean over families)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for fam, ans, comp in zip(families, answers, completions, strict=True):
        hits[fam].append(oracle_correct(fam, ans, comp))
    table = {fam: float(np.mean(v)) for fam, v in sorted(hits.items())}
    table["mean"] = float(np.mean(list(table.values()))) if table else float("nan")
    return table
