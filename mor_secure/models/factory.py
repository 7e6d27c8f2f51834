"""Build tiny VLMs of several transformers families offline, or load a real checkpoint.

Clients in a consortium run different architectures; this factory is the one place that
knows each family's config class, processor, image placeholder and input layout. Tiny
models are built from config classes with random weights (tests and the demo); real
checkpoints load from a local directory (``load_vlm``) -- nothing is ever downloaded.

The image processors are the PIL-based ones, because the fast ones need torchvision.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mor_secure.errors import ConfigError
from mor_secure.models.tokenizer import build_tokenizer

PATCH_SIZE = 8


@dataclass(frozen=True)
class SizePreset:
    """Dimensions of a randomly initialised model. ``tiny`` runs on a 2-core CPU in tests."""

    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int
    vision_heads: int = 2


SIZES: dict[str, SizePreset] = {
    "tiny": SizePreset(vision_hidden=32, vision_layers=2, text_hidden=64, text_layers=2, heads=4),
    "small": SizePreset(vision_hidden=64, vision_layers=2, text_hidden=128, text_layers=3, heads=4),
    # real size, for a GPU (``mor-secure bench device``): a ViT-L-sized vision tower (1024 x 24) and a
    # 2048 x 24 language model, about 1.2 billion parameters, the scale of public 1-2B VLMs
    "base": SizePreset(vision_hidden=1024, vision_layers=24, text_hidden=2048, text_layers=24, heads=16,
                       vision_heads=16),
}


def _vision(size: SizePreset, image_size: int) -> dict[str, Any]:
    return dict(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=image_size,
        patch_size=PATCH_SIZE,
    )


def _text(size: SizePreset, vocab_size: int, tokenizer: PreTrainedTokenizerFast,
          image_size: int = 32) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=size.text_hidden,
        intermediate_size=2 * size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # the image's tokens sit in the language model's sequence (one per patch at most)
        max_position_embeddings=max(256, (image_size // PATCH_SIZE) ** 2 + 128),
    )


@dataclass(frozen=True)
class Family:
    """How one VLM family is built, fed and loaded."""

    name: str
    model_type: str  # transformers' config.model_type
    model_cls: type[PreTrainedModel]
    processor_cls: type[ProcessorMixin]
    image_processor_cls: type
    placeholder: str  # what a prompt holds where the image goes (the processor expands it)
    nested_images: bool  # processor wants one list of images per text
    build_config: Callable[[SizePreset, int, PreTrainedTokenizerFast, int], Any]
    build_processor: Callable[[Any, PreTrainedTokenizerFast, int], ProcessorMixin]


def _llava_config(size, vocab_size, tok, image_size):
    return LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_vision(size, image_size)},
        text_config={"model_type": "llama", **_text(size, vocab_size, tok, image_size)},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",  # drops CLS so token counts match
        vision_feature_layer=-1,
    )


def _llava_processor(image_processor, tok, image_size):
    image_processor = image_processor or CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )


def _idefics3_config(size, vocab_size, tok, image_size):
    return Idefics3Config(
        vision_config=_vision(size, image_size),
        text_config={"model_type": "llama", **_text(size, vocab_size, tok, image_size)},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )


def _idefics3_processor(image_processor, tok, image_size):
    image_processor = image_processor or Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    seq_len = ((image_size // PATCH_SIZE) // 2) ** 2  # pixel shuffle with scale_factor=2
    return Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len)


def _paligemma_config(size, vocab_size, tok, image_size):
    text = _text(size, vocab_size, tok, image_size)
    text.update(num_key_value_heads=1, head_dim=size.text_hidden // size.heads)
    return PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", **_vision(size, image_size)},
        text_config={"model_type": "gemma", **text},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projection_dim=size.text_hidden,
    )


def _paligemma_processor(image_processor, tok, image_size):
    image_processor = image_processor or SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // PATCH_SIZE) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llava", "llava", LlavaForConditionalGeneration, LlavaProcessor, CLIPImageProcessorPil,
               "<image>", False, _llava_config, _llava_processor),
        Family("idefics3", "idefics3", Idefics3ForConditionalGeneration, Idefics3Processor,
               Idefics3ImageProcessorPil, "<image>", True, _idefics3_config, _idefics3_processor),
        Family("paligemma", "paligemma", PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
               SiglipImageProcessorPil, "<image>", False, _paligemma_config, _paligemma_processor),
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"model.family must be one of {sorted(FAMILIES)}. Found {name!r}."
        ) from None


@dataclass
class VLM:
    """A VLM with its processor and the family that knows how to feed it."""

    model: PreTrainedModel
    processor: ProcessorMixin
    family: Family

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.processor.tokenizer

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch ``texts`` (each without image placeholder) with one image each, left-padded."""
        prompts = [f"{self.family.placeholder} {t}" for t in texts]
        imgs = [[im] for im in images] if self.family.nested_images else list(images)
        batch = self.processor(text=prompts, images=imgs, return_tensors="pt", padding=True)
        batch.pop("labels", None)  # PaliGemma adds LM labels; reward models never use them
        return dict(batch)

    def save(self, path: Path, *, weights: bool = True) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if weights:
            self.model.save_pretrained(path)
        else:
            self.model.config.save_pretrained(path)
        self.processor.save_pretrained(path)
        meta = {"family": self.family.name, "image_size": self.image_size}
        (path / "mor_secure_model.json").write_text(json.dumps(meta))

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)


def build_vlm(family: str, vocabulary: Sequence[str], *, size: str = "tiny", image_size: int = 32,
              seed: int = 0, device: str | torch.device = "cpu") -> VLM:
    """A randomly initialised VLM of ``family`` over the benchmark ``vocabulary``, its weights
    created on ``device`` (a real-size model is built on a GPU directly, not copied there)."""
    fam = get_family(family)
    if size not in SIZES:
        raise ConfigError(f"model.size must be one of {sorted(SIZES)}. Found {size!r}.")
    if image_size % (2 * PATCH_SIZE):
        raise ConfigError(f"data.image_size must be a multiple of {2 * PATCH_SIZE}. Found {image_size}.")
    tok = build_tokenizer(vocabulary)
    config = fam.build_config(SIZES[size], len(tok), tok, image_size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = fam.model_cls(config)
    model.eval()
    return VLM(model=model, processor=fam.build_processor(None, tok, image_size), family=fam)


def load_vlm(path: str | Path, *, weights: bool = True) -> VLM:
    """Load a VLM checkpoint (tiny or real) from a local directory; never downloads.

    The directory holds ``config.json`` and weights (``save_pretrained``) plus the tokenizer
    and image-processor files. The family is read from ``config.json``'s ``model_type``.
    With ``weights=False`` only the architecture is built (the caller loads a state dict).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.checkpoint {str(path)!r} has no config.json; point it at a save_pretrained directory.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    fam = next((f for f in FAMILIES.values() if f.model_type == model_type), None)
    if fam is None:
        raise ConfigError(
            f"model.checkpoint {str(path)!r} is a {model_type!r} model; supported: {sorted(FAMILIES)}."
        )
    if weights:
        model = fam.model_cls.from_pretrained(path, local_files_only=True)
    else:
        model = fam.model_cls(AutoConfig.from_pretrained(path, local_files_only=True))
    model.eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    image_processor = fam.image_processor_cls.from_pretrained(path, local_files_only=True)
    image_size = int(model.config.vision_config.image_size)
    processor = fam.build_processor(image_processor, tok, image_size)
    return VLM(model=model, processor=processor, family=fam)
