"""CKKS encrypted aggregation of reward scores (TenSEAL only; no hand-written HE).

Protocol (DESIGN.md §4):

* The provisioner creates **one** secret CKKS context per consortium
  (:func:`new_secret_context`), gives its secret-bearing serialization to every client and
  a public copy (:func:`public_copy`, no secret key) to the server.
* Each client encrypts its clipped, noised score vector for one GRPO step as one packed
  ciphertext (:func:`encrypt_scores`).
* The server, holding only the public context, forms ``Σ_k w_k ⊙ Enc(s_k) (+ b)`` slot-wise
  with plaintext per-slot weights (router weights folded with the per-client affine scale
  ``a_k``; the bias carries ``Σ_k w_k·b_k``) (:func:`weighted_sum`). Slot-wise
  plaintext-multiply-and-add needs neither Galois (rotation) nor relinearisation keys, so
  the public context carries only the public key.
* A (rotating) decryptor client decrypts only the aggregate (:func:`decrypt_aggregate`).

Assumptions and known limits -- say them, do not hide them:

* Confidentiality of individual scores assumes an **honest-but-curious** server. The weights
  are chosen by the server in the clear, so a malicious server could pick one-hot weights and
  have the decryptor open a single client's vector; a server colluding with the decryptor (or
  with any client: CKKS here is single-key, every client holds the same secret key) can
  decrypt any client's ciphertext. In every one of these cases the attacker learns only the
  client's *clipped, noised* scores: the DP guarantee never depends on encryption.
* CKKS is approximate: decrypted aggregates carry ~2e-6 absolute error at these parameters
  (scores of a few units, router weights summing to about 1).
  Decrypted values are shared only with parties that could decrypt anyway (key holders), so
  the Li–Micciancio key-recovery concern about publishing CKKS decryptions to non-key-holders
  does not arise as long as the decryptor does not publish raw decryptions beyond the server.
* The aggregate must stay inside :func:`aggregate_capacity` (|value| < 2^11 at the default
  parameters) or it wraps around to garbage; the server checks the declared score ranges
  against it before mixing (``Channel.mixture``).
* A ciphertext encrypted under a *different* key of the same parameters cannot be told apart
  from a valid one; it decrypts to garbage. Kits from one ``provision`` run share one key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from mor_secure.errors import CryptoError, ProtocolError

__all__ = [
    "CkksParams",
    "MAX_ABS_VALUE",
    "MAX_CIPHERTEXT_BYTES",
    "aggregate_capacity",
    "check_ciphertext",
    "context_census",
    "decrypt_aggregate",
    "encrypt_scores",
    "load_context",
    "new_secret_context",
    "public_copy",
    "serialize_context",
    "slot_count",
    "weighted_sum",
]

#: Largest |score|, |weight| or |bias| accepted as input (a sanity bound). What the encrypted
#: sum can hold is smaller and depends on the parameters: see :func:`aggregate_capacity`.
MAX_ABS_VALUE = float(2**20)
#: A fresh ciphertext serialises to ~110 KB at the default parameters (~330 KB at N=8192 with
#: four moduli); anything far larger is refused unparsed.
MAX_CIPHERTEXT_BYTES = 4 * 2**20


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters. Default: N=4096 (2048 slots) with 51+39+19 = 109 modulus bits, the
    largest total the HomomorphicEncryption.org standard allows for 128-bit security at this N
    (SEAL refuses 110). Scale 2^39 = the 39-bit prime that one rescale divides out; the 51-bit
    prime left after it holds aggregates up to |value| < 2^11 (``aggregate_capacity``). The
    19-bit last prime is SEAL's special prime: no relinearisation or Galois keys are used, so
    it only has to exceed the fresh encryption noise. Measured against the former N=8192,
    (60, 40, 40, 60): same precision (max error ~2e-6 for 1..16 clients), a third of the bytes,
    about 2.5x less time per encryption and per weighted sum (BENCHMARKS.md)."""

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (51, 39, 19)
    global_scale: float = float(2**39)


def slot_count(ctx_or_params: ts.Context | CkksParams | None = None) -> int:
    """Number of packed slots (N/2) for ``CkksParams`` (default params when ``None``)."""
    if isinstance(ctx_or_params, ts.Context):
        return ctx_or_params.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2
    params = ctx_or_params or CkksParams()
    return params.poly_modulus_degree // 2


def aggregate_capacity(ctx: ts.Context) -> float:
    """Largest |value| a weighted sum (one plaintext multiply, one rescale) holds under ``ctx``:
    ``2^(bits left after the rescale - log2(scale) - 1)``. Beyond it the sum wraps around
    modulo the remaining modulus and decrypts to garbage, so callers keep the declared score
    ranges times the weights below it."""
    first = ctx.seal_context().data.first_context_data()
    after_rescale = first.next_context_data()
    if after_rescale is None:
        raise CryptoError("CKKS context has a single data modulus: a weighted sum cannot be rescaled")
    return float(2.0 ** (after_rescale.total_coeff_modulus_bit_count() - np.log2(ctx.global_scale) - 1))


def new_secret_context(params: CkksParams = CkksParams()) -> ts.Context:
    """A fresh private CKKS context (secret + public key; no Galois or relinearisation keys)."""
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except ValueError as err:
        raise CryptoError(f"invalid CKKS parameters {params}: {err}") from err
    ctx.global_scale = params.global_scale
    return ctx


def serialize_context(ctx: ts.Context, *, secret: bool) -> bytes:
    """Serialize ``ctx``. ``secret=True`` keeps the secret key (client kits only); with
    ``secret=False`` the bytes hold public parameters and the public key only."""
    if secret and not ctx.is_private():
        raise CryptoError("cannot serialize a secret context from a public one (no secret key)")
    return ctx.serialize(
        save_public_key=True,
        save_secret_key=secret,
        save_galois_keys=False,
        save_relin_keys=False,
    )


def load_context(data: bytes) -> ts.Context:
    """Load a context serialized by :func:`serialize_context` (CryptoError if unreadable)."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise CryptoError("CKKS context bytes are empty or not bytes")
    try:
        ctx = ts.context_from(bytes(data))
    except (ValueError, RuntimeError, TypeError) as err:
        raise CryptoError(f"CKKS context failed to load: {err}") from err
    if not ctx.has_public_key():
        raise CryptoError("CKKS context has no public key; re-run `mor-secure provision`")
    return ctx


def public_copy(ctx: ts.Context) -> ts.Context:
    """A copy of ``ctx`` with the secret key dropped (``is_private()`` is False)."""
    pub = ctx.copy()
    if pub.is_private():
        pub.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
    if pub.is_private() or pub.has_secret_key():  # defensive: never hand out the key
        raise CryptoError("failed to strip the secret key from the CKKS context")
    return pub


def _vector(x: object, what: str, max_len: int) -> np.ndarray:
    """Validate a 1-D finite real vector of length 1..max_len, |x| ≤ MAX_ABS_VALUE."""
    arr = np.asarray(x)
    if arr.dtype == object or arr.dtype.kind not in "fiu":
        raise ProtocolError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ProtocolError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ProtocolError(f"{what} is empty")
    if arr.size > max_len:
        raise ProtocolError(f"{what} has length {arr.size}, more than the {max_len} CKKS slots")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ProtocolError(f"{what} contains NaN or infinity")
    if np.max(np.abs(arr)) > MAX_ABS_VALUE:
        raise ProtocolError(f"{what} has |value| > {MAX_ABS_VALUE:g}; clip before encrypting")
    return arr


def encrypt_scores(ctx: ts.Context, scores: np.ndarray) -> bytes:
    """Client side: encrypt one score vector as one packed CKKS ciphertext (bytes).

    Works with the secret or the public context (encryption needs only the public key).
    Scores must already be clipped and noised: encryption adds confidentiality, not DP.
    """
    if not isinstance(ctx, ts.Context) or not ctx.has_public_key():
        raise CryptoError("encrypt_scores needs a CKKS context holding the public key")
    arr = _vector(scores, "scores", slot_count(ctx))
    return ts.ckks_vector(ctx, arr.tolist()).serialize()


def _load_vector(ctx: ts.Context, data: object, length: int, who: str) -> ts.CKKSVector:
    """Deserialize one ciphertext of ``length`` slots under ``ctx`` (an already loaded vector is
    only size-checked); ProtocolError naming ``who``."""
    if isinstance(data, ts.CKKSVector):
        if data.size() != length:
            raise ProtocolError(f"{who}: ciphertext holds {data.size()} slots, expected {length}")
        return data
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"{who}: ciphertext is {type(data).__name__}, not bytes")
    if not data or len(data) > MAX_CIPHERTEXT_BYTES:
        raise ProtocolError(f"{who}: ciphertext has implausible size {len(data)} bytes")
    try:
        vec = ts.ckks_vector_from(ctx, bytes(data))
    except (ValueError, RuntimeError, TypeError) as err:
        raise ProtocolError(f"{who}: ciphertext failed to deserialize ({err})") from err
    if vec.size() != length:
        raise ProtocolError(f"{who}: ciphertext holds {vec.size()} slots, expected {length}")
    return vec


def check_ciphertext(public_ctx: ts.Context, data: object, length: int, who: str = "client") -> ts.CKKSVector:
    """Server side: the loaded ciphertext, or ProtocolError unless ``data`` is a ciphertext of
    ``length`` slots that loads under ``public_ctx`` (size-bounded before parsing). Lets the
    server exclude one bad client before aggregating the rest; pass the returned vector to
    :func:`weighted_sum` to parse it only once. A ciphertext under a foreign key of the same
    parameters passes (see the module's known limits)."""
    return _load_vector(public_ctx, data, length, who)


def weighted_sum(
    public_ctx: ts.Context,
    ciphertexts: Sequence[bytes | ts.CKKSVector],
    weights: Sequence[np.ndarray],
    bias: np.ndarray | None = None,
) -> bytes:
    """Server side: ``Σ_k weights[k] ⊙ Enc(s_k) (+ bias)`` slot-wise, returned serialized.

    ``public_ctx`` must not hold the secret key (CryptoError otherwise): the server never
    holds it. Ciphertexts are serialized bytes or vectors from :func:`check_ciphertext`.
    Every ciphertext must encrypt a vector of ``len(weights[k])`` slots, the same
    length for all k; a malformed one raises ProtocolError naming its client index ``k``
    (0-based position in ``ciphertexts``). Clients whose weight vector is all zero (masked)
    are validated but left out of the sum.
    """
    if not isinstance(public_ctx, ts.Context):
        raise CryptoError("weighted_sum needs a TenSEAL context")
    if public_ctx.is_private() or public_ctx.has_secret_key():
        raise CryptoError(
            "weighted_sum was handed a private CKKS context: the server must hold only the "
            "public context (use public_copy / the server kit's ckks_public.bin)"
        )
    if len(ciphertexts) == 0:
        raise ProtocolError("weighted_sum got no ciphertexts")
    if len(weights) != len(ciphertexts):
        raise ProtocolError(
            f"weighted_sum got {len(ciphertexts)} ciphertexts but {len(weights)} weight vectors"
        )
    slots = slot_count(public_ctx)
    ws = [_vector(w, f"weights[{k}]", slots) for k, w in enumerate(weights)]
    n = ws[0].size
    for k, w in enumerate(ws):
        if w.size != n:
            raise ProtocolError(f"weights[{k}] has length {w.size}, expected {n}")
    b = None if bias is None else _vector(bias, "bias", slots)
    if b is not None and b.size != n:
        raise ProtocolError(f"bias has length {b.size}, expected {n}")

    acc = None
    for k, (data, w) in enumerate(zip(ciphertexts, ws)):
        vec = _load_vector(public_ctx, data, n, f"client {k}")
        if not np.any(w):
            continue
        try:
            term = vec * w.tolist()
            acc = term if acc is None else acc + term
        except (ValueError, RuntimeError, TypeError) as err:
            raise ProtocolError(f"client {k}: ciphertext cannot be aggregated ({err})") from err
    if acc is None:  # every client masked: an encryption of zeros (+ bias)
        acc = ts.ckks_vector(public_ctx, [0.0] * n)
    if b is not None:
        acc = acc + b.tolist()
    return acc.serialize()


def decrypt_aggregate(secret_ctx: ts.Context, data: bytes, length: int) -> np.ndarray:
    """Decryptor client: decrypt the aggregate ciphertext to a float64 vector of ``length``.

    The decryptor should only ever be handed the output of :func:`weighted_sum`; it cannot
    tell an aggregate from a single client's ciphertext (see the module's known limits).
    """
    if not isinstance(secret_ctx, ts.Context) or not secret_ctx.is_private():
        raise CryptoError("decrypt_aggregate needs the private CKKS context (client kit)")
    if not isinstance(length, (int, np.integer)) or not 1 <= int(length) <= slot_count(secret_ctx):
        raise ProtocolError(f"aggregate length {length!r} is not in 1..{slot_count(secret_ctx)}")
    vec = _load_vector(secret_ctx, data, int(length), "aggregate")
    try:
        out = np.asarray(vec.decrypt(), dtype=np.float64)
    except (ValueError, RuntimeError) as err:
        raise CryptoError(f"aggregate failed to decrypt ({err})") from err
    return out


def context_census() -> dict[str, int]:
    """Count the TenSEAL contexts alive in this process: ``{"private": n, "public": m}``.

    An audit for the server process (DESIGN.md §4: the server never holds the secret key):
    it walks the garbage collector's objects, so it sees every ``ts.Context`` any module keeps.
    """
    import gc

    counts = {"private": 0, "public": 0}
    for obj in gc.get_objects():
        if isinstance(obj, ts.Context):
            counts["private" if obj.is_private() or obj.has_secret_key() else "public"] += 1
    return counts
