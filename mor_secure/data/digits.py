"""The ``digits`` track: scikit-learn's bundled handwritten digits (nothing is downloaded).

``sklearn.datasets.load_digits()`` ships 1797 grey 8x8 images (values 0..16). They are
scaled to 0..255, upscaled with nearest-neighbour to ``image_size`` and made RGB.

**Disjoint pools.** The 1797 images are split once, by a fixed seed that does not depend on
the benchmark seed, into four disjoint pools, stratified by digit so every pool holds every
digit: ``client`` (60 %), ``public`` (15 %), ``objective`` (10 %) and ``eval`` (15 %).
Client preference pairs are drawn only from the client pool and the server's three sets only
from their own pools, so no image is ever shared between a client's private data and a server
set, whatever seeds are used. The client pool can further be cut into disjoint per-client
shards (:func:`pool_indices` with ``shard=(i, n)``), again stratified by digit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from mor_secure.errors import ConfigError
from mor_secure.data.families import get_family

POOL_FRACTIONS: dict[str, float] = {"client": 0.60, "public": 0.15, "objective": 0.10, "eval": 0.15}
POOLS: tuple[str, ...] = tuple(POOL_FRACTIONS)
_POOL_SEED = 20_240_601  # fixed: the pools are part of the benchmark's definition


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    grey.setflags(write=False)
    target = d.target.astype(np.int64)
    target.setflags(write=False)
    return grey, target


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [1797, 8, 8], labels int [1797])`` (read-only arrays)."""
    return _digits()


@lru_cache(maxsize=1)
def digit_pools() -> dict[str, np.ndarray]:
    """The four disjoint pools of ``load_digits()`` indices, stratified by digit (sorted)."""
    _, target = _digits()
    rng = np.random.default_rng(_POOL_SEED)
    parts: dict[str, list[np.ndarray]] = {p: [] for p in POOLS}
    fractions = np.array(list(POOL_FRACTIONS.values()))
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(target == d))
        cuts = np.rint(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for name, chunk in zip(POOLS, np.split(idx, cuts)):
            parts[name].append(chunk)
    pools = {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
    for arr in pools.values():
        arr.setflags(write=False)
    return pools


def pool_indices(pool: str, shard: tuple[int, int] | None = None) -> np.ndarray:
    """Indices of ``pool``; with ``shard=(i, n)``, the i-th of n disjoint per-digit shards."""
    pools = digit_pools()
    if pool not in pools:
        raise ConfigError(f"unknown digits pool {pool!r}; use one of {list(POOLS)}")
    idx = pools[pool]
    if shard is None:
        return idx
    i, n = shard
    if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
        raise ConfigError(f"shard={shard!r} must be (index, count) with 0 <= index < count")
    _, target = _digits()
    chunks = [np.array_split(idx[target[idx] == d], n)[i] for d in range(10)]
    out = np.sort(np.concatenate(chunks))
    if len(np.unique(target[out])) < 10:
        raise ConfigError(f"shard={shard!r} leaves some digit without images; use fewer shards")
    return out


def render(index: int, image_size: int) -> Image.Image:
    """The digit ``index`` of ``load_digits()`` as an RGB image of side ``image_size``."""
    grey, _ = _digits()
    img = Image.fromarray(np.ascontiguousarray(grey[index]), mode="L")
    return img.resize((image_size, image_size), Image.NEAREST).convert("RGB")


def draw(family: str, target: str, rng: np.random.Generator, image_size: int,
         indices: np.ndarray) -> tuple[Image.Image, dict[str, Any]]:
    """Pick (with replacement) an image from ``indices`` whose ``family`` answer is ``target``.

    Returns ``(image, meta)`` with ``meta = {"digit": d, "index": i}``.
    """
    fam = get_family(family)
    if fam.track != "digits":
        raise ConfigError(f"family {family!r} is not a digits-track family")
    if target not in fam.answers:
        raise ConfigError(f"{target!r} is not an answer of {family!r}: {fam.answers}")
    if image_size < 8:
        raise ConfigError(f"image_size={image_size} is too small for digits; use >= 8")
    _, labels = _digits()
    ok_digits = [d for d in range(10) if fam.answer_for({"digit": d}) == target]
    candidates = indices[np.isin(labels[indices], ok_digits)]
    if len(candidates) == 0:
        raise ConfigError(f"no image in the pool answers {target!r} to {family!r}")
    index = int(candidates[int(rng.integers(len(candidates)))])
    meta = {"digit": int(labels[index]), "index": index}
    if fam.answer_for(meta) != target:
        raise AssertionError(f"{family}: picked {meta} for target {target!r}")
    return render(index, image_size), meta
