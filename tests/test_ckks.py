"""CKKS encrypted aggregation: correctness, key separation, malformed input, cost."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from mor_secure.crypto import ckks
from mor_secure.errors import CryptoError, ProtocolError

# One key for the whole module: context generation dominates otherwise.
SECRET = ckks.new_secret_context()
PUBLIC = ckks.load_context(ckks.serialize_context(SECRET, secret=False))


def _softmax_weights(rng: np.random.Generator, k: int, n: int) -> list[np.ndarray]:
    logits = rng.normal(size=(n, k)) * 2.0
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return [w[:, j].copy() for j in range(k)]


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 16),
    n=st.integers(1, 256),
    with_bias=st.booleans(),
    with_scale=st.booleans(),
    with_mask=st.booleans(),
)
def test_decrypted_mixture_matches_plaintext(seed, k, n, with_bias, with_scale, with_mask):
    rng = np.random.default_rng(seed)
    scores = [rng.uniform(-4.0, 4.0, size=n) for _ in range(k)]
    weights = _softmax_weights(rng, k, n)
    if with_mask:  # absent clients (refused, dropped, rejected): zero weight, the rest renormalised
        keep = rng.random(k) < 0.6
        keep[rng.integers(k)] = True
        total = sum(w for w, m in zip(weights, keep) if m)
        weights = [w / total if m else np.zeros(n) for w, m in zip(weights, keep)]
    if with_scale:  # router weight folded with a per-client affine scale a_k
        weights = [w * rng.uniform(0.25, 3.0) for w in weights]
    bias = rng.uniform(-2.0, 2.0, size=n) if with_bias else None
    cts = [ckks.encrypt_scores(SECRET, s) for s in scores]
    agg = ckks.weighted_sum(PUBLIC, cts, weights, bias)
    got = ckks.decrypt_aggregate(SECRET, agg, n)
    want = sum(w * s for w, s in zip(weights, scores)) + (0.0 if bias is None else bias)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_default_parameters_are_at_the_128_bit_bound_and_hold_their_capacity():
    params = ckks.CkksParams()
    assert params.poly_modulus_degree == 4096 and sum(params.coeff_mod_bit_sizes) == 109
    with pytest.raises(CryptoError, match="invalid CKKS parameters"):  # SEAL enforces 128-bit security
        ckks.new_secret_context(ckks.CkksParams(4096, (51, 39, 20), 2.0**39))
    cap = ckks.aggregate_capacity(PUBLIC)
    assert cap == 2.0**11 and ckks.slot_count(PUBLIC) == 2048
    # constant vectors are the worst case for the encoding: 16 clients at the edge of the capacity
    scores = [np.full(64, 6.0)] * 16
    weights = [np.full(64, 0.95 * cap / 6.0 / 16)] * 16
    got = ckks.decrypt_aggregate(SECRET, ckks.weighted_sum(PUBLIC, [ckks.encrypt_scores(SECRET, x) for x in scores],
                                                           weights), 64)
    np.testing.assert_allclose(got, 0.95 * cap, rtol=1e-5)


def test_masked_clients_are_skipped_and_all_masked_gives_bias():
    s = [np.array([1.0, 2.0]), np.array([3.0, -1.0])]
    cts = [ckks.encrypt_scores(PUBLIC, x) for x in s]  # public key suffices to encrypt
    got = ckks.decrypt_aggregate(SECRET, ckks.weighted_sum(PUBLIC, cts, [np.ones(2), np.zeros(2)]), 2)
    np.testing.assert_allclose(got, s[0], atol=1e-5)
    bias = np.array([0.5, -0.5])
    agg = ckks.weighted_sum(PUBLIC, cts, [np.zeros(2), np.zeros(2)], bias)
    np.testing.assert_allclose(ckks.decrypt_aggregate(SECRET, agg, 2), bias, atol=1e-5)


def test_server_refuses_private_context():
    ct = ckks.encrypt_scores(SECRET, np.ones(4))
    with pytest.raises(CryptoError, match="private CKKS context"):
        ckks.weighted_sum(SECRET, [ct], [np.ones(4)])


def test_public_serialization_has_no_secret_key():
    data = ckks.serialize_context(SECRET, secret=False)
    loaded = ckks.load_context(data)
    assert loaded.is_private() is False and not loaded.has_secret_key()
    assert not loaded.has_galois_keys() and not loaded.has_relin_keys()
    pub = ckks.public_copy(SECRET)
    assert pub.is_private() is False and SECRET.is_private() is True
    assert ckks.load_context(ckks.serialize_context(SECRET, secret=True)).is_private()
    with pytest.raises(CryptoError):
        ckks.serialize_context(pub, secret=True)
    with pytest.raises(CryptoError):  # the public context cannot decrypt
        ckks.decrypt_aggregate(PUBLIC, ckks.encrypt_scores(PUBLIC, np.ones(2)), 2)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:-200],  # truncated
        lambda b: b"\x00" * 64,  # garbage
        lambda b: b[:600] + bytes(x ^ 0xFF for x in b[600:700]) + b[700:],  # flipped bytes
        lambda b: "not bytes",
        lambda b: b"",
    ],
)
def test_corrupted_ciphertext_names_client_index(mangle):
    cts = [ckks.encrypt_scores(SECRET, np.full(8, float(i))) for i in range(4)]
    cts[2] = mangle(cts[2])
    with pytest.raises(ProtocolError, match=r"client 2\b"):
        ckks.weighted_sum(PUBLIC, cts, [np.full(8, 0.25)] * 4)


def test_wrong_size_and_foreign_parameters_name_client_index():
    cts = [ckks.encrypt_scores(SECRET, np.ones(8)), ckks.encrypt_scores(SECRET, np.ones(9))]
    with pytest.raises(ProtocolError, match=r"client 1: ciphertext holds 9 slots, expected 8"):
        ckks.weighted_sum(PUBLIC, cts, [np.ones(8), np.ones(8)])
    other = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    other.global_scale = 2**20
    foreign = ts.ckks_vector(other, [1.0] * 8).serialize()
    with pytest.raises(ProtocolError, match=r"client 1\b"):
        ckks.weighted_sum(PUBLIC, [cts[0], foreign], [np.ones(8), np.ones(8)])


@pytest.mark.parametrize(
    "bad, msg",
    [
        (np.ones((2, 3)), "1-D"),
        (np.array([1.0, np.nan]), "NaN"),
        (np.array([np.inf]), "NaN or infinity"),
        (np.array([]), "empty"),
        (np.zeros(2049), "2048 CKKS slots"),
        (np.array([1 + 2j]), "real numeric"),
        (np.array(["a"]), "real numeric"),
        (np.array([1e9]), "clip"),
    ],
)
def test_encrypt_scores_validates(bad, msg):
    with pytest.raises(ProtocolError, match=msg):
        ckks.encrypt_scores(SECRET, bad)


def test_weighted_sum_validates_shapes():
    ct = ckks.encrypt_scores(SECRET, np.ones(3))
    with pytest.raises(ProtocolError, match="2 weight vectors"):
        ckks.weighted_sum(PUBLIC, [ct], [np.ones(3), np.ones(3)])
    with pytest.raises(ProtocolError, match="no ciphertexts"):
        ckks.weighted_sum(PUBLIC, [], [])
    with pytest.raises(ProtocolError, match=r"weights\[1\] has length 2"):
        ckks.weighted_sum(PUBLIC, [ct, ct], [np.ones(3), np.ones(2)])
    with pytest.raises(ProtocolError, match="bias has length 4"):
        ckks.weighted_sum(PUBLIC, [ct], [np.ones(3)], np.ones(4))
    with pytest.raises(ProtocolError, match="holds 3 slots, expected 4"):
        ckks.decrypt_aggregate(SECRET, ct, 4)
    with pytest.raises(ProtocolError, match="failed to deserialize"):
        ckks.decrypt_aggregate(SECRET, b"junk", 3)


@pytest.mark.parametrize("k", [3, 16])
def test_measure_cost(k):
    """Prints cost figures (run with -s); no timing assertions."""
    n = 512
    rng = np.random.default_rng(k)
    scores = [rng.uniform(-4, 4, n) for _ in range(k)]
    weights = _softmax_weights(rng, k, n)
    t0 = time.perf_counter()
    cts = [ckks.encrypt_scores(SECRET, s) for s in scores]
    t1 = time.perf_counter()
    agg = ckks.weighted_sum(PUBLIC, cts, weights)
    t2 = time.perf_counter()
    got = ckks.decrypt_aggregate(SECRET, agg, n)
    t3 = time.perf_counter()
    err = float(np.max(np.abs(got - sum(w * s for w, s in zip(weights, scores)))))
    print(
        f"\n[ckks] K={k} n={n}: encrypt {1e3 * (t1 - t0) / k:.1f} ms/client, "
        f"aggregate {1e3 * (t2 - t1):.1f} ms, decrypt {1e3 * (t3 - t2):.1f} ms, "
        f"ciphertext {len(cts[0]) / 1e3:.0f} KB/client, aggregate {len(agg) / 1e3:.0f} KB, "
        f"public ctx {len(ckks.serialize_context(SECRET, secret=False)) / 1e3:.0f} KB, "
        f"max err {err:.1e}"
    )
    assert err < 1e-4
