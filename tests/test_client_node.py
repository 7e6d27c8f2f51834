"""The client side of the privacy boundary: write-ahead ledger, client-enforced budget, refusals."""

import numpy as np
import pytest

from mor_secure.config import ClientSection
from mor_secure.data import make_client_pairs
from mor_secure.data.storage import save_records
from mor_secure.errors import BudgetExceededError, ConfigError
from mor_secure.federation import protocol as P
from mor_secure.federation.client_node import CLIENT_FILE, ClientNode, ClientSetup
from mor_secure.privacy.accounting import client_guarantee
from mor_secure.privacy.events import DpSgdTraining, GaussianScoreRelease
from mor_secure.privacy.ledger import generate_signing_key, load_public_key, verify_ledger


def make_client(folder, **section):
    base = {"name": "c1", "families": ["colour"], "budget": {"epsilon": 8.0, "delta": 1e-5},
            "training": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "lora_r": 2}}
    base.update(section)
    folder.mkdir(parents=True)
    (folder / CLIENT_FILE).write_text(ClientSetup(ClientSection.model_validate(base), 0, 32).to_json())
    save_records(make_client_pairs("shapes", ["colour"], 48, seed=1), "pairs", folder / "data")
    generate_signing_key(folder / "ledger_key.pem", folder / "ledger_key.pub")
    return ClientNode(folder)


def score_request(n=6):
    return P.ScoreRequest(np.zeros((2, 32, 32, 3), np.uint8), ["what colour is the shape ?"] * 2,
                          ["red"] * n, np.arange(n) % 2, run_id="r", phase="grpo", purpose="test")


def test_dp_client_records_training_then_releases_for_free(tmp_path):
    node = make_client(tmp_path / "c1")
    with pytest.raises(ConfigError, match="phase 1"):
        node.score(score_request())
    assert node.train("r", progress=False) == "LlavaForConditionalGeneration"
    events = [e for e, _ in node.ledger.events()]
    assert isinstance(events[0], DpSgdTraining)
    for _ in range(3):
        scores = node.score(score_request())
        assert scores.shape == (6,) and np.all(np.abs(scores) < 5.0 + 8 * 0.1)
    events = [e for e, _ in node.ledger.events()]
    assert [type(e) for e in events] == [DpSgdTraining] + [GaussianScoreRelease] * 3
    g = client_guarantee(events, 1e-5)
    assert g.route == "dpsgd" and g.epsilon <= 8.0
    assert verify_ledger(tmp_path / "c1" / "ledger.jsonl", load_public_key(tmp_path / "c1" / "ledger_key.pub")).ok
    # training again (resume) reuses the RM and records nothing new
    node.train("r", progress=False)
    assert len(node.ledger.events()) == 4


def test_output_route_client_is_refused_past_budget_and_nothing_is_written(tmp_path):
    node = make_client(tmp_path / "c2", privacy={"dp_sgd": False},
                       budget={"epsilon": 2.0, "delta": 1e-5}, scores={"clip_bound": 1.0, "noise_std": 8.0})
    node.train("r", progress=False)
    assert node.ledger.events() == []  # non-private training releases nothing by itself
    released = 0
    with pytest.raises(BudgetExceededError):
        for _ in range(200):
            node.score(score_request(n=4))
            released += 1
    assert released >= 1
    events = [e for e, _ in node.ledger.events()]
    assert len(events) == released, "a refused release must not be written"
    assert client_guarantee(events, 1e-5).epsilon <= 2.0


def test_budget_is_read_from_the_client_folder_not_the_request(tmp_path):
    node = make_client(tmp_path / "c3", privacy={"dp_sgd": False}, budget={"epsilon": 0.5, "delta": 1e-5},
                       scores={"clip_bound": 1.0, "noise_std": 0.01})
    node.train("r", progress=False)
    req = score_request()
    with pytest.raises(BudgetExceededError):
        node.score(req)  # one nearly noiseless release already exceeds epsilon 0.5
    assert node.ledger.events() == []


def test_client_app_pickles_for_the_simulation_engine(tmp_path):
    """Flower's simulation engine ships the ClientApp to Ray actors with cloudpickle: nothing its
    handlers reference may hold a lock (that broke every `mor-secure run` once)."""
    import ray.cloudpickle

    from mor_secure.federation.client_app import make_client_app

    app = ray.cloudpickle.loads(ray.cloudpickle.dumps(make_client_app(tmp_path)))
    assert set(app._registered_funcs) == {"train.default", "query.score", "query.decrypt"}
