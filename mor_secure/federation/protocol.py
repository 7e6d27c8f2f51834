"""The MoR wire protocol over Flower's Message API: what each message carries, and its checks.

Server -> client
  ``train``        phase 1: train your reward model (content: run id only).
  ``query.score``  phases 2-3 and evaluation: score these responses. Content: the public
                   prompts' images (uint8, (M, H, W, 3)), their questions (M), the responses (N)
                   and, for each response, the index of its prompt (``cfg.image_index``, N
                   integers). Nothing private. The images travel as ``cfg.images`` (their bytes)
                   with ``cfg.images_shape`` when they take at most ``INLINE_IMAGE_BYTES``, else
                   as the uint8 Array ``data.images``; a request carries exactly one of the two.
  ``query.decrypt`` CKKS only: decrypt this aggregate of ``cfg.length`` slots (``data.ciphertext``).
Client -> server
  ``train`` reply  the client's name, its RM's model class and its declared clip bound.
  ``query.score``  reply: the clipped, noised scores (``out.scores``, N float32 values as a list of
                   floats) -- or, with CKKS on
                   (``cfg.encrypt``), one packed CKKS ciphertext of them (``out.ciphertext``,
                   its bytes as a uint8 array) and no plaintext -- recorded in the client's
                   ledger before sending.
  ``query.decrypt`` reply (decryptor client only): the decrypted router-weighted aggregate
                   (float64, (N,)). The request carries the aggregate ciphertext the server
                   formed with its public context, never one client's ciphertext by design.
  Error replies    ``Message(Error(code, reason))``; codes below. A refused client leaves the
                   mixture for that request and the router renormalises.

Every decoder checks shapes, types, lengths and finiteness and raises ``ProtocolError``
naming the field: a malformed message never reaches a model or an accountant.

Small values travel in ConfigRecords, large ones as Arrays. Flower's deployment runtime moves a
message as one object per record, array and array chunk, each one HTTP call on every hop
(ServerApp -> SuperLink -> SuperNode -> executor, and back). A score vector or an index list as
an Array costs three objects (ArrayRecord, Array, chunk) where a ConfigRecord entry costs none
of its own. Keeping the scores, the image index and small images in ConfigRecords took the
SuperNode's pull of a request from 0.23 and 0.43 s (two runs) to 0.15 s (one run), and a whole
reward round trip from 1.31 and 1.77 s to 1.25 s (medians of 12 round trips, the executor
deployment on 2 shared CPUs; runs vary by some 0.4 s; ``bench perf`` (b) traces every run hop
by hop). Large images stay an Array: Flower serialises bytes inside a ConfigRecord about 8x
slower per byte (measured: 180 ms against 21 ms for 5.4 MB, 1.4 ms against 0.8 ms for 48 KB).
At 1 MiB that is about 30 ms more per message, against three objects fewer, each one call on
each hop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from PIL import Image

from mor_secure.errors import ProtocolError

# Error codes (Flower reserves small codes; ours start at 4000).
ERR_BUDGET_REFUSED = 4001
ERR_BAD_REQUEST = 4002
ERR_NOT_READY = 4003
ERR_INTERNAL = 4004

MAX_ITEMS = 65536
#: Images up to this many bytes travel inside the request's ConfigRecord (``cfg.images``), larger
#: ones as an Array (``data.images``): below it the three objects an Array adds cost more than
#: the slower serialisation of bytes in a ConfigRecord (see the module docstring).
INLINE_IMAGE_BYTES = 1 << 20


@dataclass(frozen=True)
class ScoreRequest:
    images: np.ndarray  # (M, H, W, 3) uint8
    questions: list[str]  # (M,)
    responses: list[str]  # (N,)
    image_index: np.ndarray  # (N,) int64 into images
    run_id: str
    phase: str
    purpose: str
    encrypt: bool = False

    def pil_images(self) -> list[Image.Image]:
        """One PIL image per response (the prompt's image)."""
        pils = [Image.fromarray(img) for img in self.images]
        return [pils[i] for i in self.image_index]

    def questions_per_response(self) -> list[str]:
        return [self.questions[i] for i in self.image_index]


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


def encode_score_request(req: ScoreRequest) -> RecordDict:
    if req.images.dtype != np.uint8 or req.images.ndim != 4:
        raise ProtocolError(f"images must be uint8 of shape (M, H, W, 3); found {req.images.dtype} {req.images.shape}")
    cfg = {"questions": list(req.questions), "responses": list(req.responses),
           "image_index": [int(i) for i in req.image_index],
           "run_id": req.run_id, "phase": req.phase, "purpose": req.purpose, "encrypt": req.encrypt}
    images = np.ascontiguousarray(req.images, dtype=np.uint8)
    if images.nbytes <= INLINE_IMAGE_BYTES:
        return RecordDict({"cfg": ConfigRecord({**cfg, "images": images.tobytes(),
                                                "images_shape": [int(d) for d in images.shape]})})
    return RecordDict({"data": ArrayRecord({"images": Array(images)}), "cfg": ConfigRecord(cfg)})


def _request_images(content: RecordDict) -> np.ndarray:
    """The request's images, from ``cfg.images`` (+ ``cfg.images_shape``) or ``data.images``."""
    cfg, data = content.get("cfg"), content.get("data")
    inline = isinstance(cfg, ConfigRecord) and "images" in cfg
    if inline and data is not None and "images" in data:
        raise ProtocolError("the request carries both cfg.images and data.images; send exactly one")
    if not inline:
        return _array(content, "data", "images")
    raw, shape = cfg["images"], _field(content, "cfg", "images_shape")
    if not isinstance(raw, bytes):
        raise ProtocolError(f"cfg.images must be bytes; found {type(raw).__name__}")
    if (not isinstance(shape, list) or len(shape) != 4 or shape[3] != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise ProtocolError(f"cfg.images_shape must be 4 integers >= 1, the last 3 (M, H, W, 3); found {shape!r}")
    if math.prod(shape) != len(raw):  # with every dimension >= 1 this bounds each by the bytes sent
        raise ProtocolError(f"cfg.images holds {len(raw)} bytes, not the {math.prod(shape)} of shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _field(content: RecordDict, record: str, key: str):
    try:
        return content[record][key]
    except KeyError:
        raise ProtocolError(f"message is missing {record}.{key}") from None


def _array(content: RecordDict, record: str, key: str) -> np.ndarray:
    """``record.key`` as a numpy array; ProtocolError if it is not an Array or its bytes are not one
    (wrong serialisation type, a header that does not match, an object array, truncated data)."""
    arr = _field(content, record, key)
    if not isinstance(arr, Array):
        raise ProtocolError(f"{record}.{key} must be an array; found {type(arr).__name__}")
    try:
        return arr.numpy()
    except Exception as exc:  # noqa: BLE001 - whatever numpy makes of foreign bytes, the message is refused
        raise ProtocolError(f"{record}.{key} is not a decodable array: {type(exc).__name__}: {exc}") from None


def _str_list(value, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{name} must be a list of strings")
    if len(value) > MAX_ITEMS:
        raise ProtocolError(f"{name} has {len(value)} items; at most {MAX_ITEMS} per message")
    return value


def decode_score_request(content: RecordDict) -> ScoreRequest:
    images = _request_images(content)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 1:
        raise ProtocolError(f"the request's images (cfg.images or data.images) must be uint8 of shape (M, H, W, 3), "
                            f"H, W >= 1; found {images.dtype} {images.shape}")
    questions = _str_list(_field(content, "cfg", "questions"), "cfg.questions")
    responses = _str_list(_field(content, "cfg", "responses"), "cfg.responses")
    if not responses:
        raise ProtocolError("cfg.responses is empty")
    if len(questions) != len(images):
        raise ProtocolError(f"cfg.questions has {len(questions)} items for {len(images)} images")
    raw = _field(content, "cfg", "image_index")
    if (not isinstance(raw, list) or len(raw) != len(responses)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw)):
        raise ProtocolError(f"cfg.image_index must be a list of integers, one per response ({len(responses)})")
    if not all(0 <= i < len(images) for i in raw):  # in Python: a uint64 on the wire may not fit an int64
        raise ProtocolError(f"cfg.image_index out of range [0, {len(images)})")
    index = np.asarray(raw, dtype=np.int64)
    meta = {k: _field(content, "cfg", k) for k in ("run_id", "phase", "purpose")}
    for key, value in meta.items():
        if not isinstance(value, str) or not value:
            raise ProtocolError(f"cfg.{key} must be a non-empty string")
    encrypt = content["cfg"].get("encrypt", False)
    if not isinstance(encrypt, bool):
        raise ProtocolError("cfg.encrypt must be a boolean")
    return ScoreRequest(images, questions, responses, index.astype(np.int64), encrypt=encrypt, **meta)


def encode_scores(client: str, scores: np.ndarray) -> RecordDict:
    """A plaintext score reply: the float32 scores as a list of floats (exactly representable) and
    the client's name, in one ConfigRecord: in deployment every record is one more object each
    reply is pushed and pulled as (two more requests to the SuperLink per client and step)."""
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ProtocolError(f"scores must be 1-D; found shape {scores.shape}")
    return RecordDict({"out": ConfigRecord({"scores": [float(x) for x in scores.astype(np.float32)],
                                            "client": client})})


def score_limit(clip_bound: float, noise_std: float) -> float:
    """Largest plausible |score|: the clip bound plus 8 noise standard deviations (p < 1e-15)."""
    return clip_bound + 8.0 * noise_std


def decode_scores(content: RecordDict, *, expected: int, limit: float) -> np.ndarray:
    """A client's plaintext scores, checked: finite, the expected length, within +-limit."""
    raw = _field(content, "out", "scores")
    if not isinstance(raw, list) or not all(isinstance(v, float) for v in raw):
        raise ProtocolError(f"out.scores must be a list of floats; found {type(raw).__name__}"
                            + (f" of {sorted({type(v).__name__ for v in raw})}" if isinstance(raw, list) else ""))
    scores = np.asarray(raw, dtype=np.float64)
    if len(scores) != expected:
        raise ProtocolError(f"out.scores has {len(scores)} values; expected {expected}")
    if not np.all(np.isfinite(scores)):
        raise ProtocolError("out.scores contains NaN or infinite values")
    if np.abs(scores).max() > limit:
        raise ProtocolError(f"out.scores has |value| {np.abs(scores).max():.3g} above the declared range {limit:.3g}")
    return scores


def client_name(content: RecordDict) -> str:
    """The replying client's name: ``meta.client``, or ``out.client`` in a plaintext score reply."""
    record = "out" if "meta" not in content and isinstance(content.get("out"), ConfigRecord) else "meta"
    name = _field(content, record, "client")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{record}.client must be a non-empty string")
    return name


def encode_hello(client: str, model_class: str, clip_bound: float, noise_std: float, dp_sgd: bool) -> RecordDict:
    return RecordDict({"meta": ConfigRecord({
        "client": client, "model_class": model_class, "clip_bound": float(clip_bound),
        "noise_std": float(noise_std), "dp_sgd": bool(dp_sgd)})})


@dataclass(frozen=True)
class Hello:
    client: str
    model_class: str
    clip_bound: float
    noise_std: float
    dp_sgd: bool


def decode_hello(content: RecordDict) -> Hello:
    name = client_name(content)
    model_class = _field(content, "meta", "model_class")
    clip = _field(content, "meta", "clip_bound")
    noise = _field(content, "meta", "noise_std")
    dp = _field(content, "meta", "dp_sgd")
    if not isinstance(model_class, str):
        raise ProtocolError("meta.model_class must be a string")
    if not isinstance(clip, float) or not math.isfinite(clip) or clip <= 0:
        raise ProtocolError(f"meta.clip_bound must be a positive finite float; found {clip!r}")
    if not isinstance(noise, float) or not math.isfinite(noise) or noise < 0:
        raise ProtocolError(f"meta.noise_std must be a finite float >= 0; found {noise!r}")
    return Hello(name, model_class, clip, noise, bool(dp))


def error_reply(msg: Message, code: int, reason: str) -> Message:
    from flwr.app import Error

    return Message(Error(code=code, reason=reason), reply_to=msg)


# -- CKKS (DESIGN.md §4) --------------------------------------------------------------------------
def _bytes_array(data: bytes) -> Array:
    """Ciphertext bytes as a uint8 Array: Flower moves Arrays in chunks ~10x faster than bytes
    inside a ConfigRecord (measured: 1.6 vs 20 ms per 330 KB message)."""
    return Array(np.frombuffer(bytes(data), dtype=np.uint8))


def _array_bytes(content: RecordDict, record: str, key: str, max_bytes: int) -> bytes:
    arr = _field(content, record, key)
    if not isinstance(arr, Array):
        raise ProtocolError(f"{record}.{key} must be an array of bytes")
    if arr.dtype != "uint8":
        raise ProtocolError(f"{record}.{key} must be uint8; found {arr.dtype}")
    if len(arr.shape) != 1 or not 0 < arr.shape[0] <= max_bytes:
        raise ProtocolError(f"{record}.{key} must hold 1..{max_bytes} bytes; found shape {arr.shape}")
    data = _array(content, record, key)  # the header above is the sender's claim; check the bytes too
    if data.dtype != np.uint8 or data.shape != tuple(arr.shape):
        raise ProtocolError(f"{record}.{key} must hold uint8 bytes as declared; found {data.dtype} {data.shape}")
    return data.tobytes()


def encode_encrypted_scores(client: str, ciphertext: bytes) -> RecordDict:
    """The reply to an encrypted ``query.score``: one ciphertext, no plaintext scores."""
    return RecordDict({"out": ArrayRecord({"ciphertext": _bytes_array(ciphertext)}),
                       "meta": ConfigRecord({"client": client})})


def decode_encrypted_scores(content: RecordDict, *, max_bytes: int) -> bytes:
    """The ciphertext of an encrypted score reply. Refuses a reply that carries plaintext scores
    (fail closed: with CKKS on, a client's scores must never reach the server in the clear)."""
    out = content.get("out")
    if out is None:
        raise ProtocolError("message is missing out.ciphertext")
    if "scores" in out:
        raise ProtocolError("out.scores is plaintext but CKKS was requested; the reply is discarded unread")
    return _array_bytes(content, "out", "ciphertext", max_bytes)


def encode_decrypt_request(run_id: str, phase: str, ciphertext: bytes, length: int) -> RecordDict:
    return RecordDict({"data": ArrayRecord({"ciphertext": _bytes_array(ciphertext)}),
                       "cfg": ConfigRecord({"run_id": run_id, "phase": phase, "length": int(length)})})


@dataclass(frozen=True)
class DecryptRequest:
    run_id: str
    phase: str
    ciphertext: bytes
    length: int


def decode_decrypt_request(content: RecordDict, *, max_bytes: int = 16 * 2**20) -> DecryptRequest:
    run_id, phase, length = (_field(content, "cfg", k) for k in ("run_id", "phase", "length"))
    for key, value in (("run_id", run_id), ("phase", phase)):
        if not isinstance(value, str) or not value:
            raise ProtocolError(f"cfg.{key} must be a non-empty string")
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_ITEMS:
        raise ProtocolError(f"cfg.length must be an integer in 1..{MAX_ITEMS}; found {length!r}")
    return DecryptRequest(run_id, phase, _array_bytes(content, "data", "ciphertext", max_bytes), length)


def encode_aggregate(client: str, values: np.ndarray) -> RecordDict:
    return RecordDict({"out": ArrayRecord({"aggregate": Array(np.asarray(values, dtype=np.float64))}),
                       "meta": ConfigRecord({"client": client})})


def decode_aggregate(content: RecordDict, *, expected: int, limit: np.ndarray) -> np.ndarray:
    """The decryptor's plaintext aggregate, checked: finite, length ``expected``, and
    ``|value_i| <= limit_i`` (the largest |Σ_k w_ik s_ik| the declared score ranges allow)."""
    values = _array(content, "out", "aggregate")
    if values.ndim != 1 or values.dtype.kind != "f" or len(values) != expected:
        raise ProtocolError(f"out.aggregate must be a 1-D float array of {expected}; found {values.dtype} {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ProtocolError("out.aggregate contains NaN or infinite values")
    if np.any(np.abs(values) > limit):
        raise ProtocolError("out.aggregate is outside the range the declared score bounds allow")
    return values.astype(np.float64)
