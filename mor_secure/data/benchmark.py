"""The mor_secure benchmark (DESIGN.md §6): samples, client preference pairs, server sets.

Records are plain dicts whose ``image`` is a ``PIL.Image.Image`` (RGB, ``image_size``
square):

* sample / eval item: ``{"image", "family", "question", "answer"}`` (answer = oracle);
* client preference pair: ``{"image", "family", "question", "chosen", "rejected"}``;
* public prompt: ``{"image", "family", "question"}`` (no answer: the server aligns on it);
* objective pair: ``{"image", "family", "question", "response_a", "response_b", "label"}``
  with ``label = 1.0`` when ``response_a`` is the preferred (oracle) answer, else ``0.0``.

**Why clients are non-IID.** Each client *owns* one or a few families and is competent only
there: a fraction ``1 - foreign_fraction`` of its pairs come from its owned families with the
correct preference (chosen = oracle answer, rejected = a uniformly drawn wrong answer); the
rest come from the track's other families and their preference is flipped with probability
``foreign_label_noise`` (0.5 = pure guessing). A reward model trained on one client's data is
therefore good on that client's families only, which is what the server's router must learn.

**Determinism and disjointness.** Every function is a pure function of its arguments. Random
streams come from ``numpy.random.SeedSequence(seed, spawn_key=...)`` with a distinct key per
use (samples / client ``i`` / each server split), so the server's sets and every client's data
never share a random stream even with the same ``seed``. On the digits track they also use
disjoint image pools (digits.py), so no image is shared between client data and server sets.
Within every set families are balanced (counts differ by at most one) and so are answers
within each family.
"""

from __future__ import annotations

import functools
import json
import re
import string
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mor_secure.errors import ConfigError
from mor_secure.data import digits, shapes
from mor_secure.data.families import FAMILIES, check_track, families_for_track, get_family, vocabulary
from mor_secure.data.storage import load_split, save_records

__all__ = [
    "make_samples", "make_client_pairs", "make_server_sets", "write_benchmark", "load_split",
    "oracle_correct", "first_word",
]

_SAMPLES, _CLIENT, _SERVER = 0, 1, 2  # spawn-key domains of the random streams
_SERVER_SPLITS = ("public", "objective", "eval")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _rng(seed: int, *key: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative integer")
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def _count(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"{name}={n!r} must be a non-negative integer")
    return int(n)


def _image_size(track: str, image_size: int) -> int:
    least = shapes.MIN_IMAGE_SIZE if track == "shapes" else 8
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < least:
        raise ConfigError(f"image_size={image_size!r} must be an integer >= {least} for the {track} track")
    return int(image_size)


def _balanced(options: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` items from ``options``, each used floor or ceil of n/len times, shuffled."""
    k = len(options)
    extra = [options[i] for i in rng.permutation(k)[: n % k]]
    items = list(options) * (n // k) + extra
    return [items[i] for i in rng.permutation(len(items))]


def _track_families(track: str, families: Sequence[str] | None) -> list[str]:
    check_track(track)
    if families is None:
        return [f.name for f in families_for_track(track)]
    names = list(dict.fromkeys(families))
    if not names:
        raise ConfigError("families must name at least one question family")
    for name in names:
        if get_family(name).track != track:
            raise ConfigError(f"family {name!r} belongs to track {FAMILIES[name].track!r}, not {track!r}")
    return names


def _plan(families: Sequence[str], n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """A shuffled list of ``n`` (family, target answer): balanced families, balanced answers."""
    fams = _balanced(families, n, rng)
    targets = {f: iter(_balanced(FAMILIES[f].answers, fams.count(f), rng)) for f in dict.fromkeys(families)}
    return [(f, next(targets[f])) for f in fams]


def _draw(track: str, family: str, target: str, rng: np.random.Generator, image_size: int,
          indices: np.ndarray | None) -> dict[str, Any]:
    if track == "shapes":
        image, meta = shapes.draw(family, target, rng, image_size)
    else:
        image, meta = digits.draw(family, target, rng, image_size, indices)
    fam = FAMILIES[family]
    return {"image": image, "family": family, "question": fam.question, "answer": fam.answer_for(meta)}


def _wrong(family: str, answer: str, rng: np.random.Generator) -> str:
    wrong = FAMILIES[family].wrong_answers(answer)
    return wrong[int(rng.integers(len(wrong)))]


@functools.cache
def _off_topic(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every other word a policy could say, the other families' answers) for ``family``. The
    vocabulary is both tracks': a reward model never shown "eight" for a colour question may
    score it highest. "?" alone is no word."""
    own = set(FAMILIES[family].answers)
    words = tuple(w for w in vocabulary() if first_word(w) and first_word(w) not in own)
    others = tuple(a for f in FAMILIES.values() for a in f.answers if a not in own)
    return words, others


def _malformed(family: str, rng: np.random.Generator) -> str:
    """A response that does not answer ``family``'s question: an off-topic word (any other word
    of the vocabulary, or in particular another family's answer), nothing at all, or an
    off-topic word before an answer.
    Its first word is never one of ``family``'s answers, so the oracle scores it wrong."""
    words, others = _off_topic(family)
    off_topic = words[int(rng.integers(len(words)))]
    kind = int(rng.integers(4))
    if kind == 0:
        return off_topic
    if kind == 1:
        return ""
    if kind == 2:  # another family's answer: the off-topic word a policy finds first (measured)
        return others[int(rng.integers(len(others)))]
    answers = FAMILIES[family].answers
    return f"{off_topic} {answers[int(rng.integers(len(answers)))]}"


def make_samples(track: str, family: str, n: int, seed: int, image_size: int = 32, *,
                 pool: str = "eval") -> list[dict[str, Any]]:
    """``n`` answered samples of one family, answers balanced.

    ``pool`` picks the digits pool the images come from (ignored for shapes); the default
    ``"eval"`` never overlaps client data.
    """
    (fam_name,) = _track_families(track, [family])
    n, image_size = _count("n", n), _image_size(track, image_size)
    if pool not in digits.POOLS:
        raise ConfigError(f"unknown pool {pool!r}; use one of {list(digits.POOLS)}")
    indices = digits.pool_indices(pool) if track == "digits" else None
    rng = _rng(seed, _SAMPLES, list(FAMILIES).index(fam_name), digits.POOLS.index(pool))
    return [_draw(track, f, t, rng, image_size, indices) for f, t in _plan([fam_name], n, rng)]


def make_client_pairs(
    track: str, owned_families: Sequence[str], n_pairs: int, seed: int, image_size: int = 32,
    foreign_fraction: float = 0.1, foreign_label_noise: float = 0.5, *,
    client_index: int = 0, n_clients: int = 1, malformed_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """A client's private preference pairs (non-IID; see the module docstring).

    Exactly ``round(n_pairs * foreign_fraction)`` pairs are foreign (none when the client owns
    every family of the track). With probability ``malformed_fraction`` a pair's rejected
    response is replaced by a malformed one (:func:`_malformed`): every client also prefers a
    well-formed answer over an off-topic or empty one, which keeps its reward model from
    rewarding responses it never saw (a policy would otherwise learn to emit them).
    ``client_index`` selects the client's own random stream; on
    digits the images come from shard ``client_index`` of ``n_clients`` of the client pool.
    """
    owned = _track_families(track, owned_families)
    n_pairs, image_size = _count("n_pairs", n_pairs), _image_size(track, image_size)
    for name, v in (("foreign_fraction", foreign_fraction), ("foreign_label_noise", foreign_label_noise),
                    ("malformed_fraction", malformed_fraction)):
        if not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"{name}={v!r} must lie in [0, 1]")
    client_index, n_clients = _count("client_index", client_index), _count("n_clients", n_clients)
    foreign = [f.name for f in families_for_track(track) if f.name not in owned]
    n_foreign = int(round(n_pairs * float(foreign_fraction))) if foreign else 0
    rng = _rng(seed, _CLIENT, client_index)
    indices = None
    if track == "digits":
        indices = digits.pool_indices("client", (client_index, n_clients) if n_clients > 1 else None)
    plan = [(f, t, False) for f, t in _plan(owned, n_pairs - n_foreign, rng)]
    if n_foreign:
        plan += [(f, t, True) for f, t in _plan(foreign, n_foreign, rng)]
    plan = [plan[i] for i in rng.permutation(len(plan))]
    pairs = []
    for family, target, is_foreign in plan:
        s = _draw(track, family, target, rng, image_size, indices)
        chosen, rejected = s["answer"], _wrong(family, s["answer"], rng)
        if is_foreign and rng.random() < foreign_label_noise:
            chosen, rejected = rejected, chosen
        if malformed_fraction and rng.random() < malformed_fraction:
            rejected = _malformed(family, rng)
        pairs.append({"image": s["image"], "family": family, "question": s["question"],
                      "chosen": chosen, "rejected": rejected})
    return pairs


def make_server_sets(track: str, families: Sequence[str] | None, seed: int, image_size: int = 32,
                     n_public: int = 256, n_objective: int = 128,
                     n_eval: int = 256, *, public_answers: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The server's ``{"public", "objective", "eval"}`` sets (families/answers balanced).

    ``families=None`` means every family of the track. The objective set puts the oracle
    answer first in exactly half (floor or ceil) of its pairs, in shuffled order.
    ``public_answers``: the benchmark harness only (its answer-key reference row) -- the public
    prompts keep their oracle answer; a server's public prompts never have one.
    """
    fams = _track_families(track, families)
    image_size = _image_size(track, image_size)
    sizes = {"public": _count("n_public", n_public), "objective": _count("n_objective", n_objective),
             "eval": _count("n_eval", n_eval)}
    out: dict[str, list[dict[str, Any]]] = {}
    for split_id, split in enumerate(_SERVER_SPLITS):
        rng = _rng(seed, _SERVER, split_id)
        indices = digits.pool_indices(split) if track == "digits" else None
        samples = [_draw(track, f, t, rng, image_size, indices) for f, t in _plan(fams, sizes[split], rng)]
        if split == "public":
            keep = ("image", "family", "question", "answer") if public_answers else ("image", "family", "question")
            out[split] = [{k: s[k] for k in keep} for s in samples]
        elif split == "eval":
            out[split] = samples
        else:
            a_first = _balanced(["a", "b"], len(samples), rng)
            records = []
            for s, first in zip(samples, a_first):
                good, bad = s["answer"], _wrong(s["family"], s["answer"], rng)
                a, b = (good, bad) if first == "a" else (bad, good)
                records.append({"image": s["image"], "family": s["family"], "question": s["question"],
                                "response_a": a, "response_b": b, "label": 1.0 if first == "a" else 0.0})
            out[split] = records
    return out


def write_server_sets(out_dir: str | Path, *, track: str, seed: int, image_size: int, n_public: int,
                      n_objective: int, n_eval: int, families: Sequence[str] | None = None) -> dict[str, str]:
    """The server's part only (``out_dir/server/{public,objective,eval}``): what a server on the
    deployment runtime writes, holding no client's data. Returns ``{split: path}``."""
    server = make_server_sets(track, families, seed, image_size, n_public, n_objective, n_eval)
    return {split: save_records(records, split, Path(out_dir) / "server" / split) for split, records in server.items()}


def write_benchmark(out_dir: str | Path, *, track: str, seed: int, image_size: int,
                    clients: Sequence[tuple[str, Sequence[str], int]], n_public: int,
                    n_objective: int, n_eval: int, families: Sequence[str] | None = None,
                    foreign_fraction: float = 0.1,
                    foreign_label_noise: float = 0.5, malformed_fraction: float = 0.0) -> dict[str, Any]:
    """Generate and save the whole benchmark as ``datasets`` folders (``save_to_disk``).

    ``clients`` lists ``(client_name, owned_families, n_pairs)``; client ``i`` uses random
    stream ``i`` and, on digits, shard ``i`` of the client pool. Layout::

        out_dir/clients/<client_name>/data     preference pairs
        out_dir/server/{public,objective,eval}
        out_dir/benchmark.json                 the arguments and the paths

    Returns ``{"clients": {name: path}, "server": {split: path}, "manifest": path}``.
    """
    out = Path(out_dir)
    names = [c[0] for c in clients]
    if not clients:
        raise ConfigError("clients must list at least one (client_name, owned_families, n_pairs)")
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"client name {name!r} must match {_NAME_RE.pattern} (it is a folder name)")
    if len(set(names)) != len(names):
        raise ConfigError(f"client names must be unique, got {names}")
    paths: dict[str, Any] = {"clients": {}, "server": {}}
    for i, (name, owned, n_pairs) in enumerate(clients):
        pairs = make_client_pairs(track, owned, n_pairs, seed, image_size, foreign_fraction,
                                  foreign_label_noise, client_index=i, n_clients=len(clients),
                                  malformed_fraction=malformed_fraction)
        paths["clients"][name] = save_records(pairs, "pairs", out / "clients" / name / "data")
    paths["server"] = write_server_sets(out, track=track, seed=seed, image_size=image_size, n_public=n_public,
                                        n_objective=n_objective, n_eval=n_eval, families=families)
    manifest = {
        "track": track, "seed": int(seed), "image_size": int(image_size),
        "clients": [{"name": n, "owned_families": list(o), "n_pairs": int(k)} for n, o, k in clients],
        "families": list(families) if families is not None else None,
        "n_public": int(n_public), "n_objective": int(n_objective), "n_eval": int(n_eval),
        "foreign_fraction": float(foreign_fraction), "foreign_label_noise": float(foreign_label_noise),
        "malformed_fraction": float(malformed_fraction),
        "paths": {"clients": paths["clients"], "server": paths["server"]},
    }
    paths["manifest"] = str(out / "benchmark.json")
    Path(paths["manifest"]).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return paths


_STRIP = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026"


def first_word(completion: str) -> str:
    """The first whitespace-separated word of ``completion``, lower-cased, edge punctuation stripped."""
    for token in str(completion).split():
        word = token.strip(_STRIP).lower()
        if word:
            return word
    return ""


def oracle_correct(family: str, answer: str, completion: str) -> bool:
    """Whether a policy ``completion`` answers correctly: its first word equals ``answer``.

    ``answer`` is the oracle answer of ``family`` (checked to be one of its answers).
    "Red." and " red, I think" are correct for ``red``; "the shape is red" is not: the
    policy is asked for a one-word answer first.
    """
    fam = get_family(family)
    if answer not in fam.answers:
        raise ConfigError(f"{answer!r} is not an answer of family {family!r}: {fam.answers}")
    return first_word(completion) == answer
