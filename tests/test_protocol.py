"""The wire protocol: malformed requests and replies are refused with a message naming the field."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from helpers.hardening import record
from hypothesis import given, settings
from hypothesis import strategies as st

from mor_secure.errors import ProtocolError
from mor_secure.federation import protocol as P


def request(n_images=2, responses=("red", "blue", "green")):
    return P.ScoreRequest(np.zeros((n_images, 8, 8, 3), np.uint8), ["q"] * n_images, list(responses),
                          np.arange(len(responses)) % n_images, run_id="r", phase="grpo", purpose="t")


def test_score_request_roundtrip():
    req = request()
    back = P.decode_score_request(P.encode_score_request(req))
    assert back.responses == req.responses and np.array_equal(back.image_index, req.image_index)
    assert len(back.pil_images()) == 3 and back.questions_per_response() == ["q", "q", "q"]


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c["cfg"].__setitem__("images_shape", [2, 8, 8]), "cfg.images_shape"),
    (lambda c: c["cfg"].__setitem__("images_shape", [2, 8, 16, 3]), "not the 768 of shape"),
    (lambda c: c["cfg"].__setitem__("images_shape", [2, 8, 8, 4]), "the last 3"),
    (lambda c: [c["cfg"].__delitem__("images"), c["cfg"].__delitem__("images_shape"),
                c.__setitem__("data", ArrayRecord({"images": Array(np.zeros((2, 8, 8), np.uint8))}))],
     "must be uint8 of shape"),  # the Array form: (M, H, W, 3) only
    (lambda c: c["cfg"].__setitem__("images", "x"), "cfg.images must be bytes"),
    # hostile shapes: a zero dimension with no bytes, values past int64, bools and negatives are refused
    (lambda c: c["cfg"].update(images=b"", images_shape=[0, 2**40, 2**40, 3]), "cfg.images_shape"),
    (lambda c: c["cfg"].update(images=b"", images_shape=[0, 2**63, 1, 3]), "cfg.images_shape"),
    (lambda c: c["cfg"].__setitem__("images_shape", [2**63, 2**63, 2**63, 3]), "not the"),
    (lambda c: c["cfg"].__setitem__("images_shape", [True, True, True, True]), "cfg.images_shape"),
    (lambda c: c["cfg"].__setitem__("images_shape", [-2, -8, 8, 3]), "cfg.images_shape"),
    (lambda c: c["cfg"].__setitem__("image_index", [0, 2**63, 1]), "out of range"),
    (lambda c: c["cfg"].__setitem__("image_index", [0, 2**64 - 1, 1]), "out of range"),
    (lambda c: c.__setitem__("data", ArrayRecord({"images": Array(np.zeros((2, 8, 8, 3), np.uint8))})), "both"),
    (lambda c: [c["cfg"].__delitem__("images"), c["cfg"].__delitem__("images_shape")], "data.images"),
    (lambda c: c["cfg"].__setitem__("image_index", [0, 5, 1]), "out of range"),
    (lambda c: c["cfg"].__setitem__("image_index", [0, 1]), "one per response"),
    (lambda c: c["cfg"].__setitem__("image_index", [0.0, 1.0, 0.0]), "cfg.image_index must be a list of integers"),
    (lambda c: c["cfg"].__delitem__("image_index"), "cfg.image_index"),
    (lambda c: c["cfg"].__setitem__("questions", ["q"]), "cfg.questions"),
    (lambda c: c["cfg"].__setitem__("responses", []), "responses"),
    (lambda c: c["cfg"].__setitem__("phase", ""), "cfg.phase"),
    (lambda c: c["cfg"].__delitem__("run_id"), "cfg.run_id"),
])
def test_malformed_requests_are_refused(mutate, fragment):
    content = P.encode_score_request(request())
    mutate(content)
    with pytest.raises(ProtocolError, match=fragment.replace(".", r"\.")):
        P.decode_score_request(content)
    record("tests/test_protocol.py::test_malformed_requests_are_refused", inputs=1, bad_inputs=1)


@pytest.mark.parametrize("scores,fragment", [
    (np.array([1.0, np.nan, 0.0]), "NaN"),
    (np.array([1.0, np.inf, 0.0]), "NaN or infinite"),
    (np.array([1.0, 2.0]), "expected 3"),
    (np.array([1.0, 99.0, 0.0]), "declared range"),
    ([1, 2, 3], "list of floats; found list of \\['int'\\]"),
    ("1.0", "list of floats; found str"),
    (np.array([1.0, 2.0, 3.0]), "list of floats; found Array"),  # the array form is not read
])
def test_bad_scores_are_rejected(scores, fragment):
    out = ArrayRecord({"scores": Array(scores)}) if isinstance(scores, np.ndarray) and fragment.endswith("Array") \
        else ConfigRecord({"scores": [float(v) for v in scores] if isinstance(scores, np.ndarray) else scores})
    content = RecordDict({"out": out, "meta": ConfigRecord({"client": "a"})})
    with pytest.raises(ProtocolError, match=fragment):
        P.decode_scores(content, expected=3, limit=P.score_limit(5.0, 0.1))
    record("tests/test_protocol.py::test_bad_scores_are_rejected", inputs=1, bad_inputs=1)


def test_scores_travel_as_float32_values_in_a_config_record():
    scores = np.array([0.1, -2.5, 1 / 3])
    content = P.encode_scores("a", scores)
    assert list(content.keys()) == ["out"] and isinstance(content["out"], ConfigRecord)  # one record: fewest objects
    assert P.client_name(content) == "a"
    assert P.client_name(RecordDict({"out": ConfigRecord({"scores": [0.1]}), "meta": ConfigRecord({"client": "b"})})) == "b"
    back = P.decode_scores(content, expected=3, limit=5.0)
    assert back.dtype == np.float64 and np.array_equal(back, scores.astype(np.float32).astype(np.float64))
    small = P.encode_score_request(request())
    assert list(small.keys()) == ["cfg"] and isinstance(small["cfg"]["images"], bytes)  # 384 bytes inline
    big = P.ScoreRequest(np.random.default_rng(0).integers(0, 256, (3, 400, 400, 3), dtype=np.uint8), ["q"] * 3,
                         ["a", "b"], np.array([2, 0]), run_id="r", phase="grpo", purpose="t")
    wire = P.encode_score_request(big)  # 1.4 MB: an Array, which Flower serialises faster
    assert list(wire["data"].keys()) == ["images"] and "images" not in wire["cfg"]
    back = P.decode_score_request(wire)
    assert np.array_equal(back.images, big.images) and back.image_index.tolist() == [2, 0]


def test_hello_checks_declared_bounds():
    ok = P.decode_hello(P.encode_hello("a", "LlavaForConditionalGeneration", 5.0, 0.1, True))
    assert ok.clip_bound == 5.0 and ok.dp_sgd
    with pytest.raises(ProtocolError, match="clip_bound"):
        P.decode_hello(P.encode_hello("a", "X", float("inf"), 0.1, True))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["questions", "responses", "run_id", "phase", "purpose", "encrypt", "x"]),
                       st.one_of(st.text(max_size=5), st.integers(), st.booleans(),
                                 st.lists(st.text(max_size=3), max_size=4)), max_size=7),
       st.integers(0, 3), st.integers(0, 3))
def test_fuzzed_requests_never_crash_unexpectedly(cfg, n_images, n_index):
    content = RecordDict({
        "data": ArrayRecord({"images": Array(np.zeros((n_images, 4, 4, 3), np.uint8))}),
        "cfg": ConfigRecord({**cfg, "image_index": [0] * n_index} if n_index else cfg),
    })
    if n_images % 2:  # the inline form
        del content["data"]
        content["cfg"]["images"], content["cfg"]["images_shape"] = bytes(n_images * 48), [n_images, 4, 4, 3]
    try:
        req = P.decode_score_request(content)
    except ProtocolError:
        record("tests/test_protocol.py::test_fuzzed_requests_never_crash_unexpectedly", inputs=1, bad_inputs=1)
        return
    assert len(req.responses) == len(req.image_index) > 0 and len(req.questions) == len(req.images)
    record("tests/test_protocol.py::test_fuzzed_requests_never_crash_unexpectedly", inputs=1)


# -- replies and decrypt requests: any content decodes to checked values or raises ProtocolError ----------

def _np_array(dtype, shape, fill):
    with np.errstate(all="ignore"):  # NaN or 1e30 cast to an integer dtype: any value will do
        return np.full(shape, fill).astype(dtype) if np.issubdtype(np.dtype(dtype), np.number) else np.zeros(shape, dtype)


arrays = st.one_of(
    # well-formed arrays of any dtype and shape, values at the edges
    st.builds(lambda dtype, shape, fill: Array(_np_array(dtype, shape, fill)),
              st.sampled_from(["float32", "float64", "float16", "int64", "uint8", "bool", "complex64"]),
              st.lists(st.integers(0, 4), max_size=3).map(tuple),
              st.sampled_from([0.0, 1.0, -3.0, 1e30, float("nan"), float("inf")])),
    # arrays whose header does not match their bytes, or whose bytes are not an array at all
    st.builds(lambda dtype, shape, stype, data: Array(dtype=dtype, shape=shape, stype=stype, data=data),
              st.sampled_from(["float32", "float64", "uint8", "object", "x"]),
              st.lists(st.integers(0, 8), max_size=2).map(tuple),
              st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]), st.binary(max_size=64)),
    # a valid .npy of another array under a misleading header
    st.builds(lambda n: Array(dtype="float32", shape=(3,), stype="numpy.ndarray",
                              data=Array(np.arange(n, dtype=np.int8)).data), st.integers(0, 5)),
)
config_values = st.one_of(st.text(max_size=5), st.integers(-5, 2**40), st.floats(), st.booleans(), st.binary(max_size=8),
                          st.lists(st.floats(), max_size=3), st.lists(st.text(max_size=3), max_size=3),
                          st.lists(st.integers(-2, 5), max_size=4), st.lists(st.integers(0, 4), min_size=4, max_size=4),
                          st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=4))  # uint64 on the wire
KEYS = ["scores", "ciphertext", "aggregate", "client", "model_class", "clip_bound", "noise_std", "dp_sgd", "run_id",
        "phase", "length", "images", "images_shape", "image_index", "x"]
records = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), arrays, max_size=3).map(ArrayRecord),
    st.dictionaries(st.sampled_from(KEYS), config_values, max_size=4).map(ConfigRecord),
)
random_contents = st.dictionaries(st.sampled_from(["out", "meta", "data", "cfg"]), records, max_size=4).map(RecordDict)


def _valid(kind: str, n: int, value: float) -> RecordDict:
    """A well-formed message of each kind the decoders below read."""
    return {
        "scores": lambda: P.encode_scores("a", np.full(n, value)),
        "hello": lambda: P.encode_hello("a", "LlavaForConditionalGeneration", 5.0, 0.1, True),
        "encrypted": lambda: P.encode_encrypted_scores("a", b"\x07" * n),
        "aggregate": lambda: P.encode_aggregate("a", np.full(n, value)),
        "decrypt_request": lambda: P.encode_decrypt_request("r", "grpo", b"\x07" * n, n),
        "score_request": lambda: P.encode_score_request(request(responses=["x"] * n)),
    }[kind]()


@st.composite
def mutated_cases(draw):
    """(content, n, decoder): a valid message of the decoder's kind with one entry replaced by
    anything, or deleted, or left alone."""
    kind, n = draw(st.sampled_from(["scores", "hello", "encrypted", "aggregate", "decrypt_request", "score_request"])), \
        draw(st.integers(1, 4))
    content = _valid(kind, n, draw(st.sampled_from([0.0, 1.5, -5.0, 5.7, 1e9, float("nan")])))
    name = draw(st.sampled_from(sorted(content)))
    rec = content[name]
    key = draw(st.sampled_from(sorted(rec)))
    action = draw(st.sampled_from(["keep", "delete", "array", "value"]))
    if action == "delete":
        del rec[key]
    elif action == "array" and isinstance(rec, ArrayRecord):
        rec[key] = draw(arrays)
    elif action == "value" and isinstance(rec, ConfigRecord):
        rec[key] = draw(config_values)
    return content, n, kind


cases = st.one_of(st.tuples(random_contents, st.integers(1, 4), st.sampled_from(
    ["scores", "hello", "client", "encrypted", "aggregate", "decrypt_request", "score_request"])), mutated_cases())


def _decoders(n: int):
    limit = P.score_limit(5.0, 0.1)
    return {
        "scores": lambda c: P.decode_scores(c, expected=n, limit=limit),
        "hello": P.decode_hello,
        "client": P.client_name,
        "encrypted": lambda c: P.decode_encrypted_scores(c, max_bytes=64),
        "aggregate": lambda c: P.decode_aggregate(c, expected=n, limit=np.full(n, limit)),
        "decrypt_request": lambda c: P.decode_decrypt_request(c, max_bytes=64),
        "score_request": P.decode_score_request,
    }


@settings(max_examples=400, deadline=None)
@given(cases)
def test_fuzzed_replies_and_requests_decode_or_raise_protocol_error(case):
    """A client (or server) can put anything in a message: records of either kind under any name,
    arrays of any dtype and shape, NaN/inf, bytes that are no array at all; or a valid message with
    one entry changed. Every decoder returns a checked value or raises ProtocolError; nothing else
    reaches the caller."""
    content, n, decoder = case
    try:
        out = _decoders(n)[decoder](content)
    except ProtocolError as exc:
        assert str(exc)
        record("tests/test_protocol.py::test_fuzzed_replies_and_requests_decode_or_raise_protocol_error",
               inputs=1, bad_inputs=1)
        return
    if decoder in ("scores", "aggregate"):
        assert out.shape == (n,) and np.all(np.isfinite(out)) and np.abs(out).max() <= P.score_limit(5.0, 0.1)
    elif decoder == "hello":
        assert out.clip_bound > 0 and np.isfinite(out.clip_bound) and out.noise_std >= 0 and out.client
    elif decoder in ("encrypted",):
        assert isinstance(out, bytes) and 0 < len(out) <= 64
    elif decoder == "decrypt_request":
        assert 0 < len(out.ciphertext) <= 64 and 1 <= out.length <= P.MAX_ITEMS
    elif decoder == "score_request":
        assert len(out.responses) == len(out.image_index) > 0 and out.images.dtype == np.uint8
        assert 0 <= out.image_index.min() and out.image_index.max() < len(out.images) == len(out.questions)
    record("tests/test_protocol.py::test_fuzzed_replies_and_requests_decode_or_raise_protocol_error", inputs=1)
