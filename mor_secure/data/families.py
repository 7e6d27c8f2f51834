"""Question families of the mor_secure benchmark and their oracles (DESIGN.md §6).

A *question family* is one fixed question about an image, a closed set of one-word answers,
and an **oracle** that gives the right answer from the metadata recorded when the image was
made. Because the oracle is exact, the quality of an aligned policy is measured exactly:
its completion is right when its first word equals the oracle answer
(:func:`mor_secure.data.benchmark.oracle_correct`).

Two tracks:

* ``shapes`` -- procedurally drawn RGB images (black background, flat colours). The metadata
  is ``{"image_size": S, "shapes": [{"kind", "colour", "cx", "cy", "r"}, ...]}`` where
  ``(cx, cy)`` is the pixel centre and ``r`` the half-extent (the shape spans ``2r + 1``
  pixels). Families: ``colour``, ``shape``, ``count``, ``position``, ``size``.
* ``digits`` -- scikit-learn's bundled handwritten digits. The metadata is
  ``{"digit": d, "index": i}`` (``i`` indexes ``load_digits()``). Families: ``digit``,
  ``parity``, ``greater``.

Questions are lower-case words separated by single spaces with a final ``"?"`` token, so a
word-level tokenizer built from :func:`vocabulary` covers every question and answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mor_secure.errors import ConfigError

TRACKS: tuple[str, ...] = ("shapes", "digits")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle")
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
#: A shape is "large" when its half-extent exceeds this fraction of the image side.
#: Small shapes are drawn with r <= 0.13*S and large ones with r >= 0.28*S (see shapes.py).
SIZE_THRESHOLD = 0.2


@dataclass(frozen=True)
class QuestionFamily:
    """One question, its closed answer set, and the oracle giving the right answer.

    ``oracle`` maps an image's metadata (see the module docstring) to one of ``answers``;
    call it through :meth:`answer_for`, which also checks the result is a legal answer.
    """

    name: str
    track: str
    question: str
    answers: tuple[str, ...]
    oracle: Callable[[Mapping[str, Any]], str]
    description: str = ""

    def answer_for(self, meta: Mapping[str, Any]) -> str:
        """The right answer for an image with metadata ``meta``."""
        answer = self.oracle(meta)
        if answer not in self.answers:  # a bug in a generator, never a user error
            raise AssertionError(f"oracle of {self.name!r} gave {answer!r}, not in {self.answers}")
        return answer

    def wrong_answers(self, answer: str) -> tuple[str, ...]:
        """Every answer of this family except ``answer``."""
        return tuple(a for a in self.answers if a != answer)


def _single(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    return meta["shapes"][0]


def position_of(cx: float, cy: float, image_size: int) -> str:
    """Which side of the image centre a point lies on: the larger of |dx| and |dy| decides.

    The image is cut by its two diagonals into four sectors; ``left``/``right`` when the
    horizontal offset from the centre dominates, ``top``/``bottom`` otherwise. The generator
    keeps shapes well inside one sector (|dominant offset| >= 0.25*S, other <= 0.1*S), so the
    answer never depends on rounding or on where the shape's pixel centroid sits.
    """
    c = (image_size - 1) / 2.0
    dx, dy = cx - c, cy - c
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _position(meta: Mapping[str, Any]) -> str:
    s = _single(meta)
    return position_of(s["cx"], s["cy"], meta["image_size"])


def _size(meta: Mapping[str, Any]) -> str:
    return "large" if _single(meta)["r"] > SIZE_THRESHOLD * meta["image_size"] else "small"


_FAMILY_LIST: tuple[QuestionFamily, ...] = (
    QuestionFamily(
        "colour", "shapes", "what colour is the shape ?", tuple(COLOURS),
        lambda m: _single(m)["colour"],
        "One shape of random kind, size and place; asks its flat fill colour.",
    ),
    QuestionFamily(
        "shape", "shapes", "what shape is it ?", SHAPE_KINDS,
        lambda m: _single(m)["kind"],
        "One medium-sized shape of random colour and place; asks circle/square/triangle.",
    ),
    QuestionFamily(
        "count", "shapes", "how many shapes are there ?", ("one", "two", "three"),
        lambda m: NUMBER_WORDS[len(m["shapes"])],
        "1-3 separated shapes (never touching) of one random colour, random kinds.",
    ),
    QuestionFamily(
        "position", "shapes", "where is the shape ?", ("left", "right", "top", "bottom"),
        _position,
        "One small shape clearly inside one diagonal sector of the image (see position_of).",
    ),
    QuestionFamily(
        "size", "shapes", "is the shape small or large ?", ("small", "large"),
        _size,
        "One shape, small (r <= 0.13*S) or large (r >= 0.28*S), random kind/colour/place.",
    ),
    QuestionFamily(
        "digit", "digits", "which digit is this ?", NUMBER_WORDS,
        lambda m: NUMBER_WORDS[int(m["digit"])],
        "A handwritten digit; asks which one, as a word (zero..nine).",
    ),
    QuestionFamily(
        "parity", "digits", "is the digit even ?", ("yes", "no"),
        lambda m: "yes" if int(m["digit"]) % 2 == 0 else "no",
        "A handwritten digit; asks whether it is even (zero counts as even).",
    ),
    QuestionFamily(
        "greater", "digits", "is the digit greater than four ?", ("yes", "no"),
        lambda m: "yes" if int(m["digit"]) > 4 else "no",
        "A handwritten digit; asks whether it is five or more.",
    ),
)

FAMILIES: dict[str, QuestionFamily] = {f.name: f for f in _FAMILY_LIST}


def get_family(name: str) -> QuestionFamily:
    """The family called ``name``; a ConfigError naming the known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown question family {name!r}; known families: {sorted(FAMILIES)}"
        ) from None


def check_track(track: str) -> str:
    """Return ``track`` if it is a known track, else raise ConfigError."""
    if track not in TRACKS:
        raise ConfigError(f"unknown benchmark track {track!r}; use one of {list(TRACKS)}")
    return track


def families_for_track(track: str) -> list[QuestionFamily]:
    """The families of ``track``, in registry order."""
    check_track(track)
    return [f for f in _FAMILY_LIST if f.track == track]


def vocabulary() -> list[str]:
    """Every word used by any question or answer, sorted and deduplicated."""
    words: set[str] = set()
    for fam in _FAMILY_LIST:
        words.update(fam.question.split(" "))
        words.update(fam.answers)
    return sorted(words)
