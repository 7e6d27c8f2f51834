import copy
import math
import re

import pytest
import yaml
from helpers.hardening import record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from mor_secure.config import RunConfig, apply_override, load_config, parse_config
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
    ("clients.0.families", ["digit"], "not a family of data.track 'shapes'"),
    ("clients.0.model.family", "gpt2", "clients.0.model.family"),
    ("data.track", "mnist", "data.track"),
    ("clients.1.name", "hospital_a", "unique"),
    ("grpo.steps_per_generation", 100, "grpo.steps_per_generation = 1600 public prompts, more than data.public_prompts"),
])
def test_bad_values_name_the_field(path, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        parse_config(_with(path, value), "test")
    record("tests/test_config.py::test_bad_values_name_the_field", inputs=1, bad_inputs=1)


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


# -- fuzzing: any YAML-like input parses or is refused with a ConfigError naming the field ----------------


def _field_names(model: type[BaseModel], seen: set | None = None) -> set[str]:
    """Every field name of the config models (the fuzzer adds known keys in wrong places too)."""
    seen = set() if seen is None else seen
    for name, field in model.model_fields.items():
        seen.add(name)
        for arg in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg.__name__ not in seen:
                seen.add(arg.__name__)
                _field_names(arg, seen)
    return {s for s in seen if s[:1].islower()}


BASE = copy.deepcopy(DEMO)
BASE["clients"][0]["budget"]["phase_caps"] = {"router_fit": 1.0, "grpo": 4.0}
BASE["clients"][1]["model"]["checkpoint"] = None
KEYS = sorted(_field_names(RunConfig))
WORDS = ["shapes", "digits", "colour", "digit", "llava", "gpt2", "tiny", "ckks", "none", "deployment", "sgd",
         "adam", "hospital_a", "bad name!", "", "1e-5", "nan", "inf"]


def _paths(node, prefix=()):
    """(path, value) of every node of a parsed YAML tree, the root included."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


PATHS = [p for p, _ in _paths(BASE)]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10),
                    st.sampled_from(WORDS))
yaml_like = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner,
                                                 max_size=4)), max_leaves=12)
# values at the edges of every field's range, tried often
edges = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0, -1, 0.0, 1e-300, 1e308, 2**63, True, "",
                         "digits", "digit", [], {}])
values = st.one_of(edges, scalars, yaml_like)


def _named(message: str, path: tuple) -> bool:
    """Does ``message`` name ``path`` (or the section or list entry holding it)? ``clients[0].x`` and
    ``clients.0.x`` are the same field; ``clients[].name`` names the name of every client."""
    text = re.sub(r"\[(\d+)\]", r".\1", message).replace("[]", "")
    parts = [str(p) for p in path]
    if not parts:  # the whole config replaced: the top level, or a field of what replaced it, is named
        return "top level" in text or "\n  - " in message
    for n in range(len(parts), min(2, len(parts)) - 1, -1):
        prefix = parts[:n]
        if ".".join(prefix) in text or ".".join(p for p in prefix if not p.isdigit()) in text:
            return True
    return False


def _all_finite(node) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for _, v in _paths(node))


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(PATHS), st.sampled_from(["replace", "delete", "add"]), values,
       st.one_of(st.sampled_from(KEYS), st.text(max_size=8)))
def test_fuzzed_configs_parse_or_name_the_field(path, action, value, new_key):
    """One mutation of a valid config (a value replaced by any YAML-like value, a key deleted or
    added): either it parses into a config of finite numbers that reparses to itself, or
    ``parse_config`` raises ConfigError naming the mutated field (or the section holding it)."""
    data = copy.deepcopy(BASE)
    if not path:
        data, where = value, ()
    else:
        parent = data
        for p in path[:-1]:
            parent = parent[p]
        if action == "delete":
            del parent[path[-1]]
            where = path
        elif action == "add" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][new_key] = value
            where = (*path, new_key)
        else:
            parent[path[-1]] = value
            where = path
    try:
        cfg = parse_config(data, "fuzz")
    except ConfigError as exc:
        assert _named(str(exc), where), f"{where}: {exc}"
        record("tests/test_config.py::test_fuzzed_configs_parse_or_name_the_field", inputs=1, bad_inputs=1)
        return
    assert _all_finite(cfg.to_dict()) and parse_config(cfg.to_dict()) == cfg
    record("tests/test_config.py::test_fuzzed_configs_parse_or_name_the_field", inputs=1)


yaml_text = st.one_of(
    st.text(max_size=60),
    st.builds(lambda v: yaml.safe_dump(v), yaml_like),
    st.builds(lambda v, cut: yaml.safe_dump(v)[:cut], st.just(BASE), st.integers(0, 4000)),
    st.sampled_from(["", "~", "- a\n- b", "run: [", "run: {name: x}\nrun: {name: y}", "a: 2001-02-30",
                     "clients: !!python/object:os.system x", "\t\tbad: indent", "&a [*a]", "grpo: {steps: .inf}"]),
)
override = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from([".".join(map(str, p)) for p in PATHS if p] + ["", "x.y.z"]),
              st.one_of(st.text(max_size=10), st.sampled_from(["[", "{a: 1", "2001-02-30", "~", "nan", "[1, 2]"]))),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(yaml_text, st.lists(override, max_size=3))
def test_fuzzed_yaml_files_and_overrides_parse_or_raise_config_error(tmp_path, text, overrides):
    """Any file text and any ``--set`` overrides: ``load_config`` returns a config or raises
    ConfigError naming the file, the override or the field; never another exception."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        assert str(path) in str(exc) or "override" in str(exc), str(exc)
        record("tests/test_config.py::test_fuzzed_yaml_files_and_overrides_parse_or_raise_config_error",
               inputs=1, bad_inputs=1)
        return
    record("tests/test_config.py::test_fuzzed_yaml_files_and_overrides_parse_or_raise_config_error", inputs=1)


@pytest.mark.parametrize("data, item, fragment", [
    (None, "grpo.steps=3", "top level is a NoneType"),
    ({"grpo": 5}, "grpo.steps=3", "grpo is a int"),
    ({"clients": [{}]}, "clients.x.name=a", "'x' is not a valid index"),
    ({}, "grpo.steps=[", "not valid YAML"),
    ({}, "run.name=2001-02-30", "not valid YAML"),
])
def test_override_into_a_non_section_names_it(data, item, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        apply_override(data, item)
    record("tests/test_config.py::test_override_into_a_non_section_names_it", inputs=1, bad_inputs=1)
