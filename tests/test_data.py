"""Tests of the benchmark (mor_secure.data): oracles against pixels, determinism, balance,
non-IID client data, disjoint digit pools, and the `datasets` round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from mor_secure.data import (
    FAMILIES, QuestionFamily, families_for_track, first_word, load_split, make_client_pairs,
    make_samples, make_server_sets, oracle_correct, vocabulary, write_benchmark,
)
from mor_secure.data import digits
from mor_secure.data.families import COLOURS, NUMBER_WORDS
from mor_secure.errors import ConfigError

SHAPES_FAMILIES = [f.name for f in families_for_track("shapes")]
DIGITS_FAMILIES = [f.name for f in families_for_track("digits")]


# ---------------------------------------------------------------- reading images back

def _mask(img: Image.Image) -> np.ndarray:
    return np.asarray(img).any(axis=-1)


def pixel_answer(family: str, img: Image.Image) -> str:
    """Re-derive a shapes-family answer from the pixels alone (independent of the oracle)."""
    arr, mask = np.asarray(img), _mask(img)
    size = arr.shape[0]
    assert mask.any(), "blank image"
    ys, xs = np.nonzero(mask)
    if family == "colour":
        colours = {tuple(int(v) for v in px) for px in arr[mask]}
        assert len(colours) == 1, colours
        return {rgb: name for name, rgb in COLOURS.items()}[colours.pop()]
    if family == "count":
        _, n = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connected: must be well apart
        return NUMBER_WORDS[n]
    if family == "shape":
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    if family == "position":
        c = (size - 1) / 2
        dx, dy = xs.mean() - c, ys.mean() - c
        assert abs(abs(dx) - abs(dy)) > 0.1 * size, (dx, dy)  # clearly inside one sector
        if abs(dx) > abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"
    if family == "size":
        return "large" if np.ptp(xs) + 1 > 0.4 * size else "small"
    raise AssertionError(family)


def _digit_lookup() -> dict[bytes, int]:
    grey, _ = digits.digit_images()
    return {np.ascontiguousarray(grey[i]).tobytes(): i for i in range(len(grey))}


def digit_index(img: Image.Image) -> int:
    """The load_digits() index of an upscaled digit image (nearest upscaling by 4 at 32px)."""
    arr = np.asarray(img)
    assert arr.shape == (32, 32, 3) and (arr[..., 0] == arr[..., 2]).all()
    return _LOOKUP[np.ascontiguousarray(arr[::4, ::4, 0]).tobytes()]


_LOOKUP = _digit_lookup()


def _pixels(records):
    return [np.asarray(r["image"]).tobytes() for r in records]


# ---------------------------------------------------------------- families

def test_registry_and_vocabulary():
    assert set(SHAPES_FAMILIES) >= {"colour", "shape", "count", "position", "size"}
    assert DIGITS_FAMILIES == ["digit", "parity", "greater"]
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    for fam in FAMILIES.values():
        assert isinstance(fam, QuestionFamily)
        words = fam.question.split(" ")
        assert fam.question == fam.question.lower() and words[-1] == "?" and "" not in words
        assert len(set(fam.answers)) == len(fam.answers) >= 2
        assert all(a.isalpha() and a.islower() for a in fam.answers)
        assert set(words) | set(fam.answers) <= set(vocab)
    assert FAMILIES["greater"].question == "is the digit greater than four ?"
    with pytest.raises(ConfigError):
        families_for_track("audio")
    with pytest.raises(AttributeError):
        FAMILIES["colour"].name = "x"  # frozen


# ---------------------------------------------------------------- oracles vs pixels

@pytest.mark.parametrize("image_size", [16, 32, 48])
@pytest.mark.parametrize("family", SHAPES_FAMILIES)
def test_shapes_oracle_matches_pixels(family, image_size):
    samples = make_samples("shapes", family, 60, seed=3, image_size=image_size)
    for s in samples:
        assert s["image"].size == (image_size, image_size) and s["image"].mode == "RGB"
        assert s["question"] == FAMILIES[family].question
        assert pixel_answer(family, s["image"]) == s["answer"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), image_size=st.integers(16, 64),
       family=st.sampled_from(["colour", "count", "position", "size"]))
def test_any_seed_oracle_consistent_with_drawing(seed, image_size, family):
    for s in make_samples("shapes", family, 8, seed=seed, image_size=image_size):
        assert pixel_answer(family, s["image"]) == s["answer"]


@pytest.mark.parametrize("family", DIGITS_FAMILIES)
def test_digits_oracle_matches_label(family):
    _, labels = digits.digit_images()
    for s in make_samples("digits", family, 60, seed=1, image_size=32):
        d = int(labels[digit_index(s["image"])])
        expected = {"digit": NUMBER_WORDS[d], "parity": "yes" if d % 2 == 0 else "no",
                    "greater": "yes" if d > 4 else "no"}[family]
        assert s["answer"] == expected


# ---------------------------------------------------------------- determinism

def test_determinism_by_seed():
    a = make_samples("shapes", "count", 20, seed=7)
    b = make_samples("shapes", "count", 20, seed=7)
    c = make_samples("shapes", "count", 20, seed=8)
    assert _pixels(a) == _pixels(b) and [s["answer"] for s in a] == [s["answer"] for s in b]
    assert _pixels(a) != _pixels(c)
    for track, owned in (("shapes", ["colour"]), ("digits", ["parity"])):
        p1 = make_client_pairs(track, owned, 40, seed=5)
        p2 = make_client_pairs(track, owned, 40, seed=5)
        p3 = make_client_pairs(track, owned, 40, seed=6)
        key = lambda ps: [(r["family"], r["chosen"], r["rejected"]) for r in ps]  # noqa: E731
        assert _pixels(p1) == _pixels(p2) and key(p1) == key(p2)
        assert _pixels(p1) != _pixels(p3)
        s1 = make_server_sets(track, None, 5, 32, 12, 12, 12)
        s2 = make_server_sets(track, None, 5, 32, 12, 12, 12)
        s3 = make_server_sets(track, None, 6, 32, 12, 12, 12)
        for split in ("public", "objective", "eval"):
            assert _pixels(s1[split]) == _pixels(s2[split])
            assert [{k: v for k, v in r.items() if k != "image"} for r in s1[split]] == \
                   [{k: v for k, v in r.items() if k != "image"} for r in s2[split]]
            assert _pixels(s1[split]) != _pixels(s3[split])


_DIGEST = """
import hashlib, numpy as np
from mor_secure.data import make_client_pairs, make_server_sets
h = hashlib.sha256()
recs = make_server_sets("shapes", None, 0, 32, 15, 15, 0)["objective"]
recs += make_client_pairs("digits", ["digit", "parity"], 15, 0)
for r in recs:
    h.update(np.asarray(r["image"]).tobytes())
    h.update(repr(sorted((k, v) for k, v in r.items() if k != "image")).encode())
print(h.hexdigest())
"""


def test_determinism_across_processes():
    """Same seed, same data in a fresh interpreter with another string-hash seed."""
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True,
                             text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_server_and_clients_use_disjoint_streams():
    server = make_server_sets("shapes", ["colour"], 0, 32, 50, 0, 50)
    c0 = make_client_pairs("shapes", ["colour"], 50, 0, client_index=0)
    c1 = make_client_pairs("shapes", ["colour"], 50, 0, client_index=1)
    seqs = [_pixels(server["public"]), _pixels(server["eval"]), _pixels(c0), _pixels(c1)]
    for i in range(len(seqs)):
        for j in range(i + 1, len(seqs)):
            assert seqs[i][:10] != seqs[j][:10]


# ---------------------------------------------------------------- balance

def test_answers_and_families_balanced():
    for fam in FAMILIES:
        track = FAMILIES[fam].track
        counts = Counter(s["answer"] for s in make_samples(track, fam, 61, seed=2))
        assert set(counts) == set(FAMILIES[fam].answers)
        assert max(counts.values()) - min(counts.values()) <= 1
    sets = make_server_sets("shapes", None, 0, 32, n_public=53, n_objective=40, n_eval=50)
    assert {k: len(v) for k, v in sets.items()} == {"public": 53, "objective": 40, "eval": 50}
    for split, records in sets.items():
        fams = Counter(r["family"] for r in records)
        assert set(fams) == set(SHAPES_FAMILIES) and max(fams.values()) - min(fams.values()) <= 1
    assert all(set(r) == {"image", "family", "question"} for r in sets["public"])
    labels = [r["label"] for r in sets["objective"]]
    assert labels.count(1.0) == labels.count(0.0) == 20
    for r in sets["objective"]:
        truth = pixel_answer(r["family"], r["image"])
        a, b = r["response_a"], r["response_b"]
        good, bad = (a, b) if r["label"] == 1.0 else (b, a)
        assert good == truth and bad != truth and bad in FAMILIES[r["family"]].answers
    for r in sets["eval"]:
        assert r["answer"] == pixel_answer(r["family"], r["image"])


# ---------------------------------------------------------------- non-IID client data

@pytest.mark.parametrize("foreign_fraction", [0.0, 0.1, 0.3])
def test_client_pairs_non_iid(foreign_fraction):
    owned = ["colour", "count"]
    pairs = make_client_pairs("shapes", owned, 200, seed=4, foreign_fraction=foreign_fraction,
                              foreign_label_noise=0.5)
    assert len(pairs) == 200
    n_owned = sum(p["family"] in owned for p in pairs)
    assert n_owned == round(200 * (1 - foreign_fraction))
    owned_fams = Counter(p["family"] for p in pairs if p["family"] in owned)
    assert abs(owned_fams["colour"] - owned_fams["count"]) <= 1
    flipped = 0
    for p in pairs:
        assert set(p) == {"image", "family", "question", "chosen", "rejected"}
        assert p["chosen"] != p["rejected"]
        assert {p["chosen"], p["rejected"]} <= set(FAMILIES[p["family"]].answers)
        truth = pixel_answer(p["family"], p["image"])
        if p["family"] in owned:
            assert p["chosen"] == truth  # competent on owned families
        else:
            assert truth in (p["chosen"], p["rejected"])
            flipped += p["rejected"] == truth
    n_foreign = 200 - n_owned
    if n_foreign:
        assert 0.15 <= flipped / n_foreign <= 0.85  # label noise 0.5 on foreign families


def test_foreign_label_noise_extremes():
    for noise, expect_flipped in ((0.0, False), (1.0, True)):
        pairs = make_client_pairs("shapes", ["size"], 60, 9, foreign_fraction=0.5,
                                  foreign_label_noise=noise)
        for p in pairs:
            truth = pixel_answer(p["family"], p["image"])
            flipped = p["family"] != "size" and expect_flipped
            assert (p["rejected"] if flipped else p["chosen"]) == truth
    # a client owning every family has no foreign pairs
    pairs = make_client_pairs("digits", DIGITS_FAMILIES, 30, 0, foreign_fraction=0.5)
    assert len(pairs) == 30 and {p["family"] for p in pairs} == set(DIGITS_FAMILIES)


@pytest.mark.parametrize("track,owned", [("shapes", ["colour", "size"]), ("digits", ["parity"])])
def test_malformed_rejections_are_wrong_by_the_oracle_and_keep_the_chosen(track, owned):
    plain = make_client_pairs(track, owned, 120, seed=3, foreign_fraction=0.0)
    assert all(p["rejected"] in FAMILIES[p["family"]].answers for p in plain)  # default: none malformed
    pairs = make_client_pairs(track, owned, 120, seed=3, foreign_fraction=0.0, malformed_fraction=1.0)
    kinds = Counter()
    for p in pairs:
        answers = FAMILIES[p["family"]].answers
        truth = pixel_answer(p["family"], p["image"]) if track == "shapes" else p["chosen"]
        assert p["chosen"] == truth and p["chosen"] in answers
        assert not oracle_correct(p["family"], truth, p["rejected"])  # never an answer of the question
        words = p["rejected"].split()
        kinds["empty" if not words else "two words" if len(words) == 2 else "one word"] += 1
    assert set(kinds) == {"empty", "one word", "two words"}, kinds
    # off-topic words come from the whole vocabulary, the other track's included: a policy can say any
    other_track = {w for f in families_for_track("digits" if track == "shapes" else "shapes")
                   for w in (*f.answers, *f.question.split(" "))} - {w for f in families_for_track(track)
                                                                     for w in (*f.answers, *f.question.split(" "))}
    assert any(set(p["rejected"].split()) & other_track for p in pairs)
    with pytest.raises(ConfigError, match="malformed_fraction"):
        make_client_pairs(track, owned, 10, seed=3, malformed_fraction=1.5)


# ---------------------------------------------------------------- digit pools

def test_digit_pools_disjoint_and_stratified():
    pools = digits.digit_pools()
    _, labels = digits.digit_images()
    all_idx = np.concatenate(list(pools.values()))
    assert len(all_idx) == len(np.unique(all_idx)) == 1797
    for idx in pools.values():
        assert set(labels[idx]) == set(range(10))
    shards = [set(digits.pool_indices("client", (i, 3)).tolist()) for i in range(3)]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert set().union(*shards) == set(pools["client"].tolist())


def test_digits_client_data_never_in_server_sets():
    pools = {k: set(v.tolist()) for k, v in digits.digit_pools().items()}
    used_by_clients = []
    for i in range(2):
        pairs = make_client_pairs("digits", ["digit"], 150, seed=0, client_index=i, n_clients=2)
        used = {digit_index(p["image"]) for p in pairs}
        assert used <= pools["client"]
        used_by_clients.append(used)
    assert not used_by_clients[0] & used_by_clients[1]  # per-client shards
    sets = make_server_sets("digits", None, 0, 32, 90, 60, 90)
    for split, records in sets.items():
        used = {digit_index(r["image"]) for r in records}
        assert used <= pools[split] and not used & pools["client"]


# ---------------------------------------------------------------- datasets round trip

def test_write_and_load_benchmark(tmp_path):
    clients = [("hospital_a", ["colour"], 12), ("bank-b", ["count", "size"], 10)]
    paths = write_benchmark(tmp_path, track="shapes", seed=1, image_size=24, clients=clients,
                            n_public=8, n_objective=6, n_eval=7)
    assert paths["clients"]["hospital_a"] == str(tmp_path / "clients" / "hospital_a" / "data")
    manifest = json.loads((tmp_path / "benchmark.json").read_text())
    assert manifest["seed"] == 1 and manifest["paths"]["server"] == paths["server"]
    ds = load_split(paths["clients"]["hospital_a"])
    assert len(ds) == 12 and set(ds.column_names) == {"image", "family", "question", "chosen", "rejected"}
    expected = make_client_pairs("shapes", ["colour"], 12, 1, 24, client_index=0, n_clients=2)
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (24, 24)
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(expected[0]["image"]))
    assert ds["chosen"] == [p["chosen"] for p in expected]
    columns = {"public": {"image", "family", "question"},
               "objective": {"image", "family", "question", "response_a", "response_b", "label"},
               "eval": {"image", "family", "question", "answer"}}
    sizes = {"public": 8, "objective": 6, "eval": 7}
    for split, cols in columns.items():
        ds = load_split(paths["server"][split])
        assert set(ds.column_names) == cols and len(ds) == sizes[split]
        assert ds[0]["image"].size == (24, 24)
    assert set(load_split(paths["server"]["objective"])["label"]) <= {0.0, 1.0}
    with pytest.raises(ConfigError):
        load_split(tmp_path / "missing")
    with pytest.raises(ConfigError):
        write_benchmark(tmp_path, track="shapes", seed=1, image_size=24, clients=[("../x", ["colour"], 2)],
                        n_public=1, n_objective=1, n_eval=1)


# ---------------------------------------------------------------- scoring and errors

def test_oracle_correct():
    assert oracle_correct("colour", "red", "Red.")
    assert oracle_correct("colour", "red", "  red, I think")
    assert oracle_correct("parity", "yes", "\"Yes!\" it is even")
    assert not oracle_correct("colour", "red", "the shape is red")
    assert not oracle_correct("colour", "red", "")
    assert not oracle_correct("count", "two", "three")
    assert first_word("... Blue?") == "blue"
    with pytest.raises(ConfigError):
        oracle_correct("colour", "purple", "purple")
    with pytest.raises(ConfigError):
        oracle_correct("nope", "red", "red")


@pytest.mark.parametrize("call", [
    lambda: make_samples("audio", "colour", 1, 0),
    lambda: make_samples("shapes", "digit", 1, 0),
    lambda: make_samples("shapes", "colour", 1, -1),
    lambda: make_samples("shapes", "colour", 1, 0, image_size=8),
    lambda: make_client_pairs("shapes", [], 10, 0),
    lambda: make_client_pairs("shapes", ["colour"], 10, 0, foreign_fraction=1.5),
    lambda: make_server_sets("digits", ["colour"], 0, 32, 1, 1, 1),
])
def test_config_errors(call):
    with pytest.raises(ConfigError):
        call()
