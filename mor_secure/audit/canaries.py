"""Canary preference pairs for the one-run privacy audit, designed to have power.

A canary is a preference record that no other record resembles, so the only way a trained
reward model can "know" its preference is by having trained on it:

* its image is uniform random noise (no benchmark image looks like it);
* its question is ``"<q_i> ?"`` and its two responses are ``<a_i>`` and ``<b_i>``: three words
  that occur in no other record (canary ``i``'s own tokens, added to the model's vocabulary);
* which of ``a_i`` / ``b_i`` is preferred is a fair coin, so an unseen canary's margin is
  symmetric around zero whatever the model learned from the rest of the data.

Everything is a pure function of the seed: canaries, the inclusion bits (each canary in the
training data independently with probability 1/2) and the non-canary benchmark pairs come from
distinct ``numpy.random.SeedSequence`` streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

_CANARIES, _INCLUSION = 0, 1  # spawn-key domains


def canary_words(i: int) -> tuple[str, str, str]:
    """Canary ``i``'s question word and its two response words."""
    return f"canaryq{i}", f"canarya{i}", f"canaryb{i}"


def canary_vocabulary(m: int) -> list[str]:
    """Every word of ``m`` canaries (to add to the reward model's tokenizer)."""
    return [w for i in range(m) for w in canary_words(i)]


@dataclass(frozen=True)
class CanarySet:
    """``m`` canary pairs and the inclusion bits drawn for one audit."""

    pairs: list[dict[str, Any]]
    included: np.ndarray  # (m,) bool: canary i is in the training data

    @property
    def m(self) -> int:
        return len(self.pairs)

    def members(self) -> list[dict[str, Any]]:
        return [p for p, keep in zip(self.pairs, self.included) if keep]


def make_canaries(m: int, seed: int, image_size: int) -> CanarySet:
    """``m`` canaries and their inclusion bits (each included with probability 1/2)."""
    if m < 1:
        raise ValueError(f"the audit needs at least one canary. Found m={m}.")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_CANARIES,)))
    pairs = []
    for i in range(m):
        pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        question, a, b = canary_words(i)
        chosen, rejected = (a, b) if rng.random() < 0.5 else (b, a)
        pairs.append({"image": Image.fromarray(pixels), "family": "canary", "question": f"{question} ?",
                      "chosen": chosen, "rejected": rejected})
    inclusion = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_INCLUSION,)))
    return CanarySet(pairs, inclusion.random(m) < 0.5)
