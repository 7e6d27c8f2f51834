"""The wire protocol: malformed requests and replies are refused with a message naming the field."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
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
    (lambda c: c["data"].__setitem__("images", Array(np.zeros((2, 8, 8), np.uint8))), "data.images"),
    (lambda c: c["data"].__setitem__("image_index", Array(np.array([0, 5, 1]))), "out of range"),
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


@pytest.mark.parametrize("scores,fragment", [
    (np.array([1.0, np.nan, 0.0]), "NaN"),
    (np.array([1.0, np.inf, 0.0]), "NaN or infinite"),
    (np.array([1.0, 2.0]), "expected 3"),
    (np.array([1.0, 99.0, 0.0]), "declared range"),
    (np.array([[1.0, 2.0, 3.0]]), "1-D"),
])
def test_bad_scores_are_rejected(scores, fragment):
    content = RecordDict({"out": ArrayRecord({"scores": Array(scores)}), "meta": ConfigRecord({"client": "a"})})
    with pytest.raises(ProtocolError, match=fragment):
        P.decode_scores(content, expected=3, limit=P.score_limit(5.0, 0.1))


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
        "data": ArrayRecord({"images": Array(np.zeros((n_images, 4, 4, 3), np.uint8)),
                             "image_index": Array(np.zeros(n_index, np.int64))}),
        "cfg": ConfigRecord(cfg),
    })
    try:
        req = P.decode_score_request(content)
    except ProtocolError:
        return
    assert len(req.responses) == len(req.image_index) > 0 and len(req.questions) == len(req.images)
