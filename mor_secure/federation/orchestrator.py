"""The server's run: phase 1 (clients train RMs), warm-up, phase 2 (router), phase 3 (GRPO), evaluation.

Everything the server uses is either its own (public prompts, objective set, evaluation set,
its policy) or came through the reward channel as clipped, noised scores. Every phase writes
its metrics to the run folder as soon as it ends, so a crash loses at most the phase in flight;
``run()`` skips the phases a stopped run completed and GRPO continues from its last checkpoint
(``mor-secure run --resume``; see ``federation/resume.py``).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import Grid

from mor_secure.alignment.grpo import MixtureReward, build_dataset, run_grpo
from mor_secure.alignment.perception import build_base_model
from mor_secure.alignment.policy import generate_answers, oracle_accuracy, prompt_features, warmup
from mor_secure.config import RunConfig, load_config
from mor_secure.data import load_split
from mor_secure.errors import ConfigError
from mor_secure.federation.channel import Channel, EncryptedMixtureReward, server_public_context
from mor_secure.federation.resume import RunLock, checkpoint_history, checkpoint_step, last_checkpoint
from mor_secure.models.factory import load_vlm
from mor_secure.rewards.router import Router, RouterFit, fit_router, masked_weights

log = logging.getLogger(__name__)


PHASE_TITLES = {
    "rm_training": "phase 1: each client trains its reward model on its own data (DP-SGD where configured)",
    "warmup": "server: base policy (perception pre-training on unlabelled public images, then format warm-up)",
    "router_fit": "phase 2: clients score the objective set; the server fits the router",
    "grpo": "phase 3: GRPO on the mixture of client rewards (KL to the frozen reference)",
    "evaluation": "evaluation: base vs aligned policy on held-out prompts (oracle answers)",
}


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


def fit_router_on_objective(channel: Channel, reference, objective: list[dict], cfg: RunConfig, *,
                            progress: bool = True) -> tuple[Router, RouterFit, torch.Tensor]:
    """Phase 2 without the run folder: the clients of ``channel.order`` score both responses of every
    objective pair through the channel (clipped, noised); the router and calibration are fitted on
    the frozen ``reference``'s features. Returns the router, the fit and the presence mask (2N, K)."""
    n = len(objective)
    images = [r["image"] for r in objective]
    questions = [r["question"] for r in objective]
    responses = [r["response_a"] for r in objective] + [r["response_b"] for r in objective]
    index = np.concatenate([np.arange(n), np.arange(n)])
    scores, present = channel.score(images, questions, responses, index,
                                    phase="router_fit", purpose="score the objective set")
    feats = prompt_features(reference, images, questions)
    router = Router(feats.shape[1], channel.order, hidden=cfg.router.hidden, components=cfg.router.components)
    s = torch.as_tensor(scores, dtype=torch.float32)
    p = torch.as_tensor(present)
    labels = torch.tensor([float(r["label"]) for r in objective])
    fit = fit_router(router, feats, s[:n], s[n:], labels, p[:n], steps=cfg.router.steps, lr=cfg.router.lr,
                     weight_decay=cfg.router.weight_decay,
                     entropy_weight=cfg.router.entropy_weight, progress=progress, seed=cfg.run.seed)
    return router, fit, p


def router_weights_by_family(router: Router, reference, records: list[dict],
                             features: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """The router's mean weight per client on ``records``' prompts (every client present), by family;
    ``features``: the prompts' :func:`prompt_features` when the caller already has them."""
    families = [r["family"] for r in records]
    feats = features if features is not None else prompt_features(
        reference, [r["image"] for r in records], [r["question"] for r in records])
    with torch.no_grad():
        weights = masked_weights(router.logits(feats), torch.ones(len(router.clients), dtype=torch.bool))
    per_family = {}
    for fam in sorted(set(families)):
        rows = [i for i, f in enumerate(families) if f == fam]
        per_family[fam] = dict(zip(router.clients, weights[rows].mean(0).tolist()))
    return per_family


class Orchestrator:
    def __init__(self, run_dir: Path, grid: Grid, *, progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.cfg: RunConfig = load_config(self.run_dir / "config.yaml")
        self.record_path = self.run_dir / "run_record.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir(exist_ok=True)
        self.progress = progress
        self.channel = Channel(grid, self.record["run_id"], self.run_dir / "events.jsonl",
                               self.cfg.federation.round_timeout_s)
        server = self.run_dir / "server"
        self.public = list(load_split(server / "public"))
        self.objective = list(load_split(server / "objective"))
        self.eval = list(load_split(server / "eval"))

    def save_record(self, **updates) -> None:
        self.record.update(updates)
        write_json(self.record_path, self.record)

    def phase(self, name: str):
        log.info("phase: %s", name)
        if self.progress:  # clients train out of sight (their own processes): say what is running
            print(f"[{time.strftime('%H:%M:%S')}] {PHASE_TITLES.get(name, name)}", flush=True)
        self.save_record(current_phase=name)
        return time.perf_counter()

    def done(self, name: str, start: float, metrics: dict) -> None:
        metrics = {"seconds": round(time.perf_counter() - start, 2), **metrics}
        write_json(self.metrics_dir / f"{name}.json", metrics)
        self.record.setdefault("phases_completed", []).append(name)
        # clients that refused a release for budget left the mixture for the rest of the run
        self.record["left_mixture"] = sorted(self.channel.exhausted)
        self.save_record()

    # -- phase 1 ----------------------------------------------------------------------------------
    def train_clients(self) -> None:
        t = self.phase("rm_training")
        clients = self.channel.train_all(timeout_s=max(3600.0, self.cfg.federation.round_timeout_s),
                                          expected=len(self.cfg.clients),
                                          wait_s=self.cfg.federation.round_timeout_s)
        if not clients:
            raise RuntimeError("no client finished phase 1; see events.jsonl for each client's reason")
        info = {n: {"model_class": c.hello.model_class, "dp_sgd": c.hello.dp_sgd, "clip_bound": c.hello.clip_bound,
                    "noise_std": c.hello.noise_std, "node_id": c.node_id} for n, c in clients.items()}
        self.save_record(clients=info, model_classes=sorted({c["model_class"] for c in info.values()}))
        self.done("rm_training", t, {"clients": info})

    def reconnect_clients(self) -> None:
        """Phase 1 ended before a resume: learn the clients' (new) node ids. A client whose RM is
        on its disk answers without training or writing to its ledger; one that does not answer,
        or answers differently from phase 1, is left out of the mixture (noted)."""
        log.info("resume: phase 1 already done; asking clients for their reward models on disk")
        if self.progress:
            print(f"[{time.strftime('%H:%M:%S')}] resume: phase 1 already done; clients answer from their disks",
                  flush=True)
        clients = self.channel.train_all(timeout_s=max(3600.0, self.cfg.federation.round_timeout_s),
                                          expected=len(self.cfg.clients),
                                          wait_s=self.cfg.federation.round_timeout_s)
        for name, info in self.record.get("clients", {}).items():
            now = clients.get(name)
            if now is None:
                self.channel.note("dropped", client=name, phase="resume", reason="did not answer on resume")
            elif (now.hello.model_class, now.hello.clip_bound, now.hello.noise_std) != (
                    info["model_class"], info["clip_bound"], info["noise_std"]):
                self.channel.note("rejected", client=name, phase="resume",
                                  reason="answers differently from phase 1 (model class, clip bound or noise)")
                del clients[name]
        for name in set(clients) - set(self.record.get("clients", {})):  # joined after phase 1: no RM in the run
            del clients[name]
        self.channel.order = sorted(self.record.get("clients", {}))
        if not clients:
            raise RuntimeError("no client answered on resume; see events.jsonl for each client's reason")

    # -- base policy ------------------------------------------------------------------------------
    def base_policy(self):
        t = self.phase("warmup")
        policy, perception = build_base_model(self.cfg.policy.model, track=self.cfg.data.track,
                                              image_size=self.cfg.data.image_size, data_seed=self.cfg.run.seed,
                                              model_seed=self.cfg.run.seed, progress=self.progress)
        w = self.cfg.policy.warmup
        losses = warmup(policy, [r["image"] for r in self.public], [r["family"] for r in self.public],
                        epochs=w.epochs, lr=w.lr, batch_size=w.batch_size, seed=self.cfg.run.seed,
                        progress=self.progress) if w.epochs else []
        policy.save(self.run_dir / "policy_base")
        # TRL builds the frozen GRPO reference from this path: the warmed-up base policy.
        policy.model.config._name_or_path = str(self.run_dir / "policy_base")
        self.done("warmup", t, {"loss_first": losses[0] if losses else None,
                                "loss_last": losses[-1] if losses else None, "steps": len(losses),
                                "perception": {"steps": len(perception),
                                               "loss_first": perception[0] if perception else None,
                                               "loss_last": perception[-1] if perception else None}})
        return policy

    # -- phase 2 ----------------------------------------------------------------------------------
    def fit_router(self, reference) -> Router:
        t = self.phase("router_fit")
        router, fit, p = fit_router_on_objective(self.channel, reference, self.objective, self.cfg,
                                                 progress=self.progress)
        router.save(self.run_dir / "router.pt")
        self.done("router_fit", t, {"objective_accuracy": fit.accuracy, "loss_first": fit.losses[0],
                                    "loss_last": fit.losses[-1], "clients": router.clients,
                                    "scale": router.scale.tolist(), "clients_present": p.any(0).tolist()})
        return router

    def load_policy(self, folder: str):
        """A policy the run saved (``policy_base`` or ``policy_aligned``), as GRPO expects it."""
        policy = load_vlm(self.run_dir / folder)
        policy.model.config._name_or_path = str(self.run_dir / "policy_base")  # TRL's frozen reference
        policy.model.eval()
        return policy

    # -- phase 3 ----------------------------------------------------------------------------------
    def align(self, policy, reference, router: Router) -> list[dict]:
        t = self.phase("grpo")
        images = [r["image"] for r in self.public]
        questions = [r["question"] for r in self.public]
        feats = prompt_features(reference, images, questions)

        def scorer(imgs, qs, responses, index):
            return self.channel.score(imgs, qs, responses, index, phase="grpo", purpose="score policy samples")

        if self.cfg.federation.encryption == "ckks":  # clients' scores reach the server only as ciphertexts
            self.channel.use_ckks(server_public_context(self.record))
            reward = EncryptedMixtureReward(self.channel, router, feats, images, questions)
        else:
            reward = MixtureReward(scorer, router, feats, images, questions)
        dataset = build_dataset(images, questions, [r["family"] for r in self.public])
        trainer_dir = self.run_dir / "grpo_trainer"
        resume_from = last_checkpoint(trainer_dir)  # a stopped run's GRPO continues from here
        if resume_from is not None:
            log.info("resume: GRPO continues from %s", resume_from)
            self.save_record(grpo_resumed_from=[*self.record.get("grpo_resumed_from", []),
                                                checkpoint_step(resume_from)])
        history = run_grpo(policy, dataset, reward, self.cfg.grpo, out_dir=trainer_dir,
                           seed=self.cfg.run.seed, progress=self.progress,
                           checkpoint_steps=self.cfg.grpo.checkpoint_steps, resume_from=resume_from)
        if resume_from is not None:  # steps before the checkpoint were logged by the stopped run
            history = checkpoint_history(resume_from) + history
        policy.save(self.run_dir / "policy_aligned")
        self.done("grpo", t, {"history": history, "bytes_sent_to_clients": self.channel.bytes_sent,
                              "encryption": self.cfg.federation.encryption,
                              "ciphertext_bytes": self.channel.ciphertext_bytes,
                              "resumed_from_step": checkpoint_step(resume_from) if resume_from else None})
        for ckpt in trainer_dir.glob("checkpoint-*"):  # policy_aligned is saved: checkpoints are spent
            shutil.rmtree(ckpt, ignore_errors=True)
        return history

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, base, aligned, router: Router) -> dict:
        t = self.phase("evaluation")
        images = [r["image"] for r in self.eval]
        questions = [r["question"] for r in self.eval]
        families = [r["family"] for r in self.eval]
        answers = [r["answer"] for r in self.eval]
        n_tokens = self.cfg.grpo.max_completion_length
        table = {
            "base": oracle_accuracy(families, answers, generate_answers(base, images, questions, max_new_tokens=n_tokens)),
            "aligned": oracle_accuracy(families, answers,
                                       generate_answers(aligned, images, questions, max_new_tokens=n_tokens)),
        }
        result = {"oracle_accuracy": table, "router_weights_by_family": router_weights_by_family(router, base, self.eval)}
        self.done("evaluation", t, result)
        return result

    def run(self) -> dict:
        """Every phase in order, skipping those ``phases_completed`` lists (a resumed run)."""
        if self.record.get("status") == "completed":
            raise ConfigError(f"run {self.run_dir} already completed; start a new run with `mor-secure run CONFIG`")
        done = list(self.record.get("phases_completed", []))
        if done:
            log.info("resume: phases already completed: %s", ", ".join(done))
            if self.progress:
                print(f"[{time.strftime('%H:%M:%S')}] resuming run {self.record['run_id']}: "
                      f"phases already completed: {', '.join(done)}", flush=True)
            self.save_record(status="running", resumed=[*self.record.get("resumed", []),
                                                        {"time": time.time(), "phases_completed": done}])
        else:
            self.save_record(status="running", started=time.time())
        # clients that refused for budget before the stop stay out: their budget does not come back
        self.channel.exhausted.update(self.record.get("left_mixture", []))
        if "rm_training" in done:
            self.reconnect_clients()
        else:
            self.train_clients()
        policy = self.load_policy("policy_base") if "warmup" in done else self.base_policy()
        reference = copy.deepcopy(policy)  # frozen copy: router features and the base-policy evaluation
        reference.model.requires_grad_(False)
        if "router_fit" in done:
            router = Router.load(self.run_dir / "router.pt")
            self.channel.order = list(router.clients)
        else:
            router = self.fit_router(reference)
        if "grpo" in done:
            policy = self.load_policy("policy_aligned")
        else:
            self.align(policy, reference, router)
        if "evaluation" in done:
            result = json.loads((self.metrics_dir / "evaluation.json").read_text())
        else:
            result = self.evaluate(reference, policy, router)
        self.save_record(status="completed", finished=time.time())
        return result


def run_server(run_dir: Path, grid: Grid, progress: bool = True) -> None:
    """Run (or resume) the server's phases on ``run_dir``. A folder another server holds, or a run
    that already completed, is refused without touching its record."""
    record_path = Path(run_dir) / "run_record.json"
    with RunLock(run_dir):  # one server per run folder; the kernel releases it if this process dies
        if record_path.exists() and json.loads(record_path.read_text()).get("status") == "completed":
            raise ConfigError(f"run {run_dir} already completed; start a new run with `mor-secure run CONFIG`")
        try:
            Orchestrator(run_dir, grid, progress=progress).run()
        except BaseException as exc:
            log.exception("server run failed")
            record = json.loads(record_path.read_text()) if record_path.exists() else {}
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            write_json(record_path, record)
            raise
