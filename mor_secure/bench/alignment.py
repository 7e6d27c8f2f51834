"""``mor-secure bench alignment``: MoR against the baselines on the project's own benchmark (DESIGN.md §6).

Each track is a config file (``configs/demo.yaml`` for shapes, ``configs/bench_digits.yaml`` for
digits). For every track and seed, every method aligns **the same base policy** with TRL's
GRPOTrainer on the same public prompts, for the same number of steps, with the same group size,
learning rate and KL penalty to the same frozen reference, and is scored by the oracle on the same
held-out evaluation prompts (a completion is right when its first word is the right answer).
The methods differ only in the reward:

``base``
    no alignment: the base policy (perception pre-training, then the format warm-up).
``single:<client>``
    one client's reward model alone (DP-SGD at the config's epsilon), its clipped, noised scores
    fetched through Flower.
``uniform``
    every client's scores with equal weights and no calibration (no router).
``fedavg``
    one reward model of the policy's architecture trained by federated averaging: Flower's
    ``FedAvg`` strategy (``flwr.serverapp.strategy``) over real Flower messages to a ClientApp
    in which each client trains that architecture locally with DP-SGD on its own pairs, every
    client starting each round from the averaged LoRA, projector and head parameters (the frozen
    backbone is the same for everyone: the same architecture built from the same seed). Each
    client calibrates its per-round noise so that all rounds together meet its epsilon (the
    config's), and its ledger and budget guard check every round; the server then scores with
    the averaged model itself (clipped and noised like a client's scores). It shows what
    parameter averaging gives when the clients' tasks differ.
``centralized``
    one reward model of the policy's architecture trained **without DP** on every client's pairs
    pooled in one place: the upper bound that ignores both privacy and federation.
``mor:nodp``
    Mixture-of-Rewards with clients that train without DP and release unnoised scores.
``mor:eps<E>``
    Mixture-of-Rewards as ``mor-secure run`` does it: each client trains with DP-SGD at epsilon E
    (its budget is E too), the server fits the router on the objective set from the clients'
    noised scores and runs GRPO on the router-mixed scores.

**Generalisation.** A track named ``<track>-heldout`` is the track's config with one family
(:data:`HELDOUT`) removed from every client's families; a client left with no family leaves the
consortium. The server's public, objective and evaluation prompts still cover every family, so
the held-out family's accuracy says how far each reward carries to questions no client has
correct preferences on (its images still appear among the 10% "foreign" pairs, whose labels are
coin flips, and in malformed-answer rejections, which teach only the answer format).

**Shared work.** Per track and seed the base policy is built once (and shared with the
``-heldout`` variant: the server's prompts and the policy's seed are the same); each privacy
setting's client reward models are trained once by ``ClientNode.train`` (the code the ClientApp's
train handler runs), in client folders made by ``client init``'s ``init_client_folder``, and
reached through the real ClientApp behind an in-process Flower grid (``deploy.inproc``) and the
reward channel (``federation.channel``); they serve the single-client, uniform and MoR rows.
Results go to a JSON file after every method, so an interrupted run keeps what it measured and,
rerun with the same settings, continues with the methods still missing (trained reward models and
base policies are reused from the work folder).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mor_secure.bench.calibration import dpsgd_plans_once
from mor_secure.config import RunConfig, load_config, parse_config
from mor_secure.errors import ConfigError

log = logging.getLogger(__name__)

#: The family each track's ``-heldout`` variant removes from every client.
HELDOUT = {"shapes": "size", "digits": "greater"}
DEFAULT_CONFIGS = {"shapes": "configs/demo.yaml", "digits": "configs/bench_digits.yaml"}
ALL_TRACKS = ("shapes", "digits", "shapes-heldout", "digits-heldout")
METHOD_KINDS = ("base", "single", "uniform", "fedavg", "centralized", "mor")
#: Reference rows run only when named: ``oracle`` aligns with the answer key itself as the reward, 1 for
#: the right answer and 0 for any other (the benchmark knows it; no server does): a reward that is never
#: wrong but, unlike a reward model's graded scores, does not rank the wrong answers.
REFERENCE_KINDS = ("oracle",)
DEFAULT_EPSILONS = (1.0, 4.0, 8.0)
RESULTS_VERSION = 1
# GRPO run g of a (seed, method) samples with seed + GRPO_SEED_STRIDE * g: run 0 is the seed itself,
# so rows measured before runs were counted are run 0
GRPO_SEED_STRIDE = 1000
#: Part of every track's fingerprint: results measured by an older version of this code are measured again.
BENCH_VERSION = 2
#: Config fields added after results were stored, with the default every stored result ran with: at
#: that default a field is left out of the fingerprint, so adding it does not discard those results.
LATER_FIELDS = {("grpo", "steps_per_generation"): 1}
#: Non-private reward models (MoR without DP, the centralized RM) train with Adam at this learning rate,
#: the project's setting for non-DP training (``TrainingSection.optimizer``; tests/test_reward_training.py):
#: the configs' SGD at lr 0.5 is tuned for DP-SGD's clipped, averaged per-pair gradients, and on raw
#: gradients it left the centralized RM at chance with every score past the clip bound (measured).
NON_PRIVATE_TRAINING = {"optimizer": "adam", "lr": 1e-3}
SECTION = "alignment"
TITLE = "MoR against the baselines: oracle accuracy after GRPO"

#: ``--quick``: tiny sizes for the smoke test (seconds per method), same code path.
QUICK = {
    "data": {"pairs_per_client": 32, "heldout_pairs_per_client": 8, "public_prompts": 16, "objective_pairs": 16,
             "eval_prompts": 15},
    "training": {"epochs": 2, "batch_size": 16, "lora_r": 4},
    "policy": {"model": {"perception": {"steps": 4, "images": 16, "batch_size": 8}},
               "warmup": {"epochs": 1, "batch_size": 8}},
    "model": {"perception": {"steps": 4, "images": 16, "batch_size": 8}},  # every client's
    "router": {"steps": 20},
    "grpo": {"steps": 2, "prompts_per_step": 2, "num_generations": 2},
}


# -- configuration ---------------------------------------------------------------------------------
def _eps_label(eps: float) -> str:
    return f"eps{eps:g}"


def method_label(method: str) -> str:
    """A row's name in the tables and plots."""
    if method == "base":
        return "base policy (no alignment)"
    if method.startswith("single:"):
        return f"single RM: {method.split(':', 1)[1]}"
    if method == "uniform":
        return "uniform mixture (no router)"
    if method == "fedavg":
        return "FedAvg RM (same architecture)"
    if method == "centralized":
        return "centralized RM, no DP (upper bound)"
    if method == "oracle":
        return "answer key as a 0/1 reward (reference)"
    if method == "mor:nodp":
        return "MoR, no DP"
    if method.startswith("mor:eps"):
        return f"MoR, ε = {method[len('mor:eps'):]}"
    return method


@dataclass(frozen=True)
class Track:
    """One benchmark track: its config (after --quick and --grpo-steps), and its held-out families."""

    name: str
    base: str  # the track of the data ("shapes" / "digits")
    config_path: str
    cfg: RunConfig
    heldout: tuple[str, ...] = ()

    @property
    def clients(self) -> list[str]:
        return [c.name for c in self.cfg.clients]

    @property
    def ref_epsilon(self) -> float:
        """The config's DP-SGD epsilon: single-client, uniform and FedAvg rows use it (MoR at it too)."""
        eps = {c.privacy.epsilon for c in self.cfg.clients if c.privacy.dp_sgd}
        if len(eps) != 1:
            raise ConfigError(f"{self.config_path}: bench alignment needs every client at the same DP-SGD epsilon "
                              f"(found {sorted(eps) or 'no DP-SGD client'})")
        return float(eps.pop())

    def fingerprint(self, extra: dict, *, work: bool = False) -> str:
        """Hash of everything the results depend on; ``work=True``: of what the work folder holds
        (client data and reward models, base policies) depends on, i.e. without the router and GRPO."""
        cfg = self.cfg.to_dict()
        for (section, key), default in LATER_FIELDS.items():  # results stored before the field existed stay valid
            if cfg.get(section, {}).get(key) == default:
                cfg[section] = {k: v for k, v in cfg[section].items() if k != key}
        if work:
            cfg = {k: v for k, v in cfg.items() if k not in ("router", "grpo")}
        blob = json.dumps({"config": cfg, "heldout": self.heldout, "version": BENCH_VERSION, **extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _deep_update(node: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _deep_update(node[key], value)
        else:
            node[key] = value


def load_track(name: str, config_path: str | None = None, *, quick: bool = False,
               grpo_steps: int | None = None, overrides: Sequence[str] = ()) -> Track:
    """The track ``name`` (``shapes``, ``digits``, or either with ``-heldout``) from its config.

    ``overrides`` are ``mor-secure run --set`` items (``grpo.steps=60``), applied after ``quick``;
    ``clients.*.`` applies one to every client (``clients.*.training.epochs=4``)."""
    from mor_secure.config import apply_override

    base, _, variant = name.partition("-")
    if base not in DEFAULT_CONFIGS or variant not in ("", "heldout"):
        raise ConfigError(f"unknown track {name!r}; use one of {', '.join(ALL_TRACKS)}")
    path = config_path or DEFAULT_CONFIGS[base]
    data = load_config(path).to_dict()
    if data["data"]["track"] != base:
        raise ConfigError(f"{path} is a {data['data']['track']!r} config, not {base!r}")
    if quick:
        _deep_update(data, {k: v for k, v in QUICK.items() if k not in ("training", "model")})
        for client in data["clients"]:
            _deep_update(client["training"], QUICK["training"])
            if not client["model"].get("checkpoint"):
                _deep_update(client["model"], QUICK["model"])
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.startswith("clients.*.") and sep:
            for i in range(len(data["clients"])):
                apply_override(data, f"clients.{i}.{key[len('clients.*.'):]}={value}")
        else:
            apply_override(data, item)
    if grpo_steps is not None:
        data["grpo"]["steps"] = int(grpo_steps)
    heldout: tuple[str, ...] = ()
    if variant == "heldout":
        fam = HELDOUT[base]
        heldout = (fam,)
        for client in data["clients"]:
            client["families"] = [f for f in client["families"] if f != fam]
        data["clients"] = [c for c in data["clients"] if c["families"]]
        if not data["clients"]:
            raise ConfigError(f"{path}: every client owns only {fam!r}; nothing is left for {name}")
    cfg = parse_config(data, f"{path} ({name})")
    return Track(name, base, str(path), cfg, heldout)


def client_config(cfg: RunConfig, setting: str, *, family: str | None = None) -> RunConfig:
    """``cfg`` with every client at one privacy setting: ``eps<E>`` (DP-SGD at E, budget E) or
    ``nodp`` (no DP-SGD, unnoised scores, flagged as a non-private comparison run); ``family``
    gives every client that model architecture (FedAvg)."""
    data = cfg.to_dict()
    for client in data["clients"]:
        privacy, budget = client["privacy"], client["budget"]
        if setting == "nodp":
            privacy.update(dp_sgd=False, allow_non_private=True)
            client["scores"]["noise_std"] = 0.0
            client["training"].update(NON_PRIVATE_TRAINING)
        elif setting.startswith("eps"):
            eps = float(setting[3:])
            privacy.update(dp_sgd=True, epsilon=eps)
            budget.update(epsilon=eps, delta=max(budget["delta"], privacy["delta"]))
        else:
            raise ConfigError(f"unknown privacy setting {setting!r}")
        if family is not None:
            client["model"] = {**cfg.policy.model.model_dump(mode="json"), "family": family}
    return parse_config(data, f"<bench alignment: {setting}>")


def expand_methods(kinds: Sequence[str], clients: Sequence[str], epsilons: Sequence[float],
                   ref_eps: float) -> list[str]:
    """Row ids in display order: base, single:<c>..., uniform, fedavg, centralized, mor:nodp, mor:eps<E>..."""
    unknown = [k for k in kinds if k not in METHOD_KINDS + REFERENCE_KINDS and not k.startswith(("mor:", "single:"))]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; use {', '.join(METHOD_KINDS + REFERENCE_KINDS)} (or mor:nodp, "
                          f"mor:eps8, single:<client>)")
    strangers = [k for k in kinds if k.startswith("single:") and k.split(":", 1)[1] not in clients]
    if strangers:
        raise ConfigError(f"method(s) {strangers}: no such client; the clients are {', '.join(clients)}")
    out: list[str] = []
    for kind in METHOD_KINDS:
        if kind == "single":  # every client's row, or the ones named (single:hospital_a)
            named = [k.split(":", 1)[1] for k in kinds if k.startswith("single:")]
            out += [f"single:{c}" for c in clients if kind in kinds or c in named]
            continue
        if kind not in kinds:
            continue
        if kind == "mor":
            out += ["mor:nodp"] + [f"mor:{_eps_label(e)}" for e in sorted(epsilons)]
        else:
            out.append(kind)
    for k in kinds:  # explicit MoR variants (mor:nodp, mor:eps4)
        if k.startswith("mor:") and k not in out:
            try:
                label = "mor:nodp" if k == "mor:nodp" else f"mor:{_eps_label(float(k[len('mor:eps'):]))}"
            except ValueError:
                label = ""
            if not k.startswith(("mor:nodp", "mor:eps")) or not label:
                raise ConfigError(f"method {k!r}: MoR rows are mor:nodp or mor:eps<E> (e.g. mor:eps8)")
            if label not in out:
                out.append(label)
    out += [k for k in REFERENCE_KINDS if k in kinds]
    del ref_eps
    return out


def run_order(methods: Sequence[str], ref_eps: float) -> list[str]:
    """The order methods run in: the headline comparison first (MoR at the config's epsilon, the
    uniform mixture, each single client, the centralized bound), so a run cut short has it."""
    ref = f"mor:{_eps_label(ref_eps)}"

    def key(m: str) -> tuple:
        rank = {"base": 0, ref: 1, "uniform": 2, "centralized": 4, "fedavg": 5, "mor:nodp": 6}
        if m.startswith("single:"):
            return (3, m)
        if m.startswith("mor:eps"):
            return (rank.get(m, 7), -float(m[len("mor:eps"):]))
        return (rank.get(m, 8), m)

    return sorted(methods, key=key)


# -- results file ----------------------------------------------------------------------------------
def load_results(path: Path) -> dict:
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("version") == RESULTS_VERSION:
            return data
    return {"version": RESULTS_VERSION, "tracks": {}}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    os.replace(tmp, path)


# -- pieces ------------------------------------------------------------------------------------------
def _threads() -> int:
    """One torch thread, as the ClientApp's handlers use: on the shared 2-core machine two OpenMP
    threads made reward-model training and scoring 15-20x slower than one (a thread spin-waits
    while the other core runs someone else's work; measured)."""
    return 1


def evaluate(policy, records: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Oracle accuracy per family and ``mean`` (unweighted over families) on ``records``."""
    from mor_secure.alignment.policy import generate_answers, oracle_accuracy

    completions = generate_answers(policy, [r["image"] for r in records], [r["question"] for r in records],
                                   max_new_tokens=max_new_tokens)
    return oracle_accuracy([r["family"] for r in records], [r["answer"] for r in records], completions)


def build_base_policy(cfg: RunConfig, public: list[dict], out: Path, *, progress: bool):
    """The server's base policy as ``mor-secure run`` builds it (``build_base_model``: the config's
    model, perception pre-training on unlabelled public images; then the format warm-up on the public
    prompts), saved to ``out``; reused from ``out`` when it is already there."""
    from mor_secure.alignment.policy import warmup

    if not (out / "complete").is_file():
        policy, _ = base_model(cfg.policy.model, track=cfg.data.track, image_size=cfg.data.image_size,
                               data_seed=cfg.run.seed, model_seed=cfg.run.seed, progress=progress)
        images = [r["image"] for r in public]
        w = cfg.policy.warmup
        if w.epochs:
            warmup(policy, images, [r["family"] for r in public], epochs=w.epochs, lr=w.lr,
                   batch_size=w.batch_size, seed=cfg.run.seed, progress=progress)
        policy.save(out)
        (out / "complete").write_text("ok")
    return load_policy(out)


def load_policy(folder: Path):
    """A fresh copy of a saved policy, with TRL's frozen reference pointing at ``folder``."""
    from mor_secure.models.factory import load_vlm

    policy = load_vlm(folder)
    policy.model.config._name_or_path = str(folder)
    policy.model.eval()
    return policy


class FixedRouter:
    """Constant, equal weights over ``clients`` and no calibration (scale 1): the uniform mixture,
    and a single reward model (one client). Duck-types the router ``MixtureReward`` uses."""

    def __init__(self, clients: Sequence[str]) -> None:
        from mor_secure.rewards.router import masked_weights, mixture_reward

        self.clients = list(clients)
        self._mask, self._mix = masked_weights, mixture_reward

    def reward(self, features: torch.Tensor, scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(features.shape[0], len(self.clients))
        return self._mix(self._mask(logits, present), scores, torch.ones(len(self.clients)), present)


def local_scorer(rm, clip_bound: float, noise_std: float, seed: int):
    """A scorer over a reward model the server itself holds (FedAvg's averaged RM, the centralized
    RM): scores clipped to ``[-B, B]`` and noised like a client's release."""
    rng = np.random.default_rng(seed)

    def scorer(images, questions, responses, index):
        with torch.no_grad():
            raw = rm.score([images[i] for i in index], [questions[i] for i in index], list(responses))
        s = np.clip(raw.numpy().astype(np.float64), -clip_bound, clip_bound)
        if noise_std > 0:
            s = s + rng.normal(0.0, noise_std, size=s.shape)
        return s[:, None], np.ones((len(s), 1), dtype=bool)

    return scorer


def channel_scorer(channel):
    def scorer(images, questions, responses, index):
        out = channel.score(images, questions, responses, index, phase="grpo", purpose="score policy samples")
        torch.set_num_threads(_threads())  # the ClientApp's handlers set one thread per process
        return out

    return scorer


def trainable_state(rm) -> dict[str, torch.Tensor]:
    """What FedAvg exchanges: the RM's trainable tensors (LoRA, projector, head)."""
    return {n: p.detach().clone() for n, p in rm.named_parameters() if p.requires_grad}


def rm_digest(rm) -> str:
    """SHA-256 (first 16 hex digits) of a reward model's whole state (names, dtypes, shapes, values):
    two rows of one seed that scored with the same client's RM carry the same digest only if that RM
    was the same draw. Training again in another process on the same machine gives the same RM to the
    bit (tests/test_reward_training.py); on another machine it can differ (other CPU kernels sum in
    another order, and DP-SGD's noisy steps carry that along)."""
    h = hashlib.sha256()
    for name, t in sorted(rm.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_trainable(rm, state: dict[str, torch.Tensor]) -> None:
    missing = set(trainable_state(rm)) - set(state)
    result = rm.load_state_dict(state, strict=False)
    if result.unexpected_keys or missing:
        raise RuntimeError(f"FedAvg arrays do not fit the reward model: unexpected {result.unexpected_keys[:3]}, "
                           f"missing {sorted(missing)[:3]}")


def shared_rm(spec, track: str, image_size: int, training, seed: int):
    """FedAvg's (and the centralized) reward model: architecture ``spec`` (the policy's, with its
    perception pre-training on public images), the same frozen backbone for every party (built
    from one seed), LoRA of the clients' rank."""
    from mor_secure.rewards.reward_model import LORA_TARGETS, VISION_LORA_TARGETS, RewardModel

    vlm, _ = base_model(spec, track=track, image_size=image_size, data_seed=seed, model_seed=seed + 777,
                        progress=False)
    return RewardModel(vlm, lora_r=training.lora_r, seed=seed,
                       lora_targets=VISION_LORA_TARGETS if training.lora_vision else LORA_TARGETS)


_BASE_MODELS: dict[str, object] = {}


def base_model(spec, *, track: str, image_size: int, data_seed: int, model_seed: int, progress: bool = False):
    """``alignment.perception.build_base_model``, computed once per distinct argument set in this
    process and copied out: a party's starting model is a pure function of them (public images,
    seeds), so a client's backbone is pre-trained once for all privacy settings, and FedAvg's shared
    backbone once for the server and every client."""
    from mor_secure.alignment.perception import build_base_model

    key = json.dumps([spec.model_dump(mode="json"), track, image_size, data_seed, model_seed], sort_keys=True)
    if key not in _BASE_MODELS:
        _BASE_MODELS[key] = build_base_model(spec, track=track, image_size=image_size, data_seed=data_seed,
                                             model_seed=model_seed, progress=progress)
    vlm, losses = _BASE_MODELS[key]
    return copy.deepcopy(vlm), list(losses)


@functools.lru_cache(maxsize=None)
def fedavg_round_epsilon(epsilon: float, delta: float, num_records: int, batch_size: int, epochs_total: int,
                         epochs_per_round: int, max_grad_norm: float) -> float:
    """The per-round target epsilon whose calibrated noise makes ``epochs_total / epochs_per_round``
    rounds compose to at most ``epsilon``: the noise multiplier a single DP-SGD run of
    ``epochs_total`` epochs needs, expressed as the RDP epsilon of one round at that noise (one
    round calibrated to it gets at least that noise; rounds compose exactly under RDP)."""
    from opacus.accountants import RDPAccountant

    from mor_secure.privacy.planner import calibrate_dpsgd, dpsgd_schedule

    whole = calibrate_dpsgd(target_epsilon=epsilon, delta=delta, num_records=num_records, epochs=epochs_total,
                            batch_size=batch_size, max_grad_norm=max_grad_norm, opacus_accountant="rdp")
    _, per_epoch, _ = dpsgd_schedule(num_records, batch_size, epochs_per_round)
    acct = RDPAccountant()
    acct.history = [(whole.noise_multiplier, whole.sample_rate, per_epoch * epochs_per_round)]
    return float(acct.get_epsilon(delta=delta))


def make_fedavg_client_app(shared_seed: int):
    """A Flower ClientApp for the FedAvg baseline only (the product's ClientApp never ships
    parameters): ``train`` receives the global arrays, runs DP-SGD locally on this client's pairs
    (its budget guard writes each round to its ledger first) and returns its arrays and its number
    of pairs (the weight; no loss or other metric on private data is returned)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from mor_secure.data import load_split
    from mor_secure.federation.client_node import ClientNode
    from mor_secure.rewards.train import PairTensors, TrainSettings, train_reward_model

    nodes: dict[str, tuple] = {}
    encodings: dict[str, PairTensors] = {}  # each client's pairs, encoded in its first round only
    app = ClientApp()

    @app.train()
    def train(msg, context):
        folder = str(context.node_config["client-dir"])
        if folder not in nodes:
            node = ClientNode(Path(folder))
            nodes[folder] = (node, list(load_split(Path(folder) / "data")))
        node, pairs = nodes[folder]
        cfg = msg.content["config"]
        rnd, rounds, epochs = int(cfg["server-round"]), int(cfg["rounds"]), int(cfg["local-epochs"])
        c, t, p = node.config, node.config.training, node.config.privacy
        # the client calibrates its own noise from its own epsilon; the guard refuses any round past it
        eps_round = fedavg_round_epsilon(p.epsilon, p.delta, len(pairs), t.batch_size, rounds * epochs, epochs,
                                         p.max_grad_norm) if p.dp_sgd else None
        rm = shared_rm(c.model, get_family(c.families[0]).track, node.setup.image_size, t, shared_seed)
        load_trainable(rm, msg.content["arrays"].to_torch_state_dict())
        settings = TrainSettings(epochs=epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer, dp=p.dp_sgd,
                                 target_epsilon=eps_round, delta=p.delta, max_grad_norm=p.max_grad_norm,
                                 seed=int(hashlib.sha256(f"{folder}:{rnd}".encode()).hexdigest()[:8], 16))
        context_ = {"run_id": str(cfg["run-id"]), "phase": "fedavg", "purpose": f"FedAvg round {rnd}: local DP-SGD",
                    "client": node.name}
        if folder not in encodings:  # the same processor and pairs every round
            encodings[folder] = PairTensors(rm, pairs)
        train_reward_model(rm, pairs, settings, authorize=lambda ev: node._record(ev, context_), progress=False,
                           encoded=encodings[folder])
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=trainable_state(rm)),
                              "metrics": MetricRecord({"num-examples": len(pairs)})})
        return Message(content=content, reply_to=msg)

    return app


def rm_setting(method: str, ref: str) -> str:
    """The privacy setting of the client reward models a single-client, uniform or MoR row scores with:
    MoR's own (``mor:eps4`` -> ``eps4``), the others the config's ``ref``."""
    return method.split(":", 1)[1] if method.startswith("mor:") else ref


def row_clients(method: str, clients) -> list[str]:
    """The client reward models a single-client, uniform or MoR row scores with: the named client for
    ``single:NAME``, else every client of ``clients`` in sorted order."""
    return [method.split(":", 1)[1]] if method.startswith("single:") else sorted(clients)


def reward_top1(rms: Sequence, clips: Sequence[float], router, features: torch.Tensor,
                records: Sequence[dict]) -> dict[str, float]:
    """Benchmark harness: per family, the share of ``records`` (evaluation prompts with their oracle
    answers) on which a method's reward ranks the oracle answer strictly above every other answer of
    the family (a tie counts as a miss), and the mean over families.

    The reward is the method's own: each reward model's scores clipped to its ``clips`` bound (without
    the release noise) and mixed by ``router`` (MoR's router, or :class:`FixedRouter` for one client or
    the uniform mixture) on the reference ``features`` of each prompt. A policy that always gave the
    answer its reward ranks first would score this accuracy; GRPO's policy only moves towards it."""
    from torch.nn.functional import one_hot

    out: dict[str, float] = {}
    for fam in sorted({r["family"] for r in records}):
        idx = [i for i, r in enumerate(records) if r["family"] == fam]
        answers = list(get_family(fam).answers)
        images = [records[i]["image"] for i in idx for _ in answers]
        questions = [records[i]["question"] for i in idx for _ in answers]
        with torch.no_grad():
            scores = torch.stack([rm.score(images, questions, answers * len(idx)).clamp(-b, b)
                                  for rm, b in zip(rms, clips)], 1)
            reward = router.reward(features[idx].repeat_interleave(len(answers), 0), scores,
                                   torch.ones_like(scores, dtype=torch.bool)).reshape(len(idx), len(answers))
        right = torch.tensor([answers.index(records[i]["answer"]) for i in idx])
        others = reward.masked_fill(one_hot(right, len(answers)).bool(), float("-inf")).amax(1)
        out[fam] = float((reward.gather(1, right[:, None]).squeeze(1) > others).float().mean())
    out["mean"] = float(np.mean(list(out.values())))
    return out


# -- one track, one seed -----------------------------------------------------------------------------
@dataclass
class SeedRun:
    """Everything one (track, seed) shares across its methods."""

    track: Track
    seed: int
    work: Path  # work/<track>/s<seed>
    base_dir: Path  # the base policy (shared by a track and its -heldout variant)
    fedavg_rounds: int
    progress: bool
    cfg: RunConfig = field(init=False)
    server: dict = field(init=False)
    reference: object = field(init=False, default=None)
    features: torch.Tensor | None = field(init=False, default=None)
    eval_features: torch.Tensor | None = field(init=False, default=None)  # of the evaluation prompts (harness)
    client_rms: dict = field(init=False, default_factory=dict)  # (setting, client) -> RM read from its folder
    channels: dict = field(init=False, default_factory=dict)
    phases: dict = field(init=False, default_factory=dict)  # seconds (wall, CPU) per phase of the method running

    @contextlib.contextmanager
    def timed(self, name: str):
        """Add the wall and process-CPU seconds of the block to ``phases[name]``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            w, c = self.phases.get(name, (0.0, 0.0))
            self.phases[name] = (round(w + time.perf_counter() - wall, 2), round(c + time.process_time() - cpu, 2))

    def __post_init__(self) -> None:
        from mor_secure.data import make_server_sets

        data = self.track.cfg.to_dict()
        data["run"]["seed"] = self.seed
        self.cfg = parse_config(data, f"<{self.track.name} seed {self.seed}>")
        d = self.cfg.data
        self.server = make_server_sets(self.track.base, None, self.seed, d.image_size, d.public_prompts,
                                       d.objective_pairs, d.eval_prompts)
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def public(self) -> list[dict]:
        return self.server["public"]

    @property
    def max_tokens(self) -> int:
        return self.cfg.grpo.max_completion_length

    def base_policy(self):
        built = (self.base_dir / "complete").is_file()
        with self.timed("base policy" if built else "base policy (built)"):
            policy = build_base_policy(self.cfg, self.public, self.base_dir, progress=self.progress)
        if self.reference is None:
            from mor_secure.alignment.policy import prompt_features

            self.reference = policy
            self.reference.model.requires_grad_(False)
            self.features = prompt_features(policy, [r["image"] for r in self.public],
                                            [r["question"] for r in self.public])
            policy = load_policy(self.base_dir)
        return policy

    # -- client reward models, through the real ClientApp ------------------------------------------
    def clients(self, setting: str, *, family: str | None = None):
        """The channel to this setting's clients (folders made and RMs trained once)."""
        key = f"{setting}-{family}" if family else setting
        if key in self.channels:
            return self.channels[key]
        from mor_secure.deploy.client_init import init_client_folder
        from mor_secure.deploy.inproc import InProcessGrid
        from mor_secure.federation.channel import Channel
        from mor_secure.federation.client_app import make_client_app
        from mor_secure.federation.client_node import ClientNode

        cfg = client_config(self.cfg, setting, family=family)
        root = self.work / f"clients-{key}"
        run_id = f"bench-alignment-{self.track.name}-s{self.seed}-{key}"
        nodes = {}
        fedavg_done = (self.work / "fedavg_rm" / "complete").is_file()
        for i, c in enumerate(cfg.clients):
            folder = root / c.name
            finished = fedavg_done if family is not None else (folder / "rm" / "complete").is_file()
            if not finished:  # a run stopped mid-training: this client starts over with a fresh folder and ledger
                shutil.rmtree(folder, ignore_errors=True)
                init_client_folder(cfg, c.name, folder)
            if family is None and not finished:  # FedAvg clients train in rounds instead (fedavg_rm)
                with self.timed(f"RM training ({key})"):
                    ClientNode(folder).train(run_id, progress=self.progress)
            nodes[100 + i] = {"client-dir": str(folder.resolve())}
        if family is not None:
            self.channels[key] = (cfg, nodes)
            return self.channels[key]
        channel = Channel(InProcessGrid(make_client_app(), nodes), run_id, root / "events.jsonl", timeout_s=600)
        channel.train_all(timeout_s=600)
        torch.set_num_threads(_threads())
        if sorted(channel.clients) != sorted(c.name for c in cfg.clients):
            raise RuntimeError(f"{run_id}: clients {sorted(channel.clients)} answered; see {root / 'events.jsonl'}")
        self.channels[key] = (cfg, channel)
        return self.channels[key]

    def client_rm(self, setting: str, name: str):
        """Benchmark harness: client ``name``'s reward model at ``setting``, read from its folder once."""
        from mor_secure.rewards.reward_model import RewardModel

        key = (setting, name)
        if key not in self.client_rms:
            self.client_rms[key] = RewardModel.load(self.work / f"clients-{setting}" / name / "rm")
        return self.client_rms[key]

    def rm_digests(self, setting: str, names: Sequence[str]) -> dict[str, str]:
        """:func:`rm_digest` of each named client's reward model at ``setting`` (the ones a row scored with)."""
        return {n: rm_digest(self.client_rm(setting, n)) for n in names}

    def rm_accuracy(self, setting: str) -> dict[str, float]:
        """Benchmark harness: each client RM's pairwise accuracy on fresh held-out pairs of its own
        families (read from the client folders; never released by a client)."""
        from mor_secure.data import make_client_pairs
        from mor_secure.rewards.train import pairwise_accuracy

        cfg, _ = self.clients(setting)
        d = cfg.data
        out = {}
        for i, c in enumerate(cfg.clients):
            if d.heldout_pairs_per_client == 0:
                break
            pairs = make_client_pairs(d.track, list(c.families), d.heldout_pairs_per_client, seed=self.seed + 104729,
                                      image_size=d.image_size, foreign_fraction=0.0, client_index=i,
                                      n_clients=len(cfg.clients))
            out[c.name] = pairwise_accuracy(self.client_rm(setting, c.name), pairs)
        return out

    def answer_key_scorer(self):
        """Harness: a scorer giving 1 to a response whose first word is the oracle answer of its public
        prompt and 0 otherwise (the ``oracle`` reference row; the server's public prompts carry no
        answers, so the benchmark draws the same prompts again with theirs)."""
        from mor_secure.data import make_server_sets, oracle_correct

        d = self.cfg.data
        keyed = make_server_sets(self.track.base, None, self.seed, d.image_size, d.public_prompts, d.objective_pairs,
                                 d.eval_prompts, public_answers=True)["public"]
        if [r["question"] for r in keyed] != [r["question"] for r in self.public]:
            raise RuntimeError("the public prompts drawn again differ from the server's")
        key = {id(r["image"]): (k["family"], k["answer"]) for r, k in zip(self.public, keyed)}

        def scorer(images, questions, responses, index):
            s = np.array([[float(oracle_correct(*key[id(images[i])], r))] for r, i in zip(responses, index)])
            return s, np.ones_like(s, dtype=bool)

        return scorer

    def method_reward_top1(self, method: str, router=None) -> dict[str, float] | None:
        """:func:`reward_top1` of ``method``'s reward on this seed's evaluation prompts (None for the base
        policy). MoR uses ``router`` when given, else fits it again as :meth:`run_method` does."""
        if method in ("base", "oracle"):  # no reward model (the answer key ranks every answer right)
            return None
        self.base_policy()  # the reference (router features)
        ref = _eps_label(self.track.ref_epsilon)
        if method in ("centralized", "fedavg"):
            rm, _ = self.centralized_rm(ref) if method == "centralized" else self.fedavg_rm(ref)
            rms, clips, mixer = [rm], [self.cfg.clients[0].scores.clip_bound], FixedRouter([method])
        else:
            setting = rm_setting(method, ref)
            cfg, channel = self.clients(setting)
            names = row_clients(method, channel.clients)
            if method.startswith("mor:"):
                if router is None:
                    from mor_secure.federation.orchestrator import fit_router_on_objective

                    channel.order = names
                    router, _, _ = fit_router_on_objective(channel, self.reference, self.server["objective"], cfg,
                                                           progress=False)
                    torch.set_num_threads(_threads())
                mixer = router
            else:
                mixer = FixedRouter(names)
            by_name = {c.name: c for c in cfg.clients}
            rms = [self.client_rm(setting, n) for n in names]
            clips = [by_name[n].scores.clip_bound for n in names]
        with self.timed("reward ranking (harness)"):
            return reward_top1(rms, clips, mixer, self.evaluation_features(), self.server["eval"])

    def evaluation_features(self) -> torch.Tensor:
        """The evaluation prompts' router features under the reference (computed once per seed)."""
        from mor_secure.alignment.policy import prompt_features

        if self.eval_features is None:
            ev = self.server["eval"]
            self.eval_features = prompt_features(self.reference, [r["image"] for r in ev], [r["question"] for r in ev])
        return self.eval_features

    # -- GRPO and evaluation ------------------------------------------------------------------------
    def align(self, method: str, scorer, router, grpo_runs: Sequence[int] = (0,)) -> dict:
        """GRPO from the base policy once per GRPO run index ``g`` (sampling seed ``seed + GRPO_SEED_STRIDE * g``;
        run 0 uses the seed itself), each scored by the oracle; the row's accuracy is their mean."""
        from mor_secure.alignment.grpo import MixtureReward, build_dataset, run_grpo

        images, questions = [r["image"] for r in self.public], [r["question"] for r in self.public]
        dataset = build_dataset(images, questions, [r["family"] for r in self.public])
        runs = []
        for g in grpo_runs:
            policy = self.base_policy()
            reward = MixtureReward(scorer, router, self.features, images, questions)
            out_dir = self.work / f"grpo-{method.replace(':', '-')}"
            shutil.rmtree(out_dir, ignore_errors=True)
            torch.set_num_threads(_threads())
            with self.timed("GRPO"):
                history = run_grpo(policy, dataset, reward, self.cfg.grpo, out_dir=out_dir,
                                   seed=self.seed + GRPO_SEED_STRIDE * g, progress=self.progress)
            shutil.rmtree(out_dir, ignore_errors=True)
            rewards = [h["reward"] for h in history]
            k = max(1, len(rewards) // 10)
            with self.timed("evaluation"):
                accuracy = evaluate(policy, self.server["eval"], self.max_tokens)
            runs.append({"grpo_run": g, "accuracy": accuracy, "grpo_steps": len(history),
                         "reward_first": float(np.mean(rewards[:k])) if rewards else None,
                         "reward_last": float(np.mean(rewards[-k:])) if rewards else None,
                         "kl_last": history[-1]["kl"] if history else None})
        return with_runs({}, runs)

    def run_method(self, method: str, grpo_runs: Sequence[int] = (0,)) -> dict:
        """One method's row; ``grpo_runs``: the GRPO runs to make (see :meth:`align`). Each GRPO run
        records the :func:`rm_digest` of every reward model it scored with (``rm_digests``) and the
        machine it ran on, so runs joined from several processes say whether they used the same draws
        (a reward model trained again on another machine can differ)."""
        from mor_secure.bench.markdown import machine

        row = self._method_row(method, grpo_runs)
        digests, here = row.pop("rm_digests", None), machine()
        for run in row.get("grpo_runs", []):
            run["machine"] = here
            if digests is not None:
                run["rm_digests"] = digests
        if "grpo_runs" not in row:  # the base policy
            row["machine"] = here
        return row

    def _method_row(self, method: str, grpo_runs: Sequence[int]) -> dict:
        ref = _eps_label(self.track.ref_epsilon)
        if method == "base":
            policy = self.base_policy()
            return {"accuracy": evaluate(policy, self.server["eval"], self.max_tokens)}
        self.base_policy()  # reference and features first
        if method.startswith("single:") or method == "uniform":
            cfg, channel = self.clients(ref)
            names = row_clients(method, channel.clients)
            saved = channel.order
            channel.order = names
            try:
                row = self.align(method, channel_scorer(channel), FixedRouter(names), grpo_runs)
            finally:
                channel.order = saved
            return {**row, "epsilon": self.track.ref_epsilon, "reward_top1": self.method_reward_top1(method),
                    "rm_digests": self.rm_digests(ref, names)}
        if method.startswith("mor:"):
            from mor_secure.federation.orchestrator import fit_router_on_objective, router_weights_by_family

            setting = rm_setting(method, ref)
            cfg, channel = self.clients(setting)
            channel.order = sorted(channel.clients)
            with self.timed("router fit"):
                router, fit, _ = fit_router_on_objective(channel, self.reference, self.server["objective"], cfg,
                                                         progress=self.progress)
            torch.set_num_threads(_threads())
            weights = router_weights_by_family(router, self.reference, self.server["eval"],
                                              self.evaluation_features())
            row = self.align(method, channel_scorer(channel), router, grpo_runs)
            return {**row, "router_weights": weights, "router_objective_accuracy": fit.accuracy,
                    "rm_accuracy": self.rm_accuracy(setting), "reward_top1": self.method_reward_top1(method, router),
                    "rm_digests": self.rm_digests(setting, channel.order)}
        if method == "fedavg":
            rm, info = self.fedavg_rm(ref)
            c = self.cfg.clients[0].scores
            row = self.align(method, local_scorer(rm, c.clip_bound, c.noise_std, self.seed), FixedRouter(["fedavg"]),
                             grpo_runs)
            return {**row, **info, "reward_top1": self.method_reward_top1(method), "rm_digests": {"fedavg": rm_digest(rm)}}
        if method == "oracle":
            return self.align(method, self.answer_key_scorer(), FixedRouter(["oracle"]), grpo_runs)
        if method == "centralized":
            rm, info = self.centralized_rm(ref)
            c = self.cfg.clients[0].scores
            row = self.align(method, local_scorer(rm, c.clip_bound, 0.0, self.seed), FixedRouter(["centralized"]),
                             grpo_runs)
            return {**row, **info, "reward_top1": self.method_reward_top1(method),
                    "rm_digests": {"centralized": rm_digest(rm)}}
        raise ConfigError(f"unknown method {method!r}")

    def fedavg_rm(self, setting: str):
        """Flower's FedAvg strategy over an in-process grid of FedAvg ClientApps (see the module docstring)."""
        from flwr.app import ArrayRecord, ConfigRecord
        from flwr.serverapp.strategy import FedAvg

        from mor_secure.deploy.inproc import InProcessGrid
        from mor_secure.rewards.reward_model import RewardModel

        done = self.work / "fedavg_rm"
        cfg, nodes = self.clients(setting, family=self.cfg.policy.model.family)
        epochs = cfg.clients[0].training.epochs
        rounds = max(r for r in range(1, min(self.fedavg_rounds, epochs) + 1) if epochs % r == 0)
        info = {"fedavg_rounds": rounds, "local_epochs_per_round": epochs // rounds, "epsilon": self.track.ref_epsilon}
        if (done / "complete").is_file():
            rm = RewardModel.load(done)
        else:
            rm = shared_rm(cfg.clients[0].model, cfg.data.track, cfg.data.image_size, cfg.clients[0].training,
                           self.seed)
            grid = InProcessGrid(make_fedavg_client_app(self.seed), nodes)
            strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(nodes),
                              min_available_nodes=len(nodes))
            bar = tqdm(total=rounds, desc="FedAvg rounds", disable=not self.progress, leave=False)

            def after_round(rnd, arrays):
                if rnd:
                    bar.update(1)
                return None

            flwr_log = logging.getLogger("flwr")
            level = flwr_log.level
            flwr_log.setLevel(logging.ERROR)  # the strategy's per-round INFO lines would break the progress bars
            try:
                with self.timed("FedAvg training"):
                    result = strategy.start(
                        grid, ArrayRecord(torch_state_dict=trainable_state(rm)), num_rounds=rounds,
                        train_config=ConfigRecord({"rounds": rounds, "local-epochs": epochs // rounds,
                                                   "run-id": f"fedavg-{self.track.name}-s{self.seed}"}),
                        evaluate_fn=after_round)
            finally:
                flwr_log.setLevel(level)
            bar.close()
            torch.set_num_threads(_threads())
            if result.arrays is None or len(result.train_metrics_clientapp) != rounds:
                raise RuntimeError(f"FedAvg finished {len(result.train_metrics_clientapp)} of {rounds} rounds")
            load_trainable(rm, result.arrays.to_torch_state_dict())
            rm.save(done)
            (done / "complete").write_text("ok")
            info["bytes_per_round"] = (grid.bytes_down + grid.bytes_up) / rounds
        info["rm_accuracy"] = self._owned_accuracy(rm, cfg)
        return rm, info

    def centralized_rm(self, setting: str):
        """One RM of the policy's architecture, trained without DP on every client's pairs pooled."""
        from mor_secure.data import load_split
        from mor_secure.rewards.reward_model import RewardModel
        from mor_secure.rewards.train import TrainSettings, train_reward_model

        done = self.work / "centralized_rm"
        cfg, _ = self.clients(setting)
        if (done / "complete").is_file():
            rm = RewardModel.load(done)
        else:
            pairs = [p for c in cfg.clients for p in load_split(self.work / f"clients-{setting}" / c.name / "data")]
            t = cfg.clients[0].training
            rm = shared_rm(self.cfg.policy.model, cfg.data.track, cfg.data.image_size, t, self.seed)
            with self.timed("RM training (centralized)"):
                settings = TrainSettings(epochs=t.epochs, batch_size=t.batch_size, dp=False, seed=self.seed,
                                         **NON_PRIVATE_TRAINING)
                train_reward_model(rm, pairs, settings, progress=self.progress, desc="centralized RM")
            rm.save(done)
            (done / "complete").write_text("ok")
        return rm, {"rm_accuracy": self._owned_accuracy(rm, cfg)}

    def _owned_accuracy(self, rm, cfg: RunConfig) -> dict[str, float]:
        """Harness: a server-held RM's pairwise accuracy on each client's held-out pairs."""
        from mor_secure.data import make_client_pairs
        from mor_secure.rewards.train import pairwise_accuracy

        d = cfg.data
        if d.heldout_pairs_per_client == 0:
            return {}
        return {c.name: pairwise_accuracy(rm, make_client_pairs(
            d.track, list(c.families), d.heldout_pairs_per_client, seed=self.seed + 104729, image_size=d.image_size,
            foreign_fraction=0.0, client_index=i, n_clients=len(cfg.clients))) for i, c in enumerate(cfg.clients)}


def grpo_runs_of(row: dict) -> list[dict]:
    """The row's GRPO runs; a row stored before runs were counted is its own run 0."""
    if "grpo_runs" in row:
        return list(row["grpo_runs"])
    if "reward_first" not in row:  # no GRPO (the base policy)
        return []
    return [{"grpo_run": 0, **{k: row.get(k) for k in ("accuracy", "grpo_steps", "reward_first", "reward_last",
                                                          "kl_last")}}]


def with_runs(row: dict, runs: Sequence[dict]) -> dict:
    """``row`` with ``runs`` (sorted by run index) and, from them, the mean accuracy per family and overall
    and the mean reward and KL figures."""
    runs = sorted(runs, key=lambda r: r["grpo_run"])
    out = {**row, "grpo_runs": runs}
    keys = list(runs[0]["accuracy"])
    out["accuracy"] = {k: float(np.mean([r["accuracy"][k] for r in runs])) for k in keys}
    for k in ("reward_first", "reward_last", "kl_last"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["grpo_steps"] = runs[0].get("grpo_steps")
    return out


def missing_runs(rows: dict, method: str, n_runs: int) -> list[int]:
    """The GRPO runs (indices below ``n_runs``) of ``method`` not yet in this seed's ``rows``; the base
    policy has no GRPO and is measured once."""
    if method == "base":
        return [] if method in rows else [0]
    have = {r["grpo_run"] for r in grpo_runs_of(rows[method])} if method in rows else set()
    return [g for g in range(n_runs) if g not in have]


def merge_rows(old: dict, new: dict) -> dict:
    """A stored row and the further GRPO runs of the same (seed, method): runs joined, time added."""
    merged = with_runs({**new, **old}, grpo_runs_of(old) + grpo_runs_of(new))
    merged["seconds"] = round(old.get("seconds", 0.0) + new.get("seconds", 0.0), 1)
    merged["cpu_seconds"] = round(old.get("cpu_seconds", 0.0) + new.get("cpu_seconds", 0.0), 1)
    phases = {k: list(v) for k, v in old.get("phases", {}).items()}
    for k, (w, c) in new.get("phases", {}).items():
        pw, pc = phases.get(k, (0.0, 0.0))
        phases[k] = [round(pw + w, 2), round(pc + c, 2)]
    merged["phases"] = phases
    return merged


def merge_results(path: Path, others: Sequence[Path]) -> dict:
    """Join into the results file ``path`` the rows of ``others`` (results files of processes that ran
    other seeds or methods with ``--first-seed``, ``--seeds`` and ``--methods``) and save it.

    A track joins only where it was measured under the same settings (the same fingerprint). A row
    already in ``path`` with the same finish time is the same measurement; a (seed, method) measured
    in both with different GRPO runs is joined run by run (``merge_rows``); the same GRPO run measured
    twice is refused, as is a track under other settings: nothing is written then."""
    results = load_results(path)
    for other in others:
        if not Path(other).is_file():
            raise ConfigError(f"--merge {other}: no such results file")
        data = json.loads(Path(other).read_text())
        if data.get("version") != RESULTS_VERSION:
            raise ConfigError(f"--merge {other}: results version {data.get('version')!r}, this code writes "
                              f"{RESULTS_VERSION}; run its rows again with this code")
        for name, theirs in data["tracks"].items():
            mine = results["tracks"].get(name)
            if mine is None:
                results["tracks"][name] = theirs
                continue
            if mine["fingerprint"] != theirs["fingerprint"]:
                raise ConfigError(f"--merge {other}: track {name} was measured under other settings than in {path} "
                                  f"(fingerprint {theirs['fingerprint']}, not {mine['fingerprint']}: another config, "
                                  "--grpo-steps, --quick, --set or FedAvg rounds); merge it into a results file of "
                                  "its own settings")
            for seed, rows in theirs["seeds"].items():
                kept = mine["seeds"].setdefault(seed, {})
                for method, row in rows.items():
                    mine.get("failed", {}).get(seed, {}).pop(method, None)  # measured now, in the other file
                    if method not in kept:
                        kept[method] = row
                        continue
                    if kept[method].get("finished") == row.get("finished"):
                        continue
                    ours = {r["grpo_run"] for r in grpo_runs_of(kept[method])}
                    new_runs = {r["grpo_run"] for r in grpo_runs_of(row)}
                    if not ours or not new_runs or ours & new_runs:
                        what = f"GRPO run(s) {sorted(ours & new_runs)} of" if ours & new_runs else "the row"
                        raise ConfigError(f"--merge {other}: track {name} seed {seed}: {what} {method} measured in "
                                          f"both files; keep one (remove it from the other file) and merge again")
                    kept[method] = merge_rows(kept[method], row)
            for seed, failures in theirs.get("failed", {}).items():
                for method, failure in failures.items():
                    if method not in mine["seeds"].get(seed, {}):
                        mine.setdefault("failed", {}).setdefault(seed, {})[method] = failure
            for command in theirs.get("commands", []):
                if command not in mine.setdefault("commands", []):
                    mine["commands"].append(command)
    save_results(path, results)
    return results


# -- the whole benchmark -----------------------------------------------------------------------------
@dataclass
class Options:
    tracks: Sequence[str] = ("shapes", "digits", "shapes-heldout", "digits-heldout")
    seeds: int = 3
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (parts of the benchmark in parallel)
    methods: Sequence[str] = METHOD_KINDS
    epsilons: Sequence[float] = DEFAULT_EPSILONS
    grpo_steps: int | None = None
    fedavg_rounds: int = 5
    quick: bool = False
    configs: dict = field(default_factory=dict)  # track -> config path (default DEFAULT_CONFIGS)
    overrides: Sequence[str] = ()  # --set items for every track's config
    work_dir: Path = Path("runs/bench-alignment")
    results: Path = Path("benchmarks/alignment_results.json")
    fresh: bool = False
    progress: bool = True
    grpo_runs: int = 1  # GRPO runs per (seed, method), each with its own sampling seed


def run_bench(opts: Options, *, command: str = "mor-secure bench alignment",
              on_row: Callable[[dict], None] | None = None) -> dict:
    """Run every (track, seed, method) still missing from ``opts.results``; returns the results.

    The results file is rewritten after every method. Rows measured under other settings (a
    different config, --quick, --grpo-steps or FedAvg rounds) are discarded, with the work folder
    of that track."""
    from mor_secure.quiet import quiet_libraries

    if opts.grpo_runs < 1:
        raise ConfigError(f"--grpo-runs {opts.grpo_runs}: at least 1 GRPO run per seed and method")
    if opts.first_seed < 0 or opts.seeds < 1:
        raise ConfigError(f"--first-seed {opts.first_seed} --seeds {opts.seeds}: the first seed is 0 or more and "
                          "at least 1 seed runs")
    quiet_libraries()
    torch.set_num_threads(_threads())
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    with calibration_once():
        return _run_bench(opts, command, on_row)


@contextlib.contextmanager
def calibration_once():
    """Shared pure computations (see also :func:`base_model`, which client folders' backbones use
    here too): DP-SGD noise calibration (seconds of accountant search, a pure function of the number of
    records, epsilon, delta, epochs, batch size and clipping norm) computed once per distinct
    setting in this process: the clients of one privacy setting, and FedAvg's rounds, share it.
    The result is exactly what each client would compute; nothing else changes."""
    from unittest import mock

    from mor_secure.federation import client_node

    with dpsgd_plans_once(), mock.patch.object(client_node, "build_base_model", base_model):
        yield


def _run_bench(opts: Options, command: str, on_row) -> dict:
    results = {"version": RESULTS_VERSION, "tracks": {}} if opts.fresh else load_results(opts.results)
    tracks = [load_track(t, opts.configs.get(t.split("-")[0]), quick=opts.quick, grpo_steps=opts.grpo_steps,
                         overrides=opts.overrides) for t in opts.tracks]
    for track in tracks:
        fp = track.fingerprint({"fedavg_rounds": opts.fedavg_rounds, "quick": opts.quick})
        methods = expand_methods(list(opts.methods), track.clients, opts.epsilons, track.ref_epsilon)
        entry = results["tracks"].get(track.name)
        work = Path(opts.work_dir) / track.name
        if entry is None or entry.get("fingerprint") != fp:
            if entry is not None:
                print(f"{track.name}: settings changed since the stored results; measuring again", flush=True)
            entry = {"fingerprint": fp, "seeds": {}}
        # reward models and base policies on disk are reused when only the router or GRPO settings changed
        work_fp, marker = _work_fingerprint(track, opts), work / "work_fingerprint"
        if not marker.is_file() or marker.read_text() != work_fp:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            marker.write_text(work_fp)
        entry.update(config=track.config_path, data_track=track.base, heldout=list(track.heldout),
                     families=[f.name for f in _families(track.base)], clients={
                         c.name: {"model": c.model.family, "families": list(c.families)} for c in track.cfg.clients},
                     ref_epsilon=track.ref_epsilon, settings=_settings(track, opts))
        if command not in entry.setdefault("commands", []):
            entry["commands"].append(command)
        results["tracks"][track.name] = entry
        save_results(opts.results, results)
        for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
            rows = entry["seeds"].setdefault(str(seed), {})
            todo = [m for m in run_order(methods, track.ref_epsilon) if missing_runs(rows, m, opts.grpo_runs)]
            if not todo:
                continue
            base_dir = Path(opts.work_dir) / track.base / f"s{seed}" / "policy_base"
            run = SeedRun(track, seed, work / f"s{seed}", base_dir, opts.fedavg_rounds, opts.progress)
            with tqdm(todo, desc=f"{track.name} seed {seed}", disable=not opts.progress, unit="method") as bar:
                for method in bar:
                    bar.set_postfix_str(method)
                    start, cpu = time.perf_counter(), time.process_time()
                    run.phases = {}
                    failures = entry.setdefault("failed", {}).setdefault(str(seed), {})
                    needed = missing_runs(rows, method, opts.grpo_runs)
                    try:
                        row = run.run_method(method, needed)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as exc:  # noqa: BLE001 - one method's failure must not lose the others
                        log.exception("%s seed %d %s failed", track.name, seed, method)
                        failures[method] = {"error": f"{type(exc).__name__}: {exc}",
                                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                        save_results(opts.results, results)
                        tqdm.write(f"  {track.name} seed {seed} {method_label(method)}: FAILED ({type(exc).__name__}: "
                                   f"{exc}); the other methods go on, a rerun tries it again")
                        continue
                    failures.pop(method, None)
                    row["seconds"] = round(time.perf_counter() - start, 1)
                    row["cpu_seconds"] = round(time.process_time() - cpu, 1)
                    row["phases"] = dict(run.phases)
                    row["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
                    rows[method] = merge_rows(rows[method], row) if method in rows else row
                    save_results(opts.results, results)
                    if on_row is not None:
                        on_row({"track": track.name, "seed": seed, "method": method, **row})
                    if opts.progress:
                        acc = row["accuracy"]
                        tqdm.write(f"  {track.name} seed {seed} {method_label(method)}: mean {100 * acc['mean']:.1f}% "
                                   f"({row['seconds']:.0f} s)")
    return results


def _work_fingerprint(track: Track, opts: Options) -> str:
    """What the track's work folder (client data and RMs, base policies) was made under."""
    return track.fingerprint({"fedavg_rounds": opts.fedavg_rounds, "quick": opts.quick}, work=True)


def _work_on_disk(work: Path, method: str, ref: str, clients: Sequence[str]) -> bool:
    """Whether the reward models ``method`` scores with are in the seed's work folder ``work``."""
    if method in ("centralized", "fedavg"):
        return (work / f"{method}_rm" / "complete").is_file()
    setting = rm_setting(method, ref)
    return all((work / f"clients-{setting}" / c / "rm" / "complete").is_file() for c in clients)


def fill_reward_top1(opts: Options) -> dict:
    """Add the reward-ranking diagnostic (:func:`reward_top1`) to stored rows that lack it, from the
    base policies and reward models in the work folder: no GRPO runs, no training (a row whose reward
    models are no longer there is left as it is and named). MoR's router is fitted again from the
    clients' noised scores of the objective set, as the row's own run fitted it."""
    from mor_secure.quiet import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(_threads())
    results = load_results(opts.results)
    with calibration_once():
        for name in opts.tracks:
            entry = results["tracks"].get(name)
            if entry is None:
                continue
            track = load_track(name, opts.configs.get(name.split("-")[0]), quick=opts.quick,
                               grpo_steps=opts.grpo_steps, overrides=opts.overrides)
            work = Path(opts.work_dir) / track.name
            marker = work / "work_fingerprint"
            if not marker.is_file() or marker.read_text() != _work_fingerprint(track, opts):
                print(f"{name}: the work folder {work} does not hold this track's reward models; skipped", flush=True)
                continue
            ref = _eps_label(track.ref_epsilon)
            for seed, rows in sorted(entry["seeds"].items()):
                todo = [m for m, r in rows.items() if m != "base" and "reward_top1" not in r]
                base_dir = Path(opts.work_dir) / track.base / f"s{seed}" / "policy_base"
                gone = [m for m in todo if not (base_dir / "complete").is_file()
                        or not _work_on_disk(work / f"s{seed}", m, ref, track.clients)]
                if gone:
                    print(f"{name} seed {seed}: reward models not on disk for {', '.join(gone)}; left without "
                          "the reward ranking", flush=True)
                todo = [m for m in todo if m not in gone]
                if not todo:
                    continue
                run = SeedRun(track, int(seed), work / f"s{seed}", base_dir, opts.fedavg_rounds, opts.progress)
                for method in tqdm(todo, desc=f"{name} seed {seed}: reward ranking", disable=not opts.progress):
                    rows[method]["reward_top1"] = run.method_reward_top1(method)
                    save_results(opts.results, results)
    return results


def get_family(name: str):
    from mor_secure.data import get_family as _get

    return _get(name)


def chance(family: str) -> float:
    """Oracle accuracy of an answer drawn uniformly from ``family``'s answers."""
    return 1.0 / len(get_family(family).answers)


def _families(track: str):
    from mor_secure.data import families_for_track

    return families_for_track(track)


def _settings(track: Track, opts: Options) -> dict:
    cfg = track.cfg
    c0 = cfg.clients[0]
    return {"pairs_per_client": cfg.data.pairs_per_client, "epochs": c0.training.epochs,
            "batch_size": c0.training.batch_size, "public_prompts": cfg.data.public_prompts,
            "objective_pairs": cfg.data.objective_pairs, "eval_prompts": cfg.data.eval_prompts,
            "grpo_steps": cfg.grpo.steps, "prompts_per_step": cfg.grpo.prompts_per_step,
            "num_generations": cfg.grpo.num_generations, "beta": cfg.grpo.beta, "grpo_lr": cfg.grpo.lr,
            "fedavg_rounds": opts.fedavg_rounds, "quick": opts.quick, "delta": c0.privacy.delta,
            "noise_std": c0.scores.noise_std, "clip_bound": c0.scores.clip_bound,
            "perception_steps": cfg.policy.model.perception.steps,
            "client_perception_steps": max(c.model.perception.steps for c in cfg.clients),
            # only when not the default, as in the fingerprint (LATER_FIELDS): stored settings stay comparable
            **({"steps_per_generation": cfg.grpo.steps_per_generation} if cfg.grpo.steps_per_generation != 1 else {})}


#: settings added after results were stored, with the value every stored result ran with (LATER_FIELDS)
SETTING_DEFAULTS = {key: default for (_, key), default in LATER_FIELDS.items()}


def _setting(entry: dict, key: str):
    return entry["settings"].get(key, SETTING_DEFAULTS.get(key))


def stored_track(name: str, entry: dict, *, quick: bool = False):
    """The track a stored results entry names, from its config as that file reads today (a relative path
    stored from the repository's root is found from elsewhere too); ConfigError when it cannot be read."""
    config = Path(entry["config"])
    if not config.is_file():
        config = Path(__file__).resolve().parents[2] / entry["config"]
    return load_track(name, str(config), quick=quick)


def reproducible_commands(name: str, entry: dict) -> list[str]:
    """The track's stored commands, each with ``--grpo-steps`` added when it names none and its rows ran
    at another GRPO budget than the track's config now sets (a command run before the config changed)."""
    commands = entry.get("commands", [])
    settings = entry.get("settings", {})
    steps = settings.get("grpo_steps")
    if steps is None or "config" not in entry:
        return list(commands)
    try:
        now = stored_track(name, entry, quick=bool(settings.get("quick"))).cfg.grpo.steps
    except ConfigError:
        return list(commands)
    if steps == now:
        return list(commands)
    def names_budget(command: str) -> bool:
        return "grpo.steps=" in command or any(w == "--grpo-steps" or w.startswith("--grpo-steps=")
                                               for w in command.split())

    return [c if names_budget(c) else f"{c} --grpo-steps {steps}" for c in commands]


def _per_seed_at_config_size(name: str, entry: dict) -> float | None:
    """Wall seconds one seed of this track takes at its config's sizes: measured when this run used
    them and every method ran, scaled by :func:`full_size_estimate` otherwise."""
    est = full_size_estimate(name, entry)
    if est is not None:
        return est["wall_per_seed"]
    every = set(expand_methods(METHOD_KINDS, list(entry["clients"]), DEFAULT_EPSILONS, entry["ref_epsilon"]))
    full = [rows for rows in entry["seeds"].values() if every <= set(rows) and all("phases" in r for r in rows.values())]
    if not full:
        return None
    return float(np.mean([sum(r["seconds"] for r in rows.values()) for rows in full]))


def full_size_estimate(name: str, entry: dict) -> dict | None:
    """What this track's measured rows would take at its config's own sizes, scaled phase by phase
    from the measured wall and CPU seconds: reward-model training by pair passes (pairs x epochs),
    GRPO by completions (steps x prompts x samples), perception by steps; evaluation and the router
    fit as measured. ``None`` when the run used the config's sizes (nothing to scale)."""
    s = entry.get("settings", {})
    if "perception_steps" not in s:
        return None
    try:
        full = _settings(stored_track(name, entry), Options(fedavg_rounds=s["fedavg_rounds"]))
    except ConfigError:
        return None
    scale = {
        "rm": (full["pairs_per_client"] * full["epochs"]) / (s["pairs_per_client"] * s["epochs"]),
        "grpo": (full["grpo_steps"] * full["prompts_per_step"] * full["num_generations"])
        / (s["grpo_steps"] * s["prompts_per_step"] * s["num_generations"]),
        "perception": max(1.0, full["perception_steps"] / max(1, s["perception_steps"])),
    }
    if all(abs(v - 1.0) < 1e-9 for v in scale.values()):
        return None

    def factor(phase: str) -> float:
        if phase.startswith(("RM training", "FedAvg training")):
            return scale["rm"]
        if phase == "GRPO":
            return scale["grpo"]
        if phase == "base policy (built)":
            return scale["perception"]
        return 1.0

    wall = cpu = 0.0
    measured = 0.0
    for rows in entry["seeds"].values():
        for row in rows.values():
            for phase, (w, c) in row.get("phases", {}).items():
                wall += w * factor(phase)
                cpu += c * factor(phase)
            measured += row.get("seconds", 0.0)
    seeds = max(1, len(entry["seeds"]))
    return {"scale": scale, "wall_per_seed": wall / seeds, "cpu_per_seed": cpu / seeds,
            "measured_per_seed": measured / seeds, "full": full}


# -- tables --------------------------------------------------------------------------------------------
def _stat(values: Sequence[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)


def _pct(mean: float, std: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "—"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 and math.isfinite(std) else f"{100 * mean:.1f}"


def display_order(methods: Sequence[str]) -> list[str]:
    def key(m: str) -> tuple:
        kind = m.split(":")[0]
        if m == "mor:nodp":
            return (METHOD_KINDS.index("mor"), -math.inf)
        if m.startswith("mor:eps"):
            return (METHOD_KINDS.index("mor"), float(m[len("mor:eps"):]))
        if m == "oracle":  # a reference beside the upper bound
            return (METHOD_KINDS.index("centralized") + 0.5, m)
        return (METHOD_KINDS.index(kind) if kind in METHOD_KINDS else 99, m)

    return sorted(methods, key=key)


def summarise(entry: dict) -> dict[str, dict]:
    """Per method: {family or "mean": (mean, std, n)} over the seeds that measured it."""
    methods = display_order({m for rows in entry["seeds"].values() for m in rows})
    out = {}
    for m in methods:
        rows = [rows[m] for rows in entry["seeds"].values() if m in rows]
        keys = list(entry["families"]) + ["mean"]
        out[m] = {k: _stat([r["accuracy"].get(k) for r in rows]) for k in keys}
        out[m]["_seeds"] = len(rows)
        runs = [grpo_runs_of(r) for r in rows]
        out[m]["_runs"] = sum(len(x) for x in runs)
        # GRPO's own spread: the std of the overall accuracy over one seed's runs, averaged over seeds
        spreads = [float(np.std([x["accuracy"]["mean"] for x in rs], ddof=1)) for rs in runs if len(rs) > 1]
        out[m]["_grpo_spread"] = float(np.mean(spreads)) if spreads else None
        out[m]["_seconds"] = sum(r.get("seconds", 0.0) for r in rows)
    return out


def router_weights(entry: dict, method: str) -> dict[str, dict[str, float]]:
    """Mean router weight per (family, client) over the seeds, for a MoR row."""
    acc: dict[str, dict[str, list[float]]] = {}
    for rows in entry["seeds"].values():
        for fam, weights in rows.get(method, {}).get("router_weights", {}).items():
            for client, w in weights.items():
                acc.setdefault(fam, {}).setdefault(client, []).append(w)
    return {fam: {c: float(np.mean(v)) for c, v in ws.items()} for fam, ws in acc.items()}


def _owners(entry: dict) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for name, c in entry["clients"].items():
        for fam in c["families"]:
            owners.setdefault(fam, []).append(name)
    return owners


def paired_difference(entry: dict, a: str, b: str) -> tuple[float, float, int]:
    """Overall accuracy of ``a`` minus ``b`` over the seeds that measured both (the same data, reward
    models and base policy within a seed): (mean, its standard error, seeds), in points."""
    diffs = [100 * (rows[a]["accuracy"]["mean"] - rows[b]["accuracy"]["mean"])
             for rows in entry["seeds"].values() if a in rows and b in rows]
    if not diffs:
        return math.nan, math.nan, 0
    se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
    return float(np.mean(diffs)), se, len(diffs)


def targets(entry: dict) -> list[str]:
    """The issue's targets for MoR at the config's epsilon, checked on the overall mean; each
    difference also with its paired standard error over seeds and whether twice that resolves it."""
    s = summarise(entry)
    ref = f"mor:{_eps_label(entry['ref_epsilon'])}"
    if ref not in s:
        return []

    def versus(other: str) -> tuple[float, str]:
        d, se, n = paired_difference(entry, ref, other)
        if n < 2 or not math.isfinite(se):
            return d, f"{d:+.1f} points ({n} seed)"
        resolved = "resolved" if abs(d) > 2 * se else "not resolved"
        return d, f"{d:+.1f} ± {se:.1f} points (paired over {n} seeds; {resolved} at twice the standard error)"

    lines = []
    if "uniform" in s:
        d, text = versus("uniform")
        lines.append(f"MoR at ε = {entry['ref_epsilon']:g} minus the uniform mixture: {text} "
                     f"(target ≥ +5: {'met' if d >= 5 else 'missed'})")
    singles = {m: v["mean"][0] for m, v in s.items() if m.startswith("single:")}
    if singles:
        best = max(singles, key=singles.get)
        d, text = versus(best)
        unmeasured = [c for c in entry["clients"] if f"single:{c}" not in s]
        verdict = ("met" if d > 0 else "missed") if not unmeasured else (
            f"not checked, no row for {', '.join(unmeasured)}; {'above' if d > 0 else 'not above'} the "
            f"{'one' if len(singles) == 1 else 'best'} measured")
        lines.append(f"MoR minus the best single-client RM ({best.split(':', 1)[1]}): {text} "
                     f"(target > 0 against every single client: {verdict})")
    if "centralized" in s:
        d, text = versus("centralized")
        lines.append(f"MoR minus the centralized non-private RM: {text} (target ≥ −5: {'met' if d >= -5 else 'missed'})")
    if "base" in s:
        lines.append(f"MoR minus the base policy: {versus('base')[1]}")
    return lines


def reading(entry: dict) -> list[str]:
    """Facts that explain the table, computed from the results: the evaluation's resolution, where
    the router puts its weight, how good the clients' reward models are, what MoR changed per family."""
    s = summarise(entry)
    out: list[str] = []
    n_eval, fams = entry["settings"]["eval_prompts"], list(entry["families"])
    seeds = max(1, len(entry["seeds"]))
    se_all = 100 * math.sqrt(0.25 / (n_eval * seeds))
    se_fam = 100 * math.sqrt(0.25 / (n_eval / len(fams) * seeds))
    out.append(f"Resolution: {n_eval} evaluation prompts ({n_eval // len(fams)} per family) × {seeds} seed(s): the "
               f"standard error of an overall accuracy is up to {se_all:.1f} points, of one family's up to "
               f"{se_fam:.1f}; differences under about twice that are not resolved.")
    spread = {m: v["_grpo_spread"] for m, v in s.items() if v.get("_grpo_spread") is not None}
    if spread:
        out.append("GRPO's own spread: the same base policy, reward models and router, sampled with another seed, "
                   "move a seed's overall accuracy by " + ", ".join(
                       f"{100 * v:.1f} ({method_label(m)}, {s[m]['_runs']} runs)" for m, v in spread.items())
                   + " points (std between one seed's runs, mean over seeds); rows with one run per seed carry "
                     "this noise unaveraged.")
    ref = f"mor:{_eps_label(entry['ref_epsilon'])}"
    owners = _owners(entry)
    w = router_weights(entry, ref)
    own = {f: sum(w[f].get(c, 0.0) for c in owners.get(f, [])) for f in fams if f in w and owners.get(f)}
    if own:
        weak = [f"{f} ({v:.2f})" for f, v in own.items() if v < 0.5]
        out.append(f"Router (MoR at ε = {entry['ref_epsilon']:g}): the owning client gets {min(own.values()):.2f} to "
                   f"{max(own.values()):.2f} of the weight on its families (mean {np.mean(list(own.values())):.2f})"
                   + (f"; less than half on {', '.join(weak)}." if weak else "."))
    for f in entry.get("heldout", []):
        if f not in w or not w[f]:
            continue
        top = max(w[f], key=w[f].get)
        accs_f = ", ".join(f"{method_label(m)} {100 * s[m][f][0]:.0f}%" for m in (ref, "uniform", "base") if m in s)
        ranks = [rows[ref]["reward_top1"][f] for rows in entry["seeds"].values() if rows.get(ref, {}).get("reward_top1")]
        out.append(f"Held-out family {f} (owned by no client): the router gives {top} {w[f][top]:.2f} of the weight "
                   "there (mean over seeds), fitted on the objective set's pairs of a family no client's reward model "
                   f"was trained on. Accuracy on {f}: {accs_f} (chance "
                   f"{100 * chance(f):.0f}%)"
                   + (f"; MoR's reward ranks its oracle answer first on {100 * np.mean(ranks):.0f}% of its prompts"
                      if ranks else "") + ".")
        others = {m: r[f] for m, r in reward_ranks(entry).items() if m != ref and f in r}
        singles = {m.split(":", 1)[1]: v for m, v in others.items() if m.startswith("single:")}
        if others:
            line = (f"How well each reward knows {f} (the share of its prompts on which the reward ranks the oracle "
                    "answer first, mean over seeds): " + ", ".join(f"{method_label(m)} {100 * v:.0f}%"
                                                                  for m, v in others.items()) + ".")
            if singles:
                best = max(singles, key=singles.get)
                line += (f" A router can only choose among the clients' rewards: the best of them on {f} is {best}'s "
                         f"({100 * singles[best]:.0f}%), and the router gives {best} {w[f].get(best, 0.0):.2f} of the "
                         "weight there" + (f" ({top}'s reward: {100 * singles[top]:.0f}%)."
                                           if top != best and top in singles else "."))
            out.append(line)
    accs: dict[str, list[float]] = {}
    for rows in entry["seeds"].values():
        for c, a in (rows.get(ref, {}).get("rm_accuracy") or {}).items():
            accs.setdefault(c, []).append(a)
    if accs:
        out.append(f"Client reward models at ε = {entry['ref_epsilon']:g}, pairwise accuracy on held-out pairs of their "
                   "own families: " + ", ".join(f"{c} {100 * np.mean(v):.0f}%" for c, v in accs.items()) + ".")
    if "oracle" in s:
        o = s["oracle"]
        above = [method_label(m) for m in s if m not in ("base", "oracle") and s[m]["mean"][0] > o["mean"][0]]
        out.append(f"Answer key as a 0/1 reward (reference): {100 * o['mean'][0]:.1f}% overall (" + ", ".join(
            f"{f} {100 * o[f][0]:.0f}" for f in fams) + f"; {o['_seeds']} seed(s), {o['_runs']} GRPO run(s)). It is "
            "never wrong, but it scores every wrong answer alike, so a prompt none of whose samples is right gives "
            "GRPO nothing to learn from; a reward model's graded scores also rank the wrong answers. "
            + (f"Rows above it here: {', '.join(above)}." if above else "No reward-model row is above it here."))
    both = [rows for rows in entry["seeds"].values()
            if all(m in rows and rows[m].get("reward_top1") for m in (ref, "uniform"))]
    if both:
        def avg(m: str, key: str) -> float:
            return 100 * float(np.mean([rows[m][key]["mean"] for rows in both]))

        r_mor, r_uni, a_mor, a_uni = avg(ref, "reward_top1"), avg("uniform", "reward_top1"), avg(ref, "accuracy"), \
            avg("uniform", "accuracy")
        out.append(f"Reward against policy ({len(both)} seed(s) with both rankings): MoR at ε = {entry['ref_epsilon']:g}'s "
                   f"reward ranks the oracle answer first on {r_mor:.1f}% of the evaluation prompts, the uniform "
                   f"mixture's on {r_uni:.1f}% ({r_mor - r_uni:+.1f} points); after {entry['settings']['grpo_steps']} "
                   f"GRPO steps their policies score {a_mor:.1f}% and {a_uni:.1f}% ({a_mor - a_uni:+.1f}), "
                   f"{r_mor - a_mor:.1f} and {r_uni - a_uni:.1f} points below their reward's ranking.")
    if ref in s and "base" in s:
        up = [f"{f} {100 * (s[ref][f][0] - s['base'][f][0]):+.0f}" for f in fams
              if s[ref][f][0] - s["base"][f][0] > 2 * se_fam / 100]
        down = [f"{f} {100 * (s[ref][f][0] - s['base'][f][0]):+.0f}" for f in fams
                if s["base"][f][0] - s[ref][f][0] > 2 * se_fam / 100]
        out.append(f"MoR at ε = {entry['ref_epsilon']:g} against the base policy, families moved by more than twice "
                   f"their standard error: {', '.join(up) or 'none up'}" + (f"; down: {', '.join(down)}" if down else "")
                   + " (points).")
    return out


def rm_draws(entry: dict) -> str:
    """One sentence on whether the GRPO runs of each seed that share a reward model scored with the
    same draw of it (:func:`rm_digest`, recorded per run); empty when no run recorded digests."""
    recorded = unrecorded = 0
    split = []
    for seed, rows in sorted(entry["seeds"].items(), key=lambda kv: int(kv[0])):
        by_rm: dict[str, dict[str, list[str]]] = {}
        for m, r in rows.items():
            runs = grpo_runs_of(r) if m != "oracle" else []
            for run in runs:
                if "rm_digests" not in run:
                    unrecorded += 1
                    continue
                recorded += 1
                label = method_label(m) + (f" (GRPO run {run['grpo_run']})" if len(runs) > 1 else "")
                for name, digest in run["rm_digests"].items():
                    by_rm.setdefault(name, {}).setdefault(digest, []).append(label)
        for name, draws in sorted(by_rm.items()):
            if len(draws) > 1:
                split.append(f"seed {seed}, {name}: " + " vs ".join(", ".join(ms) for ms in draws.values()))
    if not recorded:
        return ""
    head = (f"Reward-model draws (a digest of each reward model's state, recorded by {recorded} GRPO runs"
            + (f"; {unrecorded} older runs did not record it" if unrecorded else "") + "): ")
    if not split:
        return head + "within every seed, the runs that scored with the same reward model used the same draw of it."
    return head + ("runs of one seed scored with different draws of the same reward model (trained again; their "
                   "paired difference includes that retraining's variance): " + "; ".join(split) + ".")


def _reused_work(entry: dict) -> str:
    """The shared work (base policy, reward models) no row of ``entry`` timed: it was on disk already."""
    # (a training phase of well under a second only opened reward models already on disk)
    phases = {ph for rows in entry["seeds"].values() for r in rows.values()
              for ph, (wall, _) in r.get("phases", {}).items() if wall >= 1.0 or not ph.startswith("RM training")}
    methods = {m for rows in entry["seeds"].values() for m in rows}
    ref = _eps_label(entry["ref_epsilon"])
    need = {}
    if methods:
        need["the base policy"] = "base policy (built)"
    for m in methods:
        if m.startswith("mor:"):
            setting = m.split(":", 1)[1]
            need[f"the clients' reward models ({setting})"] = f"RM training ({setting})"
        elif m.startswith("single:") or m == "uniform":
            need[f"the clients' reward models ({ref})"] = f"RM training ({ref})"
        elif m == "fedavg":
            need["the FedAvg reward model"] = "FedAvg training"
        elif m == "centralized":
            need["the centralized reward model"] = "RM training (centralized)"
    return ", ".join(sorted(what for what, phase in need.items() if phase not in phases))


def other_budget_files(results_path: Path) -> list[tuple[Path, Path | None]]:
    """Results files of other GRPO step budgets or schedules beside ``results_path``: those whose name
    extends its name with ``_`` and a budget (``alignment_results.json`` lists
    ``alignment_results_400steps.json`` and ``alignment_results_800steps_k4.json``; a file
    ``alignment_results_800steps.json`` would list only the latter, which lists none), each with its
    page (``alignment_400steps.md``) when that exists."""
    results_path = Path(results_path)
    found = []
    for path in sorted(results_path.parent.glob(f"{results_path.stem}_*.json")):
        if "steps" not in path.stem[len("alignment_results"):]:
            continue  # another variant of the benchmark (e.g. a router setting), not a step budget
        page = path.with_name("alignment_" + path.stem[len("alignment_results_"):] + ".md")
        found.append((path, page if page.is_file() else None))
    return found


def _budget_name(entry: dict) -> str:
    k = _setting(entry, "steps_per_generation")
    return f"{entry['settings']['grpo_steps']} GRPO steps" + (f", {k} per reward round trip" if k != 1 else "")


def _run_digests(row: dict) -> dict:
    return {k: v for run in grpo_runs_of(row) for k, v in (run.get("rm_digests") or {}).items()}


def same_reward_models(a: dict, b: dict) -> tuple[bool | None, str]:
    """Whether two rows scored with the same reward models: by their digests when both recorded them,
    else by the reward models' held-out accuracies when both did; (None, "") when neither tells."""
    da, db = _run_digests(a), _run_digests(b)
    if da and db:
        return da == db, "digest"
    ra, rb = a.get("rm_accuracy"), b.get("rm_accuracy")
    if ra and rb:
        return ra == rb, "held-out accuracy"
    return None, ""


def paired_across(mine: dict, theirs: dict, method: str) -> list[str]:
    """``method`` in ``theirs`` minus in ``mine``, paired by seed, with how many seeds' rows scored with
    the same reward models (then the difference is the GRPO budget's or schedule's alone)."""
    common = [s for s, rows in mine["seeds"].items() if method in rows and method in theirs["seeds"].get(s, {})]
    if not common:
        return []
    joined = {"seeds": {s: {"a": theirs["seeds"][s][method], "b": mine["seeds"][s][method]} for s in common}}
    mean, se, n = paired_difference(joined, "a", "b")
    checks = [same_reward_models(mine["seeds"][s][method], theirs["seeds"][s][method]) for s in common]
    told = [(same, how) for same, how in checks if same is not None]
    hows = sorted({how for _, how in told})
    yes = sum(x for x, _ in told)
    same = ("whether they used the same reward models is not recorded" if not told else
            f"the same reward models in {yes} of {n} seeds (by {' or '.join(hows)})" if len(told) == n else
            f"the same reward models in {yes} of the {len(told)} seed(s) that recorded them (by {' or '.join(hows)}); "
            f"{n - len(told)} recorded neither digests nor accuracies")
    return [f"{method_label(method)} there minus here, paired by seed: {mean:+.1f}"
            + (f" ± {se:.1f}" if not math.isnan(se) else "") + f" points ({n} seeds; {same})"]


def budget_comparison(name: str, entry: dict, others: Sequence[tuple[str, dict]]) -> list[str]:
    """Track ``name`` beside the same track in other results files (``others``: (link, results)) run
    with other GRPO step budgets: every row's overall accuracy at each budget, then the targets at each."""
    theirs = [(link, r["tracks"][name]) for link, r in others if name in r.get("tracks", {})]
    if not theirs:
        return []
    entries = [("", entry)] + theirs
    summaries = [summarise(e) for _, e in entries]
    methods = display_order({m for s in summaries for m in s})
    lines = ["", "The same track at other GRPO step budgets (separate results files; their pages list the commands "
             "that produced them). Overall oracle accuracy (%), mean ± std over seeds (seeds, GRPO runs):", "",
             "| method | " + " | ".join(_budget_name(e) for _, e in entries) + " |", "|---" * (len(entries) + 1) + "|"]
    for m in methods:
        cells = [f"{_pct(*s[m]['mean'])} ({s[m]['_seeds']}" + (f", {s[m]['_runs']})" if s[m]["_runs"] else ")")
                 if m in s else "—" for s in summaries]
        lines.append(f"| {method_label(m)} | " + " | ".join(cells) + " |")
    lines.append("")
    ref = f"mor:{_eps_label(entry['ref_epsilon'])}"
    for link, e in theirs:
        keys = (set(e["settings"]) | set(entry["settings"])) - {"grpo_steps"}
        differ = [f"{k} {_setting(entry, k)} → {_setting(e, k)}" for k in sorted(keys)
                  if _setting(entry, k) != _setting(e, k)]
        lines.append(f"- At {_budget_name(e)} ([{link}]({link}); "
                     + ("every other setting as above" if not differ else "other settings differ: " + ", ".join(differ))
                     + "): " + "; ".join(targets(e) + paired_across(entry, e, ref)) + ".")
    return lines


def render(results: dict, *, full_command: str, date: str, machine: str, plots: dict[str, str],
           wall_s: float | None = None, note: str = "", others: Sequence[tuple[str, dict]] = (),
           where: str = "") -> str:
    """The BENCHMARKS.md section body; ``others``: (link, results) of other GRPO step budgets, compared
    per track (:func:`budget_comparison`); ``where``: the ``--results``/``--out``/``--plots`` arguments
    of a page other than BENCHMARKS.md, added to every command that names no results file, so that
    rerunning a listed command adds to this page's results rather than to the main ones."""
    tracks = results["tracks"]

    def on_page(command: str) -> str:
        return command if "--results" in command.split() else command + where

    # one config read per track: the full command is appended to the track's stored ones, then split off
    flagged = {n: reproducible_commands(n, {**e, "commands": [*e.get("commands", []), full_command]})
               for n, e in tracks.items()}
    commands = {n: c[:-1] for n, c in flagged.items()}
    changed = any(commands[n] != e.get("commands", []) for n, e in tracks.items())
    fulls = {c[-1] for c in flagged.values()}
    full = fulls.pop() if len(fulls) == 1 else full_command
    # a setting every row's command overrode (e.g. 4 GRPO steps per round trip) is the page's: the full run needs it
    stored = [c.split() for n in tracks for c in commands[n]]
    sets = [{w[i + 1] for i in range(len(w) - 1) if w[i] == "--set"} for w in stored]
    for item in sorted(set.intersection(*sets) if sets else set()):
        full += f" --set {item}"
    full = on_page(full)
    lines = [
        "What it measures (`mor_secure/bench/alignment.py`): on each track, every method aligns the same base "
        "policy (tiny LLaVA, perception pre-training on unlabelled public images, then the format warm-up) with "
        "TRL's GRPOTrainer on the same public prompts, steps, group size, learning rate and KL penalty, and is "
        "scored by the oracle on the same held-out evaluation prompts (a completion is right when its first word "
        "is the right answer; chance is 1/|answers| per family). Only the reward differs: one client's reward "
        "model (single RM), all clients with equal weights (uniform), one reward model of the policy's "
        "architecture averaged by Flower's FedAvg strategy over rounds of local DP-SGD (FedAvg), one reward "
        "model trained without DP on all clients' pairs pooled (centralized, the upper bound), and "
        "Mixture-of-Rewards: the router fitted on the server's objective set from the clients' noised scores, "
        "clients at DP-SGD ε = 1, 4, 8 or without DP. Client reward models are the three heterogeneous "
        "architectures of the config (LLaVA, Idefics3, PaliGemma), trained by the real client code and reached "
        "through the real ClientApp over Flower messages (in-process grid); single, uniform and FedAvg use the "
        "config's ε; δ = 1e-5 throughout. DP reward models train with the config's DP-SGD settings, non-private ones (MoR "
        "without DP, centralized) with Adam at lr 1e-3, the project's non-DP setting. `-heldout` tracks remove one family from every client (a client left "
        "with none leaves), while the server's prompts keep it: its column measures generalisation.",
        "",
        f"Written {date} on {machine}" + (f"; the last invocation took {wall_s / 60:.0f} min of wall time"
                                           if wall_s else "") + " (each row's own date and time are in the results JSON).",
        "",
        "Commands that produced these rows: " + ", ".join(
            f"`{on_page(c)}`" for c in dict.fromkeys(c for n in tracks for c in commands[n])) + "."
        + (" A command ran at its config's GRPO budget of the time where it names none; `--grpo-steps` is added "
           "where that budget has since changed, so each command reproduces its rows." if changed else "")
        + (" Each names this page's results, page and plots, so a rerun adds to them, not to BENCHMARKS.md's."
           if where else ""),
        "",
        f"Full benchmark (every track, 3 seeds, every method): `{full}`",
    ]
    if note:
        lines += ["", note]
    lines += ["", "**What was run:** " + "; ".join(
        f"`{name}`: seeds {', '.join(sorted(e['seeds'], key=int)) or 'none'}, "
        f"{len({m for r in e['seeds'].values() for m in r})} methods, {e['settings']['grpo_steps']} GRPO steps "
        f"({e['settings']['prompts_per_step']} prompts × {e['settings']['num_generations']} samples)"
        for name, e in tracks.items()) + "."]
    missing = [f"`{t}` seed {k}" for t in ALL_TRACKS for k in range(3)
               if str(k) not in tracks.get(t, {}).get("seeds", {})]
    per_seed = [x for x in (_per_seed_at_config_size(n, e) for n, e in tracks.items()) if x is not None]
    if missing:
        lines += ["", "**Not run:** " + ", ".join(missing) + "."]
        if per_seed:
            h = float(np.mean(per_seed)) / 3600
            lines += ["", f"Time of the full benchmark on this machine, from the rows measured here at the configs' "
                      f"sizes: about {h:.1f} h per track and seed, so about {12 * h:.0f} h for all 4 tracks × 3 seeds "
                      f"({len(missing)} track-seeds, about {len(missing) * h:.0f} h, still to run; the `-heldout` "
                      "variants reuse their track's base policy, and the digits track's sizes equal the shapes "
                      "track's). The command continues from the results file, so it can be run in parts."]
    for name, e in tracks.items():
        s = summarise(e)
        if not s:
            continue
        multi = any(v["_runs"] > v["_seeds"] for v in s.values())
        fams = list(e["families"])
        owners = _owners(e)
        head = [f"{f}{' (held out)' if f in e['heldout'] else ''}" for f in fams]
        lines += ["", f"### Track `{name}` (config `{e['config']}`)", "",
                  "Clients: " + "; ".join(f"{n} ({c['model']}: {', '.join(c['families'])})"
                                         for n, c in e["clients"].items())
                  + (f". Held out from every client: {', '.join(e['heldout'])}." if e["heldout"] else "."),
                  "", "Oracle accuracy (%) per family and overall (mean over families), mean ± std over seeds"
                  + (" (a seed's figure is the mean of its GRPO runs, each sampling with its own seed from the same "
                     "base policy, reward models and router; the last column is the std of the overall accuracy "
                     "between one seed's GRPO runs, averaged over seeds):" if multi else ":"), "",
                  "| method | seeds | " + ("GRPO runs | " if multi else "") + " | ".join(head) + " | overall |"
                  + (" GRPO-run spread |" if multi else ""),
                  "|---" * (len(fams) + 3 + 2 * multi) + "|"]
        for m, row in s.items():
            spread = row["_grpo_spread"]
            lines.append(f"| {method_label(m)} | {row['_seeds']} | " + (f"{row['_runs']} | " if multi else "")
                         + " | ".join(_pct(*row[f]) for f in fams) + f" | **{_pct(*row['mean'])}** |"
                         + ((f" {100 * spread:.1f} |" if spread is not None else " |") if multi else ""))
        chance_row = [chance(f) for f in fams]
        lines.append("| *chance (an answer drawn uniformly)* | | " + ("| " if multi else "")
                     + " | ".join(f"*{100 * c:.1f}*" for c in chance_row)
                     + f" | *{100 * float(np.mean(chance_row)):.1f}* |" + (" |" if multi else ""))
        if e["heldout"]:
            owned = [f for f in fams if f not in e["heldout"]]
            lines += ["", "Generalisation: accuracy on the held-out family against the families the clients own "
                      "(mean over seeds):", "", "| method | held-out (" + ", ".join(e["heldout"]) + ") | owned families |",
                      "|---|---|---|"]
            for m in s:
                vals = [[r[m]["accuracy"][f] for f in e["heldout"]] for r in e["seeds"].values() if m in r]
                own = [[r[m]["accuracy"][f] for f in owned] for r in e["seeds"].values() if m in r]
                lines.append(f"| {method_label(m)} | {100 * np.mean(vals):.1f} | {100 * np.mean(own):.1f} |")
        ref = f"mor:{_eps_label(e['ref_epsilon'])}"
        w = router_weights(e, ref)
        if w:
            clients = list(e["clients"])
            lines += ["", f"Router weights of MoR at ε = {e['ref_epsilon']:g} by family (evaluation prompts, "
                      "mean over seeds; owner(s) in bold):", "", "| family | " + " | ".join(clients) + " |",
                      "|---" * (len(clients) + 1) + "|"]
            for fam in fams:
                if fam in w:
                    cells = [f"**{w[fam].get(c, 0):.2f}**" if c in owners.get(fam, []) else f"{w[fam].get(c, 0):.2f}"
                             for c in clients]
                    lines.append(f"| {fam} | " + " | ".join(cells) + " |")
        rm = _rm_table(e)
        if rm:
            lines += ["", "Reward models' pairwise accuracy (%) on fresh held-out pairs of each client's own "
                      "families (benchmark harness; never released), mean over seeds:", ""] + rm
        ranks = _rank_table(e)
        if ranks:
            lines += ["", "Reward ranking (benchmark harness): the share (%) of evaluation prompts on which each "
                      "method's reward ranks the oracle answer above every other answer of the family (ties count "
                      "as misses; scores clipped, without the release noise; MoR's router as fitted for its row), "
                      "mean over seeds. A policy that always gave the reward's first answer would score this; the "
                      "table above is what GRPO reached:", ""] + ranks
        failed = {(seed, m): f["error"] for seed, fs in e.get("failed", {}).items() for m, f in fs.items()}
        if failed:
            lines += ["", "Failed (not in the table; a rerun of the command tries them again): " + "; ".join(
                f"{method_label(m)}, seed {seed}: {err}" for (seed, m), err in sorted(failed.items())) + "."]
        t = targets(e)
        if t:
            lines += ["", "Against the issue's targets (overall means):", ""] + [f"- {x}" for x in t]
        draws = rm_draws(e)
        if draws:
            lines += ["", draws]
        lines += ["", "Reading:", ""] + [f"- {x}" for x in reading(e)]
        lines += budget_comparison(name, e, others)
        est = full_size_estimate(name, e)
        if est is not None:
            f, sc = est["full"], est["scale"]
            lines += ["", f"**This run's sizes are not the config's** ({e['settings']['pairs_per_client']} pairs per client, "
                      f"{e['settings']['epochs']} epochs at batch {e['settings']['batch_size']}, "
                      f"{e['settings']['grpo_steps']} GRPO steps of {e['settings']['prompts_per_step']} × "
                      f"{e['settings']['num_generations']}, {e['settings']['perception_steps']} perception steps; the config: "
                      f"{f['pairs_per_client']}, {f['epochs']} at {f['batch_size']}, {f['grpo_steps']} of "
                      f"{f['prompts_per_step']} × {f['num_generations']}, {f['perception_steps']}). Scaled phase by phase "
                      f"(reward-model training × {sc['rm']:.1f} by pair passes, GRPO × {sc['grpo']:.1f} by completions, "
                      f"the base policy × {sc['perception']:.1f} by perception steps), one seed of this track at the "
                      f"config's sizes would take about {est['wall_per_seed'] / 3600:.1f} h of wall time on this machine "
                      f"at the load of this run ({est['cpu_per_seed'] / 3600:.1f} h of this process's CPU time; measured "
                      f"here: {est['measured_per_seed'] / 60:.0f} min), so the full benchmark (4 tracks × 3 seeds) about "
                      f"{12 * est['wall_per_seed'] / 3600:.0f} h."]
        secs = sum(v["_seconds"] for v in s.values())
        reused = _reused_work(e)
        lines += ["", f"Compute: {secs / 60:.0f} min for this track's rows (" + ", ".join(
            f"{method_label(m)} {v['_seconds'] / max(1, v['_seeds']) / 60:.1f}" for m, v in s.items())
            + " min per seed; reward-model training is counted in the first row that needs it"
            + (f"; not counted, because an earlier, interrupted invocation had already made it: {reused}"
               if reused else "") + ")."]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{title}]({path})" for title, path in plots.items()) + "."]
        lines += [""] + [f"![{title}]({path})" for title, path in plots.items()]
    return "\n".join(lines) + "\n"


def reward_ranks(entry: dict) -> dict[str, dict[str, float]]:
    """Mean over seeds of each method's stored :func:`reward_top1` (methods that have it), per family and mean."""
    vals: dict[str, dict[str, list[float]]] = {}
    for rows in entry["seeds"].values():
        for m, r in rows.items():
            for k, v in (r.get("reward_top1") or {}).items():
                vals.setdefault(m, {}).setdefault(k, []).append(v)
    return {m: {k: float(np.mean(v)) for k, v in vals[m].items()} | {"_seeds": len(vals[m]["mean"])}
            for m in display_order(vals)}


def _rank_table(entry: dict) -> list[str]:
    ranks = reward_ranks(entry)
    if not ranks:
        return []
    fams = list(entry["families"])
    out = ["| method | seeds | " + " | ".join(fams) + " | overall |", "|---" * (len(fams) + 3) + "|"]
    for m, r in ranks.items():
        out.append(f"| {method_label(m)} | {r['_seeds']} | " + " | ".join(
            f"{100 * r[f]:.1f}" if f in r else "—" for f in fams) + f" | **{100 * r['mean']:.1f}** |")
    return out


def _rm_table(entry: dict) -> list[str]:
    rows: dict[str, dict[str, list[float]]] = {}
    for seed_rows in entry["seeds"].values():
        for m, r in seed_rows.items():
            for client, acc in (r.get("rm_accuracy") or {}).items():
                rows.setdefault(m, {}).setdefault(client, []).append(acc)
    if not rows:
        return []
    clients = list(entry["clients"])
    out = ["| reward models of | " + " | ".join(f"on {c}'s families" for c in clients) + " |",
           "|---" * (len(clients) + 1) + "|"]
    for m in display_order(rows):
        label = {"fedavg": "FedAvg RM (one model)", "centralized": "centralized RM (one model)"}.get(
            m, method_label(m).replace("MoR, ", "clients, "))
        out.append(f"| {label} | " + " | ".join(
            f"{100 * np.mean(rows[m][c]):.1f}" if c in rows[m] else "—" for c in clients) + " |")
    return out


# -- plots ---------------------------------------------------------------------------------------------
def plot_all(results: dict, folder: Path) -> dict[str, Path]:
    """Privacy–utility curve, per-family bars by method, router weights per family; PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    tracks = {n: e for n, e in results["tracks"].items() if summarise(e)}
    out: dict[str, Path] = {}
    if not tracks:
        return out

    # 1. privacy-utility: overall accuracy of MoR against epsilon, baselines as lines
    fig, axes = plt.subplots(1, len(tracks), figsize=(5.2 * len(tracks), 3.8), dpi=110, squeeze=False)
    for ax, (name, e) in zip(axes[0], tracks.items()):
        s = summarise(e)
        eps = sorted(float(m[len("mor:eps"):]) for m in s if m.startswith("mor:eps"))
        xs = list(eps)
        ys = [s[f"mor:{_eps_label(x)}"]["mean"] for x in eps]
        nodp_x = max(eps or [8.0]) * 4
        if "mor:nodp" in s:
            xs.append(nodp_x)
            ys.append(s["mor:nodp"]["mean"])
        if xs:
            ax.errorbar(xs, [100 * y[0] for y in ys], yerr=[100 * (y[1] if math.isfinite(y[1]) else 0) for y in ys],
                        marker="o", lw=2, capsize=3, label="MoR", color="C3")
        styles = {"base": ("k", ":"), "uniform": ("C0", "--"), "fedavg": ("C2", "-."), "centralized": ("C4", "--")}
        for m, (colour, ls) in styles.items():
            if m in s:
                ax.axhline(100 * s[m]["mean"][0], color=colour, ls=ls, lw=1.3, label=method_label(m))
        singles = {m: v["mean"][0] for m, v in s.items() if m.startswith("single:")}
        if singles:
            best = max(singles, key=singles.get)
            ax.axhline(100 * singles[best], color="C1", ls=(0, (1, 1)), lw=1.3, label=f"best {method_label(best)}")
        ax.set_xscale("log")
        ticks = eps + ([nodp_x] if "mor:nodp" in s else [])
        ax.set_xticks(ticks, [f"{x:g}" for x in eps] + (["no DP"] if "mor:nodp" in s else []))
        ax.minorticks_off()
        ax.set_ylim(0, 100)
        ax.set_xlabel("client ε (DP-SGD, δ = 1e-5)")
        ax.set_ylabel("oracle accuracy, overall (%)")
        ax.set_title(f"{name} ({len(e['seeds'])} seed{'s' if len(e['seeds']) > 1 else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    fig.suptitle("Privacy–utility: MoR against ε, baselines at the config's ε", fontsize=10)
    fig.tight_layout()
    out["privacy–utility curve"] = folder / "alignment_privacy_utility.png"
    fig.savefig(out["privacy–utility curve"])
    plt.close(fig)

    # 2. per-family accuracy by method
    fig, axes = plt.subplots(len(tracks), 1, figsize=(11, 3.6 * len(tracks)), dpi=110, squeeze=False)
    for ax, (name, e) in zip(axes[:, 0], tracks.items()):
        s = summarise(e)
        fams = list(e["families"]) + ["mean"]
        methods = list(s)
        width = 0.85 / max(1, len(methods))
        cmap = plt.get_cmap("tab20")
        for j, m in enumerate(methods):
            xs = np.arange(len(fams)) + (j - (len(methods) - 1) / 2) * width
            means = [100 * s[m][f][0] for f in fams]
            errs = [100 * s[m][f][1] if math.isfinite(s[m][f][1]) else 0 for f in fams]
            ax.bar(xs, means, width, yerr=errs, capsize=1.5, label=method_label(m), color=cmap(j % 20))
        ax.set_xticks(np.arange(len(fams)), [f"{f}\n(held out)" if f in e["heldout"] else f for f in fams])
        ax.set_ylabel("oracle accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{name}: accuracy per question family")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out["per-family accuracy by method"] = folder / "alignment_by_family.png"
    fig.savefig(out["per-family accuracy by method"])
    plt.close(fig)

    # 3. router weights per family (MoR at the config's epsilon, and without DP when measured)
    panels = []
    for name, e in tracks.items():
        for m in (f"mor:{_eps_label(e['ref_epsilon'])}", "mor:nodp"):
            w = router_weights(e, m)
            if w:
                panels.append((name, e, m, w))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), dpi=110, squeeze=False)
        for ax, (name, e, m, w) in zip(axes[0], panels):
            fams = [f for f in e["families"] if f in w]
            clients = list(e["clients"])
            grid = np.array([[w[f].get(c, 0.0) for c in clients] for f in fams])
            ax.imshow(grid, vmin=0, vmax=1, cmap="Blues")
            owners = _owners(e)
            for i, f in enumerate(fams):
                for j, c in enumerate(clients):
                    own = c in owners.get(f, [])
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            fontweight="bold" if own else "normal", color="white" if grid[i, j] > 0.6 else "black")
            ax.set_xticks(range(len(clients)), clients, rotation=30, fontsize=7)
            ax.set_yticks(range(len(fams)), [f"{f} (held out)" if f in e["heldout"] else f for f in fams], fontsize=7)
            ax.set_title(f"{name}: {method_label(m)}", fontsize=8)
        fig.suptitle("Router weight per family (owners' weights in bold)", fontsize=9)
        fig.tight_layout()
        out["router weights per family"] = folder / "alignment_router_weights.png"
        fig.savefig(out["router weights per family"])
        plt.close(fig)
    return out


def write_report(results: dict, out: Path | str, plots_dir: Path | str, *, full_command: str,
                 wall_s: float | None = None, note: str = "", results_path: Path | str | None = None) -> str:
    """Plots under ``plots_dir``, then the ``alignment`` section of the BENCHMARKS.md at ``out``;
    with ``results_path``, the results of other GRPO step budgets beside it are compared per track."""
    import datetime as dt

    from mor_secure.bench.markdown import update_section
    from mor_secure.bench.markdown import machine

    out = Path(out)
    files = plot_all(results, Path(plots_dir))
    links = {title: os.path.relpath(path, out.parent.resolve() if out.parent.exists() else out.parent)
             for title, path in ((t, Path(p).resolve()) for t, p in files.items())}
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    base = out.parent.resolve() if out.parent.exists() else out.parent
    others = [(os.path.relpath((page or path).resolve(), base), load_results(path))
              for path, page in (other_budget_files(Path(results_path)) if results_path else [])]
    where = ""
    if results_path is not None and out.name != "BENCHMARKS.md":  # a page of its own: commands name its files
        where = "".join(f" --{flag} {os.path.relpath(Path(p).resolve())}"
                        for flag, p in (("results", results_path), ("out", out), ("plots", plots_dir)))
    body = render(results, full_command=full_command, date=date, machine=machine(), plots=links,
                  wall_s=wall_s, note=note, others=others, where=where)
    update_section(out, SECTION, TITLE, body)
    return body
