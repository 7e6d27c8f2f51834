import copy

import pytest
import yaml

from mor_secure.config import load_config, parse_config
from mor_secure.errors import ConfigError

DEMO = yaml.safe_load(open("configs/demo.yaml"))


def _with(path: str, value):
    data = copy.deepcopy(DEMO)
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    return data


def test_demo_and_smoke_configs_are_valid():
    assert len(load_config("configs/demo.yaml").clients) == 3
    assert load_config("configs/smoke.yaml").grpo.beta > 0


@pytest.mark.parametrize("path,value,fragment", [
    ("grpo.beta", 0.0, "grpo.beta"),
    ("clients.0.privacy.epsilon", 20.0, "exceeds budget.epsilon"),
    ("clients.0.families", ["digit"], "not a 'shapes' family"),
    ("clients.0.model.family", "gpt2", "clients.0.model.family"),
    ("data.track", "mnist", "data.track"),
    ("clients.1.name", "hospital_a", "unique"),
])
def test_bad_values_name_the_field(path, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        parse_config(_with(path, value), "test")


def test_unknown_key_is_rejected():
    data = _with("grpo.stepz", 3)
    with pytest.raises(ConfigError, match="stepz"):
        parse_config(data, "test")


def test_non_private_needs_risk_flag():
    data = _with("clients.0.privacy", {"dp_sgd": False})
    data["clients"][0]["scores"] = {"clip_bound": 5.0, "noise_std": 0.0}
    with pytest.raises(ConfigError, match="allow_non_private"):
        parse_config(data, "test")
    data["clients"][0]["privacy"]["allow_non_private"] = True
    cfg = parse_config(data, "test")
    assert cfg.insecure_flags == ["clients.hospital_a.privacy.allow_non_private"]


def test_override_syntax(tmp_path):
    cfg = load_config("configs/demo.yaml", ["grpo.steps=7", "clients.0.training.epochs=2"])
    assert cfg.grpo.steps == 7 and cfg.clients[0].training.epochs == 2
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("configs/demo.yaml", ["grpo.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
