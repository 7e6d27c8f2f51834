"""CKKS aggregation through the real reward channel and ClientApp (in-process transport).

Real ClientNodes (tiny DP-SGD reward models), real kits, real TenSEAL ciphertexts; the only
stand-in is the transport (``InProcessGrid``: Flower messages deflated and re-inflated, no
network), which the deployment tests replace with real SuperLink/SuperNode processes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, Message
from flwr.clientapp import ClientApp
from helpers.hardening import record

from mor_secure.config import parse_config
from mor_secure.crypto import ckks
from mor_secure.crypto.provision import load_server_kit, provision
from mor_secure.data import load_split
from mor_secure.deploy.client_init import init_client_folder
from mor_secure.deploy.inproc import InProcessGrid
from mor_secure.errors import CryptoError, ProtocolError
from mor_secure.federation import protocol as P
from mor_secure.federation.channel import Channel
from mor_secure.federation.client_app import make_client_app
from mor_secure.federation.client_node import ClientNode

NAMES = ["alpha", "beta", "gamma"]


def tiny_config(noise_std: float = 0.0):
    raw = yaml.safe_load(Path("configs/smoke.yaml").read_text())
    raw["data"]["pairs_per_client"] = 16
    for c in raw["clients"]:
        c["training"] = {"epochs": 1, "batch_size": 16, "lr": 0.5, "lora_r": 2}
        c["scores"] = {"clip_bound": 5.0, "noise_std": noise_std}  # DP-SGD route: noise-free releases are free
    raw["federation"] = {"encryption": "ckks"}
    return parse_config(raw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Kits, three trained client folders, and the inputs of one scoring request."""
    root = tmp_path_factory.mktemp("ckks_channel")
    cfg = tiny_config()
    kits = provision(root / "kits", NAMES)
    for name in NAMES:
        folder = init_client_folder(cfg, name, root / "clients" / name, kits.client_dirs[name])
        ClientNode(folder).train("setup", progress=False)
    pairs = list(load_split(root / "clients" / "alpha" / "data"))[:3]
    images = [p["image"] for p in pairs]
    questions = [p["question"] for p in pairs]
    responses = ["red", "blue", "three", "left", "circle", "", "green", "two"]
    index = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    return root, kits, (images, questions, responses, index)


def make_channel(root: Path, kits, tmp_path: Path, app: ClientApp | None = None, *, without_kit: str = ""):
    configs = {}
    for i, name in enumerate(NAMES):
        conf = {"client-dir": str(root / "clients" / name)}
        if name != without_kit:
            conf["kit-dir"] = str(kits.client_dirs[name])
        configs[100 + i] = conf
    grid = InProcessGrid(app or make_client_app(), configs, keep_replies=True)
    channel = Channel(grid, "run-test", tmp_path / "events.jsonl", timeout_s=60)
    channel.train_all(timeout_s=60)
    assert sorted(channel.clients) == NAMES
    channel.use_ckks(load_server_kit(kits.server_dir).ckks_context)
    return channel, grid


def router_weights(n: int, k: int, seed: int = 0):
    logits = np.random.default_rng(seed).normal(size=(n, k))

    def weights(present: np.ndarray) -> np.ndarray:
        masked = np.where(present, logits, -np.inf)
        w = np.exp(masked - masked.max(axis=1, keepdims=True))
        return 1.7 * w / w.sum(axis=1, keepdims=True)  # router weight x a calibration scale

    return weights


def events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_encrypted_mixture_equals_plaintext_mixture_and_server_sees_no_scores(world, tmp_path):
    root, kits, (images, questions, responses, index) = world
    channel, grid = make_channel(root, kits, tmp_path)
    weights = router_weights(len(responses), 3)
    plain, present_plain = channel.score(images, questions, responses, index, phase="grpo", purpose="reference")
    grid.received.clear()
    reward, present = channel.mixture(images, questions, responses, index, weights, phase="grpo", purpose="test")
    assert present.all() and present_plain.all()
    want = (weights(present_plain) * plain).sum(axis=1)
    np.testing.assert_allclose(reward, want, atol=1e-4, rtol=0)

    # every message the server received while mixing: ciphertexts, and one decrypted aggregate
    types = [m.metadata.message_type for m in grid.received]
    assert types.count("query.score") == 3 and types.count("query.decrypt") == 1
    for msg in grid.received:
        arrays = {key: arr.numpy() for rec in msg.content.array_records.values() for key, arr in rec.items()}
        if msg.metadata.message_type == "query.score":
            assert set(arrays) == {"ciphertext"}, "an encrypted score reply carried another array"
            assert arrays["ciphertext"].dtype == np.uint8 and msg.content.config_records["meta"]["client"]
        else:
            (aggregate,) = arrays.values()
            for col in range(3):  # the aggregate is no single client's score vector
                assert np.max(np.abs(aggregate - plain[:, col])) > 1e-2
    assert channel.ciphertext_bytes > 3 * 100_000
    assert [e for e in events(tmp_path) if e["kind"] != "dropped"] == []


def test_decryptor_rotates_over_clients(world, tmp_path):
    root, kits, (images, questions, responses, index) = world
    channel, grid = make_channel(root, kits, tmp_path)
    weights = router_weights(len(responses), 3)
    decryptors = []
    for _ in range(3):
        grid.received.clear()
        channel.mixture(images, questions, responses, index, weights, phase="grpo", purpose="test")
        decryptors += [P.client_name(m.content) for m in grid.received if m.metadata.message_type == "query.decrypt"]
    assert sorted(decryptors) == NAMES


def test_client_without_kit_is_excluded_with_a_logged_reason(world, tmp_path):
    root, kits, (images, questions, responses, index) = world
    channel, _ = make_channel(root, kits, tmp_path, without_kit="beta")
    ledger = root / "clients" / "beta" / "ledger.jsonl"
    before = ledger.read_text()
    reward, present = channel.mixture(images, questions, responses, index, router_weights(len(responses), 3),
                                      phase="grpo", purpose="test")
    assert present.any(0).tolist() == [True, False, True] and np.all(np.isfinite(reward))
    (ev,) = [e for e in events(tmp_path) if e.get("client") == "beta"]
    assert ev["kind"] == "client_error" and "kit" in ev["reason"]
    assert ledger.read_text() == before, "refused before anything was recorded"


def tampering_app(mode: str) -> ClientApp:
    """The real ClientApp, except that client ``beta`` misbehaves in its score replies."""
    real = make_client_app()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context):
        return real(msg, context)

    @app.query("decrypt")
    def decrypt(msg: Message, context):
        return real(msg, context)

    @app.query("score")
    def score(msg: Message, context):
        reply = real(msg, context)
        if P.client_name(reply.content) != "beta" or not msg.content["cfg"]["encrypt"]:
            return reply
        if mode == "plaintext":
            return Message(P.encode_scores("beta", np.zeros(len(msg.content["cfg"]["responses"]))), reply_to=msg)
        good = reply.content["out"]["ciphertext"].numpy().tobytes()
        bad = good[: len(good) // 2] if mode == "truncated" else ckks.encrypt_scores(
            ckks.new_secret_context(ckks.CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 20, 40),
                                                    global_scale=2.0**20)), np.zeros(8))
        return Message(P.encode_encrypted_scores("beta", bad), reply_to=msg)

    return app


@pytest.mark.parametrize("mode, reason", [("plaintext", "plaintext"), ("truncated", "ciphertext"),
                                          ("foreign", "ciphertext")])
def test_bad_replies_exclude_that_client_for_that_step(world, tmp_path, mode, reason):
    root, kits, (images, questions, responses, index) = world
    channel, _ = make_channel(root, kits, tmp_path, tampering_app(mode))
    weights = router_weights(len(responses), 3)
    reward, present = channel.mixture(images, questions, responses, index, weights, phase="grpo", purpose="test")
    assert present.any(0).tolist() == [True, False, True]
    (ev,) = [e for e in events(tmp_path) if e.get("client") == "beta"]
    assert ev["kind"] == "rejected" and reason in ev["reason"]
    plain, _ = channel.score(images, questions, responses, index, phase="grpo", purpose="reference")
    mask = np.array([True, False, True])
    want = (weights(np.broadcast_to(mask, plain.shape)) * plain * mask).sum(axis=1)
    np.testing.assert_allclose(reward, want, atol=1e-4, rtol=0)
    record("tests/test_ckks_channel.py::test_bad_replies_exclude_that_client_for_that_step", inputs=1, bad_inputs=1)


def test_client_whose_declared_range_exceeds_the_ckks_capacity_is_left_out(world, tmp_path):
    root, kits, (images, questions, responses, index) = world
    channel, _ = make_channel(root, kits, tmp_path)
    beta = channel.clients["beta"]
    beta.hello = dataclasses.replace(beta.hello, clip_bound=10 * channel.ckks_capacity)
    weights = router_weights(len(responses), 3)
    reward, present = channel.mixture(images, questions, responses, index, weights, phase="grpo", purpose="test")
    assert present.any(0).tolist() == [True, False, True]
    (ev,) = [e for e in events(tmp_path) if e.get("client") == "beta"]
    assert ev["kind"] == "rejected" and "CKKS parameters hold" in ev["reason"]
    plain, _ = channel.score(images, questions, responses, index, phase="grpo", purpose="reference")
    mask = np.array([True, False, True])
    want = (weights(np.broadcast_to(mask, plain.shape)) * plain * mask).sum(axis=1)
    np.testing.assert_allclose(reward, want, atol=1e-4, rtol=0)


def test_more_responses_than_slots_is_refused_before_any_client_is_asked(world, tmp_path):
    root, kits, (images, questions, _, _) = world
    channel, grid = make_channel(root, kits, tmp_path)
    ledgers = {name: (root / "clients" / name / "ledger.jsonl").read_text() for name in NAMES}
    n = ckks.slot_count(channel.ckks_public) + 1
    grid.received.clear()
    with pytest.raises(CryptoError, match="prompts_per_step"):
        channel.mixture(images, questions, ["red"] * n, np.zeros(n, dtype=np.int64), router_weights(n, 3),
                        phase="grpo", purpose="test")
    assert grid.received == []
    assert {name: (root / "clients" / name / "ledger.jsonl").read_text() for name in NAMES} == ledgers


def test_server_refuses_a_private_context(world, tmp_path):
    root, kits, _ = world
    channel, _ = make_channel(root, kits, tmp_path)
    secret = ClientNode(root / "clients" / "alpha", kits.client_dirs["alpha"]).ckks_context
    assert secret.is_private()
    with pytest.raises(CryptoError, match="public-only"):
        channel.use_ckks(secret)
    assert not channel.ckks_public.is_private()


def test_client_init_writes_the_simulation_data_and_the_kit_ledger_key(world, tmp_path):
    root, kits, _ = world
    cfg = tiny_config()
    from mor_secure.runner import prepare_run

    run = prepare_run(cfg, tmp_path / "sim")
    for name in NAMES:
        a = list(load_split(run / "clients" / name / "data"))
        b = list(load_split(root / "clients" / name / "data"))
        assert [(x["question"], x["chosen"], x["rejected"]) for x in a] == [
            (x["question"], x["chosen"], x["rejected"]) for x in b]
        assert (root / "clients" / name / "ledger_key.pub").read_bytes() == (
            kits.client_dirs[name] / "ledger_key.pub").read_bytes()
        assert (root / "clients" / name / "ledger_key.pem").stat().st_mode & 0o077 == 0
    from mor_secure.errors import ConfigError

    with pytest.raises(ConfigError, match="belongs to client 'alpha'"):
        init_client_folder(cfg, "beta", tmp_path / "x", kits.client_dirs["alpha"])
    with pytest.raises(ConfigError, match="already holds"):
        init_client_folder(cfg, "alpha", root / "clients" / "alpha")
    shutil.rmtree(tmp_path / "sim")


@pytest.mark.parametrize("mutate, fragment", [
    (lambda c: c["cfg"].__setitem__("length", 0), "cfg.length"),
    (lambda c: c["cfg"].__setitem__("length", True), "cfg.length"),
    (lambda c: c["cfg"].__setitem__("run_id", ""), "cfg.run_id"),
    (lambda c: c["data"].__setitem__("ciphertext", Array(np.zeros(4, np.float32))), "uint8"),
    (lambda c: c["data"].__setitem__("ciphertext", Array(np.zeros(0, np.uint8))), "1.."),
])
def test_malformed_decrypt_requests_are_refused(mutate, fragment):
    content = P.encode_decrypt_request("r", "grpo", b"\x01" * 64, 8)
    assert P.decode_decrypt_request(content).ciphertext == b"\x01" * 64
    mutate(content)
    with pytest.raises(ProtocolError, match=fragment):
        P.decode_decrypt_request(content)
    record("tests/test_ckks_channel.py::test_malformed_decrypt_requests_are_refused", inputs=1, bad_inputs=1)


def test_aggregate_outside_the_declared_range_is_rejected():
    limit = np.full(3, 2.0)
    ok = P.decode_aggregate(P.encode_aggregate("a", np.array([1.0, -1.9, 0.0])), expected=3, limit=limit)
    assert ok.shape == (3,)
    for bad, fragment in [(np.array([1.0, 2.5, 0.0]), "range"), (np.array([1.0, np.nan, 0.0]), "NaN"),
                          (np.array([1.0, 2.0]), "1-D float array of 3")]:
        with pytest.raises(ProtocolError, match=fragment):
            P.decode_aggregate(P.encode_aggregate("a", bad), expected=3, limit=limit)
        record("tests/test_ckks_channel.py::test_aggregate_outside_the_declared_range_is_rejected",
               inputs=1, bad_inputs=1)


def test_context_census_tells_private_from_public():
    before = ckks.context_census()
    secret = ckks.new_secret_context()
    public = ckks.public_copy(secret)
    now = ckks.context_census()
    assert now["private"] == before["private"] + 1 and now["public"] == before["public"] + 1
    del secret, public
