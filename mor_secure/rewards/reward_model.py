"""A client's reward model: a VLM backbone (vision tower frozen) + LoRA adapters + a scalar head.

``r(x, y)`` is the head applied to the last token's final hidden state of the VLM run on
the image, the question and the response. Trainable: the LoRA adapters (peft) of the language
model (optionally of the vision encoder too), the multimodal projector, and the head. Everything else is frozen, which is
also what Opacus needs (it refuses trainable modules that hold buffers, such as vision
embeddings with their ``position_ids``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from torch import nn

from mor_secure.models.factory import VLM, load_vlm

# LoRA on every linear layer of the language model (module names differ by family). Adapters on
# the vision encoder's layers too (``VISION_LORA_TARGETS``) help without DP (tiny PaliGemma RM,
# position/shape pairwise accuracy 0.71/0.58 -> 0.85/0.72) but not under DP-SGD at epsilon = 8,
# where more trainable coordinates carry more noise (demo, three clients: 95/88/70% held-out
# accuracy with language-model adapters, 91/76/60% with vision adapters too).
LORA_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# the vision encoder's layers only: SigLIP's pooling head is unused by PaliGemma and would get no gradient
VISION_LORA_TARGETS = (r".*(language_model|text_model|vision_tower\.encoder|vision_model\.encoder).*\."
                       r"(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2)")
PROJECTOR_NAMES = ("multi_modal_projector", "connector")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r(x, y+) - r(x, y-))`` over the batch."""
    return -nn.functional.logsigmoid(chosen - rejected).mean()


class RewardModel(nn.Module):
    """Scalar reward over (image, question, response) for any supported VLM family."""

    def __init__(self, vlm: VLM, *, lora_r: int = 16, seed: int = 0, lora_targets: str = LORA_TARGETS) -> None:
        super().__init__()
        self.vlm = vlm
        self.lora_r = lora_r
        self.lora_targets = lora_targets
        backbone = vlm.model.model  # the VLM without its LM head
        for param in backbone.parameters():
            param.requires_grad_(False)
        torch.manual_seed(seed)
        inject_adapter_in_model(
            LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=lora_targets), backbone
        )
        for name, module in backbone.named_modules():
            if name.split(".")[-1] in PROJECTOR_NAMES:
                module.requires_grad_(True)
        self.backbone = backbone
        self.head = nn.Linear(vlm.hidden_size, 1)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(**inputs).last_hidden_state  # (B, T, H), left-padded
        return self.head(hidden[:, -1]).squeeze(-1)  # (B,)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], questions: Sequence[str], responses: Sequence[str],
              batch_size: int = 64) -> torch.Tensor:
        """Raw (unclipped, un-noised) rewards, one per (image, question, response)."""
        self.eval()
        device = self.device
        out = []
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            texts = [f"{q} {r}" for q, r in zip(questions[start:stop], responses[start:stop])]
            inputs = {k: v.to(device) for k, v in self.vlm.encode(images[start:stop], texts).items()}
            out.append(self(**inputs).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (``rm.to("cuda")`` moves it; scoring and training follow)."""
        return self.head.weight.device

    def save(self, path: Path) -> None:
        """Save architecture, processor and all weights (backbone, LoRA, head) to a client-local folder."""
        path.mkdir(parents=True, exist_ok=True)
        self.vlm.save(path / "backbone", weights=False)
        torch.save(self.state_dict(), path / "reward_model.pt")
        (path / "reward_model.json").write_text(json.dumps({"lora_r": self.lora_r, "lora_targets": self.lora_targets}))

    @classmethod
    def load(cls, path: Path) -> "RewardModel":
        meta = json.loads((path / "reward_model.json").read_text())
        vlm = load_vlm(path / "backbone", weights=False)
        # the adapters' placement is part of the architecture: an RM saved with other targets loads as saved
        model = cls(vlm, lora_r=meta["lora_r"], lora_targets=meta.get("lora_targets", LORA_TARGETS))
        model.load_state_dict(torch.load(path / "reward_model.pt", weights_only=True))
        model.eval()
        return model
