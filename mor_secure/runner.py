"""``mor-secure run``: prepare a run folder, run MoR through Flower's simulation engine, report.

The run folder:

  config.yaml            the resolved configuration
  run_record.json        run id, status, phases completed, client model classes, insecure flags
  events.jsonl           refusals, rejected replies, dropouts (with reasons)
  clients/<name>/        each client's own disk (data, ledger and keys, reward model)
  server/                the server's public prompts, objective set and evaluation set
  metrics/*.json         per-phase metrics; evaluation.json holds the oracle-accuracy table
  policy_base/ policy_aligned/ router.pt
  grpo_trainer/          GRPO checkpoints while GRPO runs (``mor-secure run --resume`` continues from them)
  server.lock            held by the running server (one server per run folder)
  evaluation.md  grpo_reward.png  rm_accuracy.json (benchmark harness)  privacy_report.html/json
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import yaml

from mor_secure.config import RunConfig, load_config
from mor_secure.data import make_client_pairs, write_benchmark
from mor_secure.data.benchmark import write_server_sets
from mor_secure.errors import ConfigError
from mor_secure.federation.client_node import CLIENT_FILE, ClientSetup
from mor_secure.federation.orchestrator import write_json
from mor_secure.privacy.ledger import generate_signing_key

log = logging.getLogger(__name__)


def prepare_run(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    """Create the run folder: resolved config, the server's sets and, in simulation only, one
    client folder each (data, ledger keys), standing in for each client's own setup. In
    deployment each client prepares its own folder (``mor-secure client init``) on its own host:
    the server's run folder then holds no client data.
    """
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}-{uuid.uuid4().hex[:6]}"
    run_dir = Path(run_dir).resolve()
    if (run_dir / "config.yaml").exists():
        raise ConfigError(f"run folder {run_dir} already holds a run; use --resume {run_dir} or another folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    d = cfg.data
    if cfg.federation.mode == "deployment":  # each client prepared its own folder; the server holds none
        write_server_sets(run_dir, track=d.track, seed=cfg.run.seed, image_size=d.image_size,
                          n_public=d.public_prompts, n_objective=d.objective_pairs, n_eval=d.eval_prompts)
    else:
        write_benchmark(
            run_dir, track=d.track, seed=cfg.run.seed, image_size=d.image_size,
            clients=[(c.name, list(c.families), d.pairs_per_client) for c in cfg.clients],
            n_public=d.public_prompts, n_objective=d.objective_pairs, n_eval=d.eval_prompts,
            foreign_fraction=d.foreign_fraction, foreign_label_noise=d.foreign_label_noise,
            malformed_fraction=d.malformed_fraction,
        )
        for client in cfg.clients:
            folder = run_dir / "clients" / client.name
            (folder / CLIENT_FILE).write_text(ClientSetup(client, cfg.run.seed, d.image_size).to_json())
            generate_signing_key(folder / "ledger_key.pem", folder / "ledger_key.pub")
    (run_dir / "clients.json").write_text(json.dumps([c.name for c in cfg.clients]))
    write_json(run_dir / "run_record.json", {
        "run_id": f"{cfg.run.name}-{uuid.uuid4().hex[:12]}",
        "status": "prepared",
        "mode": cfg.federation.mode,
        "encryption": cfg.federation.encryption,
        "insecure_flags": cfg.insecure_flags,
    })
    return run_dir


def prepare_from_run_config(run_config, run_id: int) -> Path | None:
    """For ``flwr run .``: use run_config['run-dir'], preparing it from run_config['config'] if new."""
    run_dir = str(run_config.get("run-dir", "") or "")
    if not run_dir:
        raise ConfigError("flwr run needs an absolute run folder: --run-config \"run-dir='/abs/path' "
                          "config='/abs/path/configs/demo.yaml'\"")
    folder = Path(run_dir)
    if not (folder / "config.yaml").exists():
        prepare_run(load_config(str(run_config.get("config", ""))), folder)
    return folder


def simulate(run_dir: Path, *, progress: bool = True) -> dict:
    """Run the ServerApp and one ClientApp per client in Flower's simulation engine (Ray)."""
    from flwr.simulation import run_simulation

    from mor_secure.federation.client_app import make_client_app
    from mor_secure.federation.server_app import make_server_app

    cfg = load_config(run_dir / "config.yaml")
    cpus = max(1, os.cpu_count() or 1)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(
        server_app=make_server_app(run_dir, progress=progress),
        client_app=make_client_app(run_dir),
        num_supernodes=len(cfg.clients),
        backend_config={
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR},
            # fractional CPUs so every client has an actor at once on a small machine
            "client_resources": {"num_cpus": min(1.0, cpus / len(cfg.clients)), "num_gpus": 0.0},
        },
    )
    record = json.loads((run_dir / "run_record.json").read_text())
    if record.get("status") != "completed":
        raise RuntimeError(f"the run did not complete (status {record.get('status')!r}): "
                           f"{record.get('error', 'see the log above and ' + str(run_dir / 'events.jsonl'))}")
    return record


def resume_run(run_dir: Path, *, progress: bool = True) -> Path:
    """``mor-secure run --resume``: check ``run_dir`` is a stopped run, then simulate it again;
    the server skips the phases it completed (``federation/resume.py``)."""
    from mor_secure.federation.resume import check_resumable

    run_dir = Path(run_dir).resolve()
    record = check_resumable(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.federation.mode != "simulation":
        raise ConfigError(f"--resume {run_dir}: a deployment run resumes by running `flwr run` again with the "
                          "same run-dir (see README 'Across machines')")
    done = record.get("phases_completed", [])
    print(f"resuming run folder: {run_dir} (status {record.get('status')!r}; phases completed: "
          f"{', '.join(done) or 'none'})", flush=True)
    simulate(run_dir, progress=progress)
    return run_dir


def harness_rm_accuracy(run_dir: Path) -> dict:
    """Benchmark harness (not part of the protocol): each client RM's pairwise accuracy on fresh
    held-out pairs of its own families. Read from the client folders after the run; never sent."""
    from mor_secure.rewards.reward_model import RewardModel
    from mor_secure.rewards.train import pairwise_accuracy

    cfg = load_config(run_dir / "config.yaml")
    out = {}
    for i, client in enumerate(cfg.clients):
        rm_dir = run_dir / "clients" / client.name / "rm"
        if not (rm_dir / "complete").is_file() or cfg.data.heldout_pairs_per_client == 0:
            continue
        pairs = make_client_pairs(cfg.data.track, list(client.families), cfg.data.heldout_pairs_per_client,
                                  seed=cfg.run.seed + 104729, image_size=cfg.data.image_size,
                                  foreign_fraction=0.0, client_index=i, n_clients=len(cfg.clients))
        rm = RewardModel.load(rm_dir)
        out[client.name] = {
            "families": list(client.families),
            "dp_sgd": client.privacy.dp_sgd,
            "epsilon_target": client.privacy.epsilon if client.privacy.dp_sgd else None,
            "pairwise_accuracy": pairwise_accuracy(rm, pairs),
            "by_family": {f: pairwise_accuracy(rm, [p for p in pairs if p["family"] == f]) for f in client.families},
            "heldout_pairs": len(pairs),
        }
    write_json(run_dir / "rm_accuracy.json", out)
    return out


def plot_reward(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    reward = [h["reward"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(steps, reward, lw=1, alpha=0.5, label="mean mixture reward")
    if len(reward) >= 5:
        k = max(5, len(reward) // 10)
        smooth = [sum(reward[max(0, i - k + 1):i + 1]) / len(reward[max(0, i - k + 1):i + 1]) for i in range(len(reward))]
        ax.plot(steps, smooth, lw=2, label=f"moving average ({k} steps)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_title("Mixture-of-Rewards reward during GRPO")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluation_markdown(evaluation: dict, rm_accuracy: dict, record: dict) -> str:
    table = evaluation["oracle_accuracy"]
    fams = [f for f in table["base"] if f != "mean"]
    lines = ["| policy | " + " | ".join(fams) + " | mean |", "|---" * (len(fams) + 2) + "|"]
    for name in ("base", "aligned"):
        row = table[name]
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[f]:.1f}" for f in fams) + f" | {100 * row['mean']:.1f} |")
    gain = 100 * (table["aligned"]["mean"] - table["base"]["mean"])
    lines += ["", f"Aligned minus base (mean over families): {gain:+.1f} points (oracle accuracy, %).", ""]
    lines += ["Router weight by family (held-out prompts):", "",
              "| family | " + " | ".join(record.get("clients", {})) + " |",
              "|---" * (len(record.get("clients", {})) + 1) + "|"]
    for fam, weights in evaluation["router_weights_by_family"].items():
        lines.append(f"| {fam} | " + " | ".join(f"{weights.get(c, 0):.2f}" for c in record.get("clients", {})) + " |")
    if rm_accuracy:
        lines += ["", "Client reward models (benchmark harness; never released by a client):", "",
                  "| client | model class | families | DP-SGD epsilon | held-out pairwise accuracy |",
                  "|---|---|---|---|---|"]
        for name, acc in rm_accuracy.items():
            eps = acc["epsilon_target"]
            cls = record.get("clients", {}).get(name, {}).get("model_class", "?")
            lines.append(f"| {name} | {cls} | {', '.join(acc['families'])} | {eps if eps is not None else 'no DP'} "
                         f"| {100 * acc['pairwise_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def finish(run_dir: Path) -> str:
    """Harness measurements, the evaluation table, the reward plot and the privacy report."""
    from mor_secure.compliance.report import write_report

    record = json.loads((run_dir / "run_record.json").read_text())
    evaluation = json.loads((run_dir / "metrics" / "evaluation.json").read_text())
    grpo = json.loads((run_dir / "metrics" / "grpo.json").read_text())
    plot_reward(grpo["history"], run_dir / "grpo_reward.png")
    rm_acc = harness_rm_accuracy(run_dir)
    text = evaluation_markdown(evaluation, rm_acc, record)
    (run_dir / "evaluation.md").write_text(text)
    html, _ = write_report(run_dir)
    return text + f"\nRun folder: {run_dir}\nPrivacy report: {html}\n"
