"""Server-side perception pre-training of a randomly initialised base policy (no labels).

A real base VLM arrives with pretrained perception: its image tokens already say what is in
the picture, and alignment only has to teach it *which answer* the consortium prefers. A tiny
model built from a config (tests, the demo) has a random vision tower instead, and GRPO then
has to learn to see from a scalar reward, which it does very slowly (measured on the shapes
track with an oracle reward, 300 GRPO steps: mean oracle accuracy 0.33 -> 0.44 without this
step, 0.33 -> 0.53 with it).

This step is an **unlabelled autoencoder** on the server's own public images: the image
features the language model receives (vision tower + projector, read at the image-token
positions of the input embeddings, so it works for every supported family) are mean-pooled
and a linear decoder must rebuild a low-resolution copy of the image from them. It uses no
question, no answer and nothing from any client, so the base policy still answers at chance
(the format warm-up that follows draws its answers uniformly) and every point gained later
comes from the clients' preferences. Mean pooling is deliberate: an untrained language model
attends roughly uniformly, so a code that survives averaging is a code it can read.

Only the vision tower and projector train; the decoder is thrown away. Real checkpoints
leave it off (``model.perception.steps: 0``, the default; the config refuses both at once).

Clients may use it too (``clients[].model.perception``): on the same *public* images, which
they regenerate from the benchmark's public generator, never on their own records, so it
costs no privacy and happens before any DP-SGD step (shapes track, PaliGemma reward model at
eps = 8: held-out pairwise accuracy 0.68 -> 0.73, the shape family 0.65 -> 0.75).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mor_secure.config import ModelSpec
from mor_secure.data import make_server_sets, vocabulary
from mor_secure.models.factory import VLM, build_vlm, load_vlm

#: Parameter-name fragments of the image path in the supported families (LLaVA: vision_tower,
#: multi_modal_projector; Idefics3: vision_model, connector; PaliGemma: vision_tower, projector).
IMAGE_PATH = ("vision_tower", "vision_model", "multi_modal_projector", "connector")


def image_path_parameters(vlm: VLM) -> list[torch.nn.Parameter]:
    params = [p for n, p in vlm.model.named_parameters() if any(part in n for part in IMAGE_PATH)]
    if not params:
        raise ValueError(f"no vision tower or projector parameters found in {type(vlm.model).__name__}")
    return params


#: The language model inside each supported family's ``model.model`` (Idefics3 names it text_model).
LANGUAGE_MODEL = ("language_model", "text_model")


class _Embeds(Exception):
    """Carries the language model's input embeddings out of the forward pass, which stops there."""

    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__("input embeddings captured")
        self.embeds = embeds


def _language_model(vlm: VLM) -> torch.nn.Module:
    for name in LANGUAGE_MODEL:
        if hasattr(vlm.model.model, name):
            return getattr(vlm.model.model, name)
    raise ValueError(f"no language model found in {type(vlm.model).__name__}")


def input_embeddings(vlm: VLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The language model's input embeddings with the image features merged in, as the family's
    own forward builds them; the language model itself is not run."""

    def grab(_module, _args, kwargs):
        raise _Embeds(kwargs["inputs_embeds"])

    handle = _language_model(vlm).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        vlm.model.model(**batch)
    except _Embeds as captured:
        return captured.embeds
    finally:
        handle.remove()
    raise RuntimeError(f"{type(vlm.model).__name__} never called its language model")


def pooled_image_features(vlm: VLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the image-token positions of the language model's input embeddings (B, H)."""
    embeds = input_embeddings(vlm, batch)
    mask = (batch["input_ids"] == vlm.model.config.image_token_id).unsqueeze(-1).to(embeds.dtype)
    return (embeds * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _targets(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    small = [np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BILINEAR), dtype=np.float32)
             for im in images]
    return torch.as_tensor(np.stack(small) / 255.0).flatten(1)


def pretrain_perception(vlm: VLM, images: Sequence[Image.Image], *, steps: int, lr: float, batch_size: int,
                        resolution: int, seed: int, progress: bool = True) -> list[float]:
    """Train ``vlm``'s image path in place to autoencode ``images``; returns the loss per step."""
    if steps <= 0 or not images:
        return []
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    targets = _targets(images, resolution)
    # the processor (PIL) is the slow part: run it once over the whole set, then index rows
    encoded = vlm.encode(list(images), [""] * len(images))
    params = image_path_parameters(vlm)
    decoder = torch.nn.Linear(vlm.hidden_size, targets.shape[1])
    opt = torch.optim.Adam(params + list(decoder.parameters()), lr=lr)
    losses: list[float] = []
    vlm.model.train()
    try:
        for _ in tqdm(range(steps), desc="perception pre-training", disable=not progress, leave=False):
            idx = rng.integers(0, len(images), size=min(batch_size, len(images)))
            batch = {k: v[torch.as_tensor(idx)] for k, v in encoded.items()}
            loss = torch.nn.functional.mse_loss(decoder(pooled_image_features(vlm, batch)), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
    finally:
        vlm.model.zero_grad(set_to_none=True)
        vlm.model.eval()
    return losses


def public_images(track: str, seed: int, image_size: int, n: int) -> list[Image.Image]:
    """The images of the benchmark's public split (the server's public prompts): public data,
    regenerated from the seed by anyone, server or client."""
    public = make_server_sets(track, None, seed, image_size, n_public=n, n_objective=0, n_eval=0)["public"]
    return [r["image"] for r in public]


def build_base_model(spec: ModelSpec, *, track: str, image_size: int, data_seed: int, model_seed: int,
                     progress: bool = True) -> tuple[VLM, list[float]]:
    """The starting model of a party: a local checkpoint, or a random model of ``spec.family``
    given perception pre-training on public images when ``spec.perception.steps`` > 0.
    Returns the model and the perception losses (empty when none ran)."""
    if spec.checkpoint:
        return load_vlm(spec.checkpoint), []
    vlm = build_vlm(spec.family, vocabulary(), size=spec.size, image_size=image_size, seed=model_seed)
    p = spec.perception
    if not p.steps:
        return vlm, []
    losses = pretrain_perception(vlm, public_images(track, data_seed, image_size, p.images), steps=p.steps,
                                 lr=p.lr, batch_size=p.batch_size, resolution=p.resolution, seed=model_seed,
                                 progress=progress)
    return vlm, losses
