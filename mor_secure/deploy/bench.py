"""``mor-secure bench ckks``: what CKKS aggregation costs per GRPO step, with and without it.

Setup, per client count K: K client folders (tiny DP-SGD reward models of the three families
in turn, trained once), the real ClientApp behind an in-process grid (``deploy.inproc``: Flower
messages deflated and re-inflated, no network), the reward channel, an untrained router and a
tiny LLaVA policy trained by TRL's GRPOTrainer for ``steps`` steps. Within each run the steps
alternate between the plaintext and the CKKS reward (same channel, router and clients), so two
consecutive steps differ only in how the mixture is formed and a drift in the machine's load
shifts both alike; ``repeats`` runs, each starting with the other mode. The overhead is the median
of the CKKS-minus-plaintext differences over consecutive pairs of steps.

Measured per GRPO step (the first step of each run, with the trainer's setup and one-off
costs, left out): wall time and process CPU time of the whole step (generation, K clients
scoring in turn, mixing, policy update), the reward call alone, the bytes the server receives
and sends, and, in the CKKS steps, the CPU time of each CKKS part (encryption, the server's
checks and sum, the decryption round trip, message serialisation). CPU time is what a shared
machine disturbs least: other jobs delay this process but do not add to its CPU time. Not
measured: network and Flower's polling, identical for the score round trip in both modes; CKKS
adds one decryption round trip per step, which on the deployment runtime costs at least one
SuperNode poll (see BENCHMARKS.md). Clients score one after another here; on separate hosts
they score in parallel, so the per-client encryption time (reported) overlaps instead of adding up.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mor_secure.alignment.grpo import MixtureReward, build_dataset, run_grpo
from mor_secure.alignment.policy import prompt_features
from mor_secure.config import GrpoSection, RunConfig, parse_config
from mor_secure.crypto import ckks
from mor_secure.crypto.provision import load_server_kit, provision
from mor_secure.bench.markdown import machine
from mor_secure.data import make_server_sets, vocabulary
from mor_secure.deploy import inproc
from mor_secure.deploy.client_init import init_client_folder
from mor_secure.deploy.inproc import InProcessGrid
from mor_secure.errors import ConfigError
from mor_secure.federation.channel import Channel, EncryptedMixtureReward
from mor_secure.federation.client_app import make_client_app
from mor_secure.federation.client_node import ClientNode
from mor_secure.models.factory import build_vlm
from mor_secure.rewards.router import Router

_FAMILIES = [("llava", "colour"), ("idefics3", "count"), ("paligemma", "position")]


class _Parts:
    """CPU seconds spent in each CKKS part of the real code path while ``active`` (benchmark-only
    wrappers around the functions listed there, removed on exit).

    Everything runs in this thread (in-process grid), so ``time.thread_time`` is the CPU time of
    exactly the wrapped call. Serialisation of every message is timed by type and direction.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def _wrap(self, label, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label(*args) if callable(label) else label] += time.thread_time() - start

        return timed

    @contextmanager
    def active(self):
        def wire_label(msg):
            return f"wire {msg.metadata.message_type} {'reply' if msg.metadata.reply_to_message_id else 'request'}"

        targets = [(ClientNode, "encrypt", "encrypt"), (ClientNode, "decrypt", "decrypt"),
                   (Channel, "_ciphertexts", "server check"), (ckks, "weighted_sum", "server sum"),
                   (Channel, "_decrypt", "decryption round"), (inproc, "wire_copy", wire_label)]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
        try:
            for (owner, name, label), (_, _, fn) in zip(targets, saved):
                setattr(owner, name, self._wrap(label, fn))
            yield self
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)


MODES = ("none", "ckks")


@dataclass
class _Alternating:
    """The reward function of a run whose GRPO steps alternate between the plaintext and the CKKS
    reward (see ``mode``; TRL names the reward column after ``__name__``).

    Both rewards go through the same channel, router and clients, so consecutive steps differ
    only in how the mixture is formed; a drift in the machine's load shifts both alike. Each call
    records its mode, the wall and process CPU clocks at its start, its own duration, and what it
    added to the part timers and byte counters."""

    rewards: dict[str, MixtureReward]
    first: str
    parts: _Parts
    grid: InProcessGrid
    channel: Channel
    calls: list[dict] = field(default_factory=list)
    __name__ = "mixture_reward"

    def mode(self, call: int) -> str:
        """The mode of the ``call``-th reward call: after the first call (left out of the figures),
        pairs of steps in the order first-other, other-first, first-other, ... (A B B A A B ...):
        each pair holds one step of each mode and neither mode always falls on odd steps (the
        trainer's odd and even steps differ by tens of ms, whatever the reward)."""
        if call == 0:
            return self.first
        pair, pos = divmod(call - 1, 2)
        return (self.first, MODES[1 - MODES.index(self.first)])[pos ^ (pair % 2)]

    def __call__(self, *args, **kwargs):
        mode = self.mode(len(self.calls))
        parts = dict(self.parts.seconds)
        counters = self._counters()
        start, cpu = time.perf_counter(), time.process_time()
        out = self.rewards[mode](*args, **kwargs)
        self.calls.append({
            "mode": mode, "start": start, "cpu_start": cpu, "reward_s": time.perf_counter() - start,
            "reward_cpu_s": time.process_time() - cpu,
            "parts_ms": {k: 1e3 * (v - parts.get(k, 0.0)) for k, v in self.parts.seconds.items() if v > parts.get(k, 0.0)},
            **{k: after - before for (k, after), before in zip(self._counters().items(), counters.values())}})
        return out

    def _counters(self) -> dict[str, float]:
        return {"bytes_up": self.grid.bytes_up, "bytes_down": self.grid.bytes_down,
                "ciphertext_bytes": self.channel.ciphertext_bytes}


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


def _one_run(first: str, nodes: dict[int, dict], server_kit: Path, grpo: GrpoSection, root: Path) -> dict:
    """One GRPO run whose steps alternate between the modes, ``first`` first. Returns per mode the
    steps (each from its reward call to the next call: generation, scoring, mixing, update), the
    first step left out (the trainer's setup and one-off costs), and the differences CKKS minus
    plaintext over consecutive pairs of steps (each step in one pair only)."""
    grid = InProcessGrid(make_client_app(), nodes)
    channel = Channel(grid, "bench", root / "events.jsonl", timeout_s=600)
    channel.train_all(timeout_s=600)
    n_prompts = grpo.prompts_per_step * 2
    data = make_server_sets("shapes", None, 0, 32, n_public=n_prompts, n_objective=8, n_eval=8)["public"]
    images, questions = [r["image"] for r in data], [r["question"] for r in data]
    policy = build_vlm("llava", vocabulary(), size="tiny", image_size=32, seed=0)
    policy.save(root / "policy")  # TRL builds the frozen GRPO reference from this path
    policy.model.config._name_or_path = str(root / "policy")
    feats = prompt_features(policy, images, questions)
    router = Router(feats.shape[1], channel.order)
    router.fit_projection(feats)
    channel.use_ckks(load_server_kit(server_kit).ckks_context)
    rewards = {"ckks": EncryptedMixtureReward(channel, router, feats, images, questions),
               "none": MixtureReward(lambda i, q, r, x: channel.score(i, q, r, x, phase="grpo", purpose="bench"),
                                     router, feats, images, questions)}
    reward = _Alternating(rewards, first, _Parts(), grid, channel)
    dataset = build_dataset(images, questions, [r["family"] for r in data])
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    with reward.parts.active():
        run_grpo(policy, dataset, reward, grpo, out_dir=root / "trainer", seed=0, progress=False)
    calls = reward.calls
    steps = [dict(c, step_s=n["start"] - c["start"], cpu_step_s=n["cpu_start"] - c["cpu_start"])
             for c, n in zip(calls[1:], calls[2:])]
    pairs = [(a, b) if a["mode"] == "none" else (b, a) for a, b in zip(steps[::2], steps[1::2])]
    return {"steps": {m: [x for x in steps if x["mode"] == m] for m in MODES}, "load_avg": load,
            "pair_diffs": {key: [c[key] - p[key] for p, c in pairs] for key in ("step_s", "cpu_step_s", "reward_cpu_s")}}


def _medians(steps: list[dict]) -> dict:
    """Step-wise medians of one mode's steps (each CKKS part and each counter too)."""
    out = {key: statistics.median(x[key] for x in steps)
           for key in ("step_s", "cpu_step_s", "reward_s", "reward_cpu_s", "bytes_up", "bytes_down", "ciphertext_bytes")}
    labels = sorted({label for x in steps for label in x["parts_ms"]})
    out["parts_ms"] = {label: statistics.median(x["parts_ms"].get(label, 0.0) for x in steps) for label in labels}
    return out


def _median_ms(fn, reps: int) -> float:
    """Median CPU milliseconds of ``fn()`` in this thread (what other jobs on the machine disturb least)."""
    times = []
    for _ in range(reps):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return 1e3 * statistics.median(times)


def ckks_step_costs(k: int, n: int, reps: int = 15) -> dict[str, float]:
    """CPU milliseconds of CKKS work in one GRPO step of ``k`` clients and ``n`` responses, each
    part timed alone (median of ``reps``) with the real functions: a client's encryption, the
    extra Flower serialisation of its reply (ciphertext vs plaintext scores), the server's checks
    and weighted sum, and the decryption round (request + reply serialisation, decryption).
    Stable where the end-to-end step times are not (a shared machine adds +-10% noise)."""
    from flwr.app import Message

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
    2048), so smaller steps show a larger relative overhead.
    """
    if steps < 4:
        raise ConfigError(f"steps={steps} must be at least 4: the modes alternate step by step and the first step "
                          "of a run is left out")
    torch.set_num_threads(1)
    grpo = GrpoSection(steps=steps, prompts_per_step=prompts_per_step, num_generations=num_generations,
                       max_completion_length=3)
    rows = []
    for k in counts:
        with tempfile.TemporaryDirectory(prefix=f"mor-bench-{k}-") as tmp:
            root = Path(tmp)
            nodes, server_kit = _prepare(root, bench_config(k))
            _one_run("none", nodes, server_kit, GrpoSection(steps=4, prompts_per_step=2, num_generations=2,
                                                            max_completion_length=3), root)  # warm caches
            runs = [_one_run(MODES[r % 2], nodes, server_kit, grpo, root) for r in range(repeats)]
        med = {m: _medians([x for run in runs for x in run["steps"][m]]) for m in MODES}
        plain = med["none"]
        n = prompts_per_step * num_generations
        costs = ckks_step_costs(k, n)

        def pct(diffs: list[float], base: float) -> float:
            return 100.0 * statistics.median(diffs) / base

        rows.append({"clients": k, "responses_per_step": n, "plain": plain, "ckks": med["ckks"], "costs_ms": costs,
                     "component_overhead_pct": 100.0 * costs["total_clients_in_turn"] / 1e3 / plain["cpu_step_s"],
                     "component_overhead_parallel_pct":
                         100.0 * costs["total_clients_in_parallel"] / 1e3 / plain["cpu_step_s"],
                     # median of the CKKS - plaintext differences over consecutive steps, all runs pooled
                     "overhead_pct": pct([d for r in runs for d in r["pair_diffs"]["step_s"]], plain["step_s"]),
                     "cpu_overhead_pct": pct([d for r in runs for d in r["pair_diffs"]["cpu_step_s"]],
                                             plain["cpu_step_s"]),
                     "pairs": sum(len(r["pair_diffs"]["step_s"]) for r in runs),
                     "reward_cpu_diff_ms": 1e3 * statistics.median(d for r in runs for d in r["pair_diffs"]["reward_cpu_s"]),
                     # the same, run by run: the noise band
                     "overhead_pct_by_repeat": [pct(r["pair_diffs"]["step_s"], _medians(r["steps"]["none"])["step_s"])
                                                for r in runs],
                     "cpu_overhead_pct_by_repeat": [pct(r["pair_diffs"]["cpu_step_s"],
                                                        _medians(r["steps"]["none"])["cpu_step_s"]) for r in runs],
                     "load_avg": [r["load_avg"] for r in runs]})
    return rows


TITLE = "CKKS aggregation per GRPO step"
TARGET_PCT = 5.0  # issue target: CKKS adds at most 5% per GRPO step at 3 clients


def _pct(x: float) -> str:
    return f"{int(round(x)):+d}"  # never "-0"


def _pcts(values: list[float]) -> str:
    return ", ".join(f"{_pct(x)}%" for x in values)


def _kb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def where_the_time_goes(row: dict) -> dict[str, float]:
    """CPU ms per step of each CKKS part in the CKKS steps (medians over the steps), the extra
    serialisation of ciphertext replies over plaintext ones, their sum, and the measured CPU
    difference between a CKKS step and a plaintext step (median over consecutive pairs)."""
    p, c = row["plain"]["parts_ms"], row["ckks"]["parts_ms"]
    out = {"encrypt": c.get("encrypt", 0.0),
           "reply_serialisation_extra": c.get("wire query.score reply", 0.0) - p.get("wire query.score reply", 0.0),
           "server_check": c.get("server check", 0.0), "server_sum": c.get("server sum", 0.0),
           "decryption_round": c.get("decryption round", 0.0), "decrypt": c.get("decrypt", 0.0)}
    out["parts"] = sum(v for k, v in out.items() if k != "decrypt")
    out["measured"] = 10.0 * row["cpu_overhead_pct"] * row["plain"]["cpu_step_s"]  # median paired difference, ms
    out["measured_reward_call"] = row["reward_cpu_diff_ms"]
    return out


def _intro(rows: list[dict], command: str, date: str) -> list[str]:
    params = ckks.CkksParams()
    loads = [x for r in rows for x in r["load_avg"]]
    cpus = os.cpu_count() or 1
    shared = max(loads) > 0.5 * cpus
    return [
        "What it measures (`mor_secure/deploy/bench.py`): K clients with tiny DP-SGD reward models (LLaVA, "
        "Idefics3, PaliGemma in turn) behind the real ClientApp, reached through an in-process Flower grid "
        "(every message deflated to Flower's wire objects and re-inflated; no network, no TLS, no polling); "
        "the real reward channel; a tiny LLaVA policy trained by TRL's GRPOTrainer with the demo's step shape. "
        "Within each GRPO run the steps alternate between the plaintext and the CKKS reward (same channel, "
        "router and clients), so consecutive steps differ only in how the mixture is formed and a change in "
        "the machine's load shifts both alike; `--repeats` runs, each starting with the other mode. A step is "
        "timed from one reward call to the next (generation, scoring, mixing, policy update); the first step of "
        "each run (the trainer's setup, one-off costs) is left out. The overhead is the median of the "
        "CKKS-minus-plaintext differences over consecutive pairs of steps (each step in one pair), relative "
        "to the median plaintext step; the per-run figures show the noise band. Each step is timed on the "
        "wall clock and in process "
        "CPU time: on a shared machine other jobs delay this process (wall) but add nothing to its CPU time, "
        "so the CPU figure is the steadier measure of what CKKS costs. The third table times each CKKS part "
        "inside the CKKS steps (CPU time of the real functions); the fourth times each part alone.",
        "",
        f"CKKS parameters (`ckks.CkksParams`, from `mor-secure provision`): N={params.poly_modulus_degree} "
        f"({params.poly_modulus_degree // 2} slots), moduli {params.coeff_mod_bit_sizes} bits "
        f"(= {sum(params.coeff_mod_bit_sizes)}, the 128-bit bound at this N), scale 2^{int(np.log2(params.global_scale))}.",
        "",
        f"Measured {date} on {machine()}. Load average (1 min) at the start of each run: "
        f"{min(loads):.1f} to {max(loads):.1f} on {cpus} CPUs: "
        + ("**the machine was shared with other jobs**, so wall-clock times are noisy; the CPU-time columns "
           "are the ones to read." if shared else "the machine was otherwise idle."),
        "",
        f"Command: `{command}`",
    ]


def _reading(rows: list[dict]) -> list[str]:
    lines = ["", f"Reading the results (the target: CKKS adds at most {TARGET_PCT:.0f}% per GRPO step at 3 clients):", ""]
    for r in rows:
        w, c, t = r["overhead_pct"], r["cpu_overhead_pct"], where_the_time_goes(r)
        costs = r["costs_ms"]
        share = 100 * t["parts"] / 1e3 / r["plain"]["cpu_step_s"]
        runs = r["cpu_overhead_pct_by_repeat"]
        if share > TARGET_PCT:
            verdict = "missed"
        elif c <= TARGET_PCT:
            verdict = "met, part by part and end to end"
        else:
            verdict = f"met part by part ({share:.1f}%), not shown end to end"
        noisy = min(runs) < 0 or max(runs) - min(runs) > TARGET_PCT
        lines.append(
            f"- **{r['clients']} clients: the CKKS parts take {t['parts']:.0f} ms of CPU per step, {share:.1f}% of a "
            f"plaintext step's CPU time"
            + (f": the {TARGET_PCT:.0f}% target is {verdict}.**" if r["clients"] == 3 else ".**")
            + f" (Encryption {t['encrypt']:.1f} ms for all clients, the server's checks and sum "
            f"{t['server_check'] + t['server_sum']:.1f} ms, the decryption round trip {t['decryption_round']:.1f} ms, of "
            f"which {t['decrypt']:.1f} ms decrypting.) Whole steps: CKKS adds {c:+.1f}% CPU time "
            f"({_pcts(runs)} run by run) and {w:+.1f}% wall-clock time ({_pcts(r['overhead_pct_by_repeat'])}); between "
            f"paired steps the reward call differed by {t['measured_reward_call']:+.0f} ms of CPU and the whole step by "
            f"{t['measured']:+.0f} ms."
            + (f" Differences this small are inside this machine's step-to-step noise (the run-by-run values span "
               f"{_pct(min(runs))} to {_pct(max(runs))} points), so the parts measured inside the steps are the firmer "
               "figure." if noisy else "")
            + f" Timed alone, the parts add {costs['total_clients_in_turn']:.0f} ms ({r['component_overhead_pct']:.1f}%) "
            f"with the clients in turn, {costs['total_clients_in_parallel']:.0f} ms "
            f"({r['component_overhead_parallel_pct']:.1f}%) with the clients encrypting in parallel as on separate hosts.")
    lines += [
        f"- **Bytes.** One ciphertext holds up to {ckks.slot_count()} scores whatever the number of responses: "
        + "; ".join(f"{_kb(r['ckks']['ciphertext_bytes'])} of ciphertexts per step at {r['clients']} clients (the "
                    f"server receives {_kb(r['ckks']['bytes_up'])} instead of {_kb(r['plain']['bytes_up'])})"
                    for r in rows) + ".",
        "- **What is left is inherent to the protocol, not the cryptography's implementation:** the decryption "
        "round trip is one more message each way (the request carries the aggregate; Flower builds, hashes and "
        "serialises both messages and the ClientApp dispatches the request), and each client's reply carries a "
        "ciphertext instead of a float32 vector. Ciphertexts travel as uint8 Arrays, which Flower moves far "
        "faster than bytes inside a ConfigRecord (`protocol._bytes_array`).",
        "- **Not in these numbers: the deployment runtime.** There the extra round trip costs at least one "
        "SuperNode poll (Flower 1.42 sleeps up to 3 s between polls when a SuperNode has nothing to do), "
        "seconds rather than milliseconds: one more reward round trip per step, whose cost section "
        "'Performance' (b) measures.",
    ]
    return lines


def render(rows: list[dict], command: str, date: str) -> str:
    """The BENCHMARKS.md section body for ``rows`` (explanation, tables, reading)."""
    lines = _intro(rows, command, date) + [
        "", "| clients | responses/step | step pairs | GRPO step, plaintext (s) | GRPO step, CKKS (s) | wall-clock "
        "overhead (median; per run) | CPU per step, plaintext (s) | CPU per step, CKKS (s) | CPU overhead (median; "
        "per run) | reward call, plaintext (s) | reward call, CKKS (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, c = r["plain"], r["ckks"]
        lines.append(f"| {r['clients']} | {r['responses_per_step']} | {r['pairs']} | {p['step_s']:.3f} | {c['step_s']:.3f} | "
                     f"{r['overhead_pct']:+.1f}% ({_pcts(r['overhead_pct_by_repeat'])}) | {p['cpu_step_s']:.3f} | "
                     f"{c['cpu_step_s']:.3f} | {r['cpu_overhead_pct']:+.1f}% ({_pcts(r['cpu_overhead_pct_by_repeat'])}) | "
                     f"{p['reward_s']:.3f} | {c['reward_s']:.3f} |")
    lines += ["", "Bytes per step:", "", "| clients | ciphertexts (clients + aggregate) | server receives, plaintext | "
              "server receives, CKKS | server sends, plaintext | server sends, CKKS |", "|---|---|---|---|---|---|"]
    for r in rows:
        p, c = r["plain"], r["ckks"]
        lines.append(f"| {r['clients']} | {_kb(c['ciphertext_bytes'])} | {_kb(p['bytes_up'])} | {_kb(c['bytes_up'])} | "
                     f"{_kb(p['bytes_down'])} | {_kb(c['bytes_down'])} |")
    lines += ["", "Where the CPU time goes in the CKKS steps (ms per step, medians over the steps):", "",
              "| clients | encrypt (all clients) | ciphertext replies' serialisation, extra | server check | "
              "server sum | decryption round trip (decryption) | CKKS parts | CKKS - plaintext, reward call (CPU, paired) | "
              "CKKS - plaintext, whole step (CPU, paired) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = where_the_time_goes(r)
        lines.append(f"| {r['clients']} | {t['encrypt']:.1f} | {t['reply_serialisation_extra']:.1f} | "
                     f"{t['server_check']:.1f} | {t['server_sum']:.1f} | {t['decryption_round']:.1f} "
                     f"({t['decrypt']:.1f}) | {t['parts']:.1f} | {t['measured_reward_call']:.1f} | {t['measured']:.1f} |")
    lines += ["", "CKKS work per step, each part timed alone (median of 15, CPU ms) and as a share of the plaintext step's CPU time:",
              "", "| clients | encrypt (per client) | reply serialisation, extra (per client) | server check + sum | "
              "decryption round | total, clients in turn | total, clients in parallel |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["costs_ms"]
        lines.append(f"| {r['clients']} | {c['encrypt_per_client']:.1f} | {c['reply_serialisation_extra_per_client']:.1f} "
                     f"| {c['server_check_and_sum']:.1f} | {c['decryption_round']:.1f} | "
                     f"{c['total_clients_in_turn']:.0f} ms = {r['component_overhead_pct']:.1f}% | "
                     f"{c['total_clients_in_parallel']:.0f} ms = {r['component_overhead_parallel_pct']:.1f}% |")
    return "\n".join(lines + _reading(rows)) + "\n"


def write_section(path: Path | str, body: str) -> str:
    """Replace the ``ckks`` section of the BENCHMARKS.md at ``path`` with ``body``."""
    from mor_secure.bench.markdown import update_section

    return update_section(path, "ckks", TITLE, body)
