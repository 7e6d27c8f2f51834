"""``mor-secure bench ckks``: what CKKS aggregation costs per GRPO step, with and without it.

Setup, per client count K: K client folders (tiny DP-SGD reward models of the three families
in turn, trained once), the real ClientApp behind an in-process grid (``deploy.inproc``: Flower
messages deflated and re-inflated, no network), the reward channel, an untrained router and a
tiny LLaVA policy trained by TRL's GRPOTrainer for ``steps`` steps. The two modes run the same
steps on the same folders, alternating, ``repeats`` times each; the medians are reported.

Measured per GRPO step (medians over steps 2..S, so the trainer's setup and first-step one-off
costs are left out): wall time of the whole step (generation, K clients scoring in turn,
mixing, policy update), the reward call alone, and the bytes the server receives and sends
(ciphertexts from clients, aggregate to the decryptor). Not measured: network and Flower's
polling, identical for the score round trip in both modes; CKKS adds one decryption round trip
per step, which on the deployment runtime costs at least one SuperNode poll (see BENCHMARKS.md).
Clients score one after another here; on separate hosts they score in parallel, so the
per-client encryption time (reported) overlaps instead of adding up.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mor_secure.alignment.grpo import MixtureReward, build_dataset, run_grpo
from mor_secure.alignment.policy import prompt_features
from mor_secure.config import GrpoSection, RunConfig, parse_config
from mor_secure.crypto.provision import load_server_kit, provision
from mor_secure.data import make_server_sets, vocabulary
from mor_secure.deploy.client_init import init_client_folder
from mor_secure.deploy.inproc import InProcessGrid
from mor_secure.errors import ConfigError
from mor_secure.federation.channel import Channel, EncryptedMixtureReward
from mor_secure.federation.client_app import make_client_app
from mor_secure.federation.client_node import ClientNode
from mor_secure.models.factory import build_vlm
from mor_secure.rewards.router import Router

_FAMILIES = [("llava", "colour"), ("idefics3", "count"), ("paligemma", "position")]


@dataclass
class _Timed:
    """The reward function, timed per call (TRL names the reward column after ``__name__``)."""

    inner: MixtureReward
    seconds: list[float]
    starts: list[float]
    __name__ = "mixture_reward"

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.starts.append(start)
        self.seconds.append(time.perf_counter() - start)
        return out


def bench_config(k: int) -> RunConfig:
    """K tiny DP-SGD clients (families cycle through LLaVA, Idefics3, PaliGemma)."""
    clients = [{"name": f"c{i:02d}", "model": {"family": _FAMILIES[i % 3][0]}, "families": [_FAMILIES[i % 3][1]],
                "privacy": {"dp_sgd": True, "epsilon": 8.0, "delta": 1e-5},
                "budget": {"epsilon": 8.0, "delta": 1e-5},
                "training": {"epochs": 1, "batch_size": 16, "lr": 0.5, "lora_r": 2}} for i in range(k)]
    return parse_config({"run": {"name": "bench", "seed": 0},
                         "data": {"pairs_per_client": 16, "public_prompts": 8, "objective_pairs": 8,
                                  "eval_prompts": 8},
                         "clients": clients, "federation": {"encryption": "ckks"}}, "<bench>")


def _prepare(root: Path, cfg: RunConfig) -> tuple[dict[int, dict], Path]:
    names = [c.name for c in cfg.clients]
    kits = provision(root / "kits", names)
    nodes = {}
    for i, name in enumerate(names):
        folder = init_client_folder(cfg, name, root / "clients" / name, kits.client_dirs[name])
        ClientNode(folder).train("bench", progress=False)
        nodes[100 + i] = {"client-dir": str(folder), "kit-dir": str(kits.client_dirs[name])}
    return nodes, kits.server_dir


def _one_run(mode: str, nodes: dict[int, dict], server_kit: Path, grpo: GrpoSection, root: Path) -> dict:
    grid = InProcessGrid(make_client_app(), nodes)
    channel = Channel(grid, f"bench-{mode}", root / "events.jsonl", timeout_s=600)
    channel.train_all(timeout_s=600)
    n_prompts = grpo.prompts_per_step * 2
    data = make_server_sets("shapes", None, 0, 32, n_public=n_prompts, n_objective=8, n_eval=8)["public"]
    images, questions = [r["image"] for r in data], [r["question"] for r in data]
    policy = build_vlm("llava", vocabulary(), size="tiny", image_size=32, seed=0)
    policy.save(root / f"policy-{mode}")  # TRL builds the frozen GRPO reference from this path
    policy.model.config._name_or_path = str(root / f"policy-{mode}")
    feats = prompt_features(policy, images, questions)
    router = Router(feats.shape[1], channel.order)
    router.fit_projection(feats)
    if mode == "ckks":
        channel.use_ckks(load_server_kit(server_kit).ckks_context)
        reward = EncryptedMixtureReward(channel, router, feats, images, questions)
    else:
        reward = MixtureReward(lambda i, q, r, x: channel.score(i, q, r, x, phase="grpo", purpose="bench"),
                               router, feats, images, questions)
    timed = _Timed(reward, [], [])
    dataset = build_dataset(images, questions, [r["family"] for r in data])
    torch.manual_seed(0)
    run_grpo(policy, dataset, timed, grpo, out_dir=root / f"trainer-{mode}", seed=0, progress=False)
    steps = grpo.steps
    # one GRPO step = from one reward call to the next (generation, scoring, mixing, update):
    # excludes the trainer's setup and the first step's one-off costs (kit loading, caches)
    return {"step_s": float(np.median(np.diff(timed.starts))), "reward_s": float(np.median(timed.seconds[1:])),
            "bytes_up": grid.bytes_up / steps, "bytes_down": grid.bytes_down / steps,
            "ciphertext_bytes": channel.ciphertext_bytes / steps}


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ckks_step_costs(k: int, n: int, reps: int = 15) -> dict[str, float]:
    """Milliseconds of CKKS work in one GRPO step of ``k`` clients and ``n`` responses, each
    part timed alone (median of ``reps``) with the real functions: a client's encryption, the
    extra Flower serialisation of its reply (ciphertext vs plaintext scores), the server's checks
    and weighted sum, and the decryption round (request + reply serialisation, decryption).
    Stable where the end-to-end step times are not (a shared machine adds +-10% noise)."""
    from flwr.app import Message

    from mor_secure.crypto import ckks
    from mor_secure.deploy.inproc import ensure_task_identity, wire_copy
    from mor_secure.federation import protocol as P

    ensure_task_identity()
    secret = ckks.new_secret_context()
    public = ckks.load_context(ckks.serialize_context(secret, secret=False))
    rng = np.random.default_rng(0)
    scores = [rng.uniform(-5, 5, n) for _ in range(k)]
    weights = [np.full(n, 1.0 / k) for _ in range(k)]
    cts = [ckks.encrypt_scores(secret, x) for x in scores]
    agg = ckks.weighted_sum(public, cts, weights)

    def reply(content):
        return Message(content=content, message_type="query.score", dst_node_id=7)

    plain_msg, ct_msg = reply(P.encode_scores("c", scores[0])), reply(P.encode_encrypted_scores("c", cts[0]))
    dec_req = reply(P.encode_decrypt_request("r", "grpo", agg, n))
    dec_rep = reply(P.encode_aggregate("c", scores[0]))
    costs = {
        "encrypt_per_client": _median_ms(lambda: ckks.encrypt_scores(secret, scores[0]), reps),
        "reply_serialisation_extra_per_client": _median_ms(lambda: wire_copy(ct_msg), reps)
        - _median_ms(lambda: wire_copy(plain_msg), reps),
        "server_check_and_sum": _median_ms(
            lambda: ckks.weighted_sum(public, [ckks.check_ciphertext(public, c, n) for c in cts], weights), reps),
        "decryption_round": _median_ms(lambda: (wire_copy(dec_req), ckks.decrypt_aggregate(secret, agg, n),
                                                wire_copy(dec_rep)), reps),
    }
    per_client = costs["encrypt_per_client"] + costs["reply_serialisation_extra_per_client"]
    costs["total_clients_in_turn"] = k * per_client + costs["server_check_and_sum"] + costs["decryption_round"]
    costs["total_clients_in_parallel"] = per_client + costs["server_check_and_sum"] + costs["decryption_round"]
    return costs


def bench_ckks(counts: tuple[int, ...] = (3, 16), steps: int = 4, repeats: int = 2,
               prompts_per_step: int = 16, num_generations: int = 8) -> list[dict]:
    """Run the benchmark (see the module docstring); one result row per client count.

    The default step shape is the demo config's (16 prompts x 8 generations = 128 responses
    per step); CKKS cost is nearly flat in the number of responses (one ciphertext holds up to
    4096), so smaller steps show a larger relative overhead.
    """
    if steps < 2:
        raise ConfigError(f"steps={steps} must be at least 2: a step is timed from one reward call to the next")
    torch.set_num_threads(1)
    grpo = GrpoSection(steps=steps, prompts_per_step=prompts_per_step, num_generations=num_generations,
                       max_completion_length=3)
    rows = []
    for k in counts:
        with tempfile.TemporaryDirectory(prefix=f"mor-bench-{k}-") as tmp:
            root = Path(tmp)
            nodes, server_kit = _prepare(root, bench_config(k))
            _one_run("none", nodes, server_kit, GrpoSection(steps=2, prompts_per_step=2, num_generations=2,
                                                            max_completion_length=3), root)  # warm caches
            runs: dict[str, list[dict]] = {"none": [], "ckks": []}
            for _ in range(repeats):
                for mode in ("none", "ckks"):
                    runs[mode].append(_one_run(mode, nodes, server_kit, grpo, root))
        med = {m: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for m, rs in runs.items()}
        n = prompts_per_step * num_generations
        costs = ckks_step_costs(k, n)
        rows.append({"clients": k, "responses_per_step": n, "plain": med["none"], "costs_ms": costs,
                     "component_overhead_pct": 100.0 * costs["total_clients_in_turn"] / 1e3 / med["none"]["step_s"],
                     "component_overhead_parallel_pct":
                         100.0 * costs["total_clients_in_parallel"] / 1e3 / med["none"]["step_s"],
                     "ckks": med["ckks"],
                     "overhead_pct": 100.0 * (med["ckks"]["step_s"] / med["none"]["step_s"] - 1.0),
                     # paired by repeat (each CKKS run follows its plaintext run): the noise band
                     "overhead_pct_by_repeat": [100.0 * (c["step_s"] / p["step_s"] - 1.0)
                                                for p, c in zip(runs["none"], runs["ckks"])]})
    return rows


def machine() -> str:
    """A one-line description of this machine."""
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} " \
           f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


def render(rows: list[dict], command: str, date: str) -> str:
    """The BENCHMARKS.md section body for ``rows``."""
    lines = [f"Measured {date} on {machine()}.", "", f"Command: `{command}`", "",
             "| clients | responses/step | GRPO step, plaintext (s) | GRPO step, CKKS (s) | CKKS overhead "
             "(median; per repeat) | reward call, plaintext (s) | reward call, CKKS (s) | ciphertext bytes/step | "
             "server receives/step, plaintext | server receives/step, CKKS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, c = r["plain"], r["ckks"]
        lines.append(f"| {r['clients']} | {r['responses_per_step']} | {p['step_s']:.3f} | {c['step_s']:.3f} | "
                     f"{r['overhead_pct']:+.1f}% ({', '.join(f'{x:+.0f}%' for x in r['overhead_pct_by_repeat'])}) | "
                     f"{p['reward_s']:.3f} | {c['reward_s']:.3f} | "
                     f"{c['ciphertext_bytes'] / 1e6:.2f} MB | {p['bytes_up'] / 1e3:.1f} KB | "
                     f"{c['bytes_up'] / 1e6:.2f} MB |")
    lines += ["", "CKKS work per step, each part timed alone (median of 15, ms) and as a share of the plaintext step:",
              "", "| clients | encrypt (per client) | reply serialisation, extra (per client) | server check + sum | "
              "decryption round | total, clients in turn | total, clients in parallel |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["costs_ms"]
        lines.append(f"| {r['clients']} | {c['encrypt_per_client']:.1f} | {c['reply_serialisation_extra_per_client']:.1f} "
                     f"| {c['server_check_and_sum']:.1f} | {c['decryption_round']:.1f} | "
                     f"{c['total_clients_in_turn']:.0f} ms = {r['component_overhead_pct']:.1f}% | "
                     f"{c['total_clients_in_parallel']:.0f} ms = {r['component_overhead_parallel_pct']:.1f}% |")
    return "\n".join(lines) + "\n"
