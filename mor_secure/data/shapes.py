"""Procedural image generator of the ``shapes`` track (PIL ImageDraw, no anti-aliasing).

Every image is drawn *for a target answer*: the family's attribute is set to the target and
every other attribute is random, so a model can only answer by looking at that attribute.
The drawing metadata is returned with the image, and the family's oracle (families.py) reads
the answer from it; :func:`draw` checks the oracle agrees with the target.

Geometry, for an image of side ``S`` (``S >= 16``): shapes are flat-coloured circles,
squares or upward triangles inscribed in the box ``[cx-r, cx+r] x [cy-r, cy+r]``, at least
one pixel from the border, on a black background.

* half-extent classes: small ``r`` in [0.09S, 0.13S], medium [0.16S, 0.22S], large
  [0.28S, 0.34S] (``size`` splits at 0.2S, far from both classes);
* ``count`` places 1-3 shapes in distinct cells of a 2x2 grid, each at least one pixel
  inside its cell, so two shapes are always >= 2 pixels apart (separate connected parts);
* ``position`` puts one small shape at >= 0.25S from the centre along the answer's axis and
  <= 0.1S along the other, so the diagonal-sector oracle is unambiguous.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mor_secure.errors import ConfigError
from mor_secure.data.families import COLOURS, NUMBER_WORDS, SHAPE_KINDS, get_family

MIN_IMAGE_SIZE = 16


def _radius_range(kind: str, size: int) -> tuple[int, int]:
    lo_f, hi_f = {"small": (0.09, 0.13), "medium": (0.16, 0.22), "large": (0.28, 0.34)}[kind]
    lo = max(2, math.ceil(lo_f * size))
    hi = max(lo, math.floor(hi_f * size))
    return lo, hi


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in the closed range [lo, hi]."""
    return int(rng.integers(lo, hi + 1))


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _free_centre(rng: np.random.Generator, r: int, size: int) -> tuple[int, int]:
    """A random centre that keeps the whole shape >= 1 pixel inside the image."""
    return _randint(rng, r + 1, size - 2 - r), _randint(rng, r + 1, size - 2 - r)


def _shape(kind: str, colour: str, cx: int, cy: int, r: int) -> dict[str, Any]:
    return {"kind": kind, "colour": colour, "cx": cx, "cy": cy, "r": r}


def _one_shape(
    rng: np.random.Generator, size: int, *, kind: str | None = None,
    colour: str | None = None, r: int | None = None,
) -> dict[str, Any]:
    """A single shape with the given attributes and random everything else."""
    if r is None:
        r = _randint(rng, _radius_range("small", size)[0], _radius_range("large", size)[1])
    kind = kind if kind is not None else _choice(rng, SHAPE_KINDS)
    colour = colour if colour is not None else _choice(rng, list(COLOURS))
    cx, cy = _free_centre(rng, r, size)
    return _shape(kind, colour, cx, cy, r)


def _positioned_shape(rng: np.random.Generator, size: int, where: str) -> dict[str, Any]:
    r = _randint(rng, *_radius_range("small", size))
    c = (size - 1) / 2.0
    near_lo, near_hi = math.ceil(c - 0.1 * size), math.floor(c + 0.1 * size)
    low_hi = math.floor(c - 0.25 * size)  # largest coordinate on the low side
    high_lo = math.ceil(c + 0.25 * size)  # smallest coordinate on the high side
    if where in ("left", "top"):
        far = _randint(rng, r + 1, max(r + 1, low_hi))
    else:
        far = _randint(rng, min(high_lo, size - 2 - r), size - 2 - r)
    near = _randint(rng, near_lo, near_hi)
    cx, cy = (far, near) if where in ("left", "right") else (near, far)
    return _shape(_choice(rng, SHAPE_KINDS), _choice(rng, list(COLOURS)), cx, cy, r)


def _counted_shapes(rng: np.random.Generator, size: int, n: int) -> list[dict[str, Any]]:
    cell = size // 2
    r_lo = _radius_range("small", size)[0]
    r_hi = max(r_lo, min(_radius_range("medium", size)[1], (cell - 3) // 2))
    colour = _choice(rng, list(COLOURS))
    cells = rng.permutation(4)[:n]
    shapes = []
    for c in sorted(int(x) for x in cells):
        row, col = divmod(c, 2)
        r = _randint(rng, r_lo, r_hi)
        extent = 2 * r + 1
        jx = _randint(rng, 1, cell - extent - 1)
        jy = _randint(rng, 1, cell - extent - 1)
        shapes.append(_shape(_choice(rng, SHAPE_KINDS), colour,
                             col * cell + jx + r, row * cell + jy + r, r))
    return shapes


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw the shapes of ``meta`` on a black RGB canvas."""
    size = meta["image_size"]
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for s in meta["shapes"]:
        cx, cy, r, fill = s["cx"], s["cy"], s["r"], COLOURS[s["colour"]]
        box = [cx - r, cy - r, cx + r, cy + r]
        if s["kind"] == "circle":
            draw.ellipse(box, fill=fill)
        elif s["kind"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def draw(family: str, target: str, rng: np.random.Generator,
         image_size: int) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one image of ``family`` whose oracle answer is ``target``.

    Returns ``(image, meta)``. ``rng`` supplies every random choice, so the same generator
    state gives the same pixels.
    """
    fam = get_family(family)
    if fam.track != "shapes":
        raise ConfigError(f"family {family!r} is not a shapes-track family")
    if target not in fam.answers:
        raise ConfigError(f"{target!r} is not an answer of {family!r}: {fam.answers}")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size={image_size} is too small for shapes; use >= {MIN_IMAGE_SIZE}")
    size = image_size
    if family == "colour":
        shapes = [_one_shape(rng, size, colour=target)]
    elif family == "shape":
        shapes = [_one_shape(rng, size, kind=target, r=_randint(rng, *_radius_range("medium", size)))]
    elif family == "count":
        shapes = _counted_shapes(rng, size, NUMBER_WORDS.index(target))
    elif family == "position":
        shapes = [_positioned_shape(rng, size, target)]
    elif family == "size":
        shapes = [_one_shape(rng, size, r=_randint(rng, *_radius_range(target, size)))]
    else:  # a family registered without a generator
        raise ConfigError(f"no shapes generator for family {family!r}")
    meta = {"image_size": size, "shapes": shapes}
    answer = fam.answer_for(meta)
    if answer != target:
        raise AssertionError(f"{family}: drew {answer!r} for target {target!r} ({meta})")
    return render(meta), meta
