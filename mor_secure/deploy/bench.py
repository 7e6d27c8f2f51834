"""``mor-secure bench ckks``: what CKKS aggregation costs per GRPO step, with and without it.

Setup, per client count K: K client folders (tiny DP-SGD reward models of the three families
in turn, trained once), the real ClientApp behind an in-process grid (``deploy.inproc``: Flower
messages deflated and re-inflated, no network), the reward channel, an untrained router and a
tiny LLaVA policy trained by TRL's GRPOTrainer for ``steps`` steps. The two modes run the same
steps on the same folders, ``repeats`` times each, in alternating order (plaintext first in
even repeats, CKKS first in odd ones, so a drift in the machine's load favours neither); the
medians are reported.

Measured per GRPO step (medians over steps 2..S, so the trainer's setup and first-step one-off
costs are left out): wall time and process CPU time of the whole step (generation, K clients
scoring in turn, mixing, policy update), the reward call alone, the bytes the server receives
and sends, and, inside the CKKS runs, the CPU time of each CKKS part (encryption, the server's
checks and sum, the decryption round trip, message serialisation). CPU time is what a shared
machine disturbs least: other jobs delay this process but do not add to its CPU time. Not
measured: network and Flower's polling, identical for the score round trip in both modes; CKKS
adds one decryption round trip per step, which on the deployment runtime costs at least one
SuperNode poll (see BENCHMARKS.md). Clients score one after another here; on separate hosts
they score in parallel, so the per-client encryption time (reported) overlaps instead of adding up.
"""

from __future__ import annotations

import os
import platform
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

    def reset(self) -> None:
        self.seconds.clear()

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


@dataclass
class _Timed:
    """The reward function, timed per call (TRL names the reward column after ``__name__``).

    Records the wall and process CPU clocks at the start of each call, and resets ``parts`` at the
    second call so that they cover the same steps as the medians (2..S)."""

    inner: MixtureReward
    parts: _Parts
    seconds: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    cpu_starts: list[float] = field(default_factory=list)
    __name__ = "mixture_reward"

    def __call__(self, *args, **kwargs):
        if len(self.starts) == 1:
            self.parts.reset()
        start, cpu = time.perf_counter(), time.process_time()
        out = self.inner(*args, **kwargs)
        self.starts.append(start)
        self.cpu_starts.append(cpu)
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
    timed = _Timed(reward, _Parts())
    dataset = build_dataset(images, questions, [r["family"] for r in data])
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    with timed.parts.active():
        run_grpo(policy, dataset, timed, grpo, out_dir=root / f"trainer-{mode}", seed=0, progress=False)
    steps = grpo.steps
    # one GRPO step = from one reward call to the next (generation, scoring, mixing, update):
    # excludes the trainer's setup and the first step's one-off costs (kit loading, caches)
    return {"step_s": float(np.median(np.diff(timed.starts))), "reward_s": float(np.median(timed.seconds[1:])),
            "cpu_step_s": float(np.median(np.diff(timed.cpu_starts))),
            "parts_ms": {k: 1e3 * v / (len(timed.starts) - 1) for k, v in timed.parts.seconds.items()},
            "bytes_up": grid.bytes_up / steps, "bytes_down": grid.bytes_down / steps,
            "ciphertext_bytes": channel.ciphertext_bytes / steps, "load_avg": load}


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
            for r in range(repeats):
                for mode in ("none", "ckks") if r % 2 == 0 else ("ckks", "none"):
                    runs[mode].append(_one_run(mode, nodes, server_kit, grpo, root))
        med = {m: _median_run(rs) for m, rs in runs.items()}
        n = prompts_per_step * num_generations
        costs = ckks_step_costs(k, n)
        rows.append({"clients": k, "responses_per_step": n, "plain": med["none"], "costs_ms": costs,
                     "component_overhead_pct": 100.0 * costs["total_clients_in_turn"] / 1e3 / med["none"]["step_s"],
                     "component_overhead_parallel_pct":
                         100.0 * costs["total_clients_in_parallel"] / 1e3 / med["none"]["step_s"],
                     "ckks": med["ckks"],
                     "overhead_pct": 100.0 * (med["ckks"]["step_s"] / med["none"]["step_s"] - 1.0),
                     "cpu_overhead_pct": 100.0 * (med["ckks"]["cpu_step_s"] / med["none"]["cpu_step_s"] - 1.0),
                     # paired by repeat (the two runs of a repeat are adjacent in time): the noise band
                     "overhead_pct_by_repeat": [100.0 * (c["step_s"] / p["step_s"] - 1.0)
                                                for p, c in zip(runs["none"], runs["ckks"])],
                     "cpu_overhead_pct_by_repeat": [100.0 * (c["cpu_step_s"] / p["cpu_step_s"] - 1.0)
                                                    for p, c in zip(runs["none"], runs["ckks"])],
                     "load_avg": [r["load_avg"] for rs in runs.values() for r in rs]})
    return rows


def _median_run(runs: list[dict]) -> dict:
    """Key-wise median of ``_one_run`` results (the CKKS parts too, part by part)."""
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "parts_ms"}
    labels = sorted({label for r in runs for label in r["parts_ms"]})
    out["parts_ms"] = {label: statistics.median(r["parts_ms"].get(label, 0.0) for r in runs) for label in labels}
    return out


def machine() -> str:
    """A one-line description of this machine."""
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} " \
           f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


TITLE = "CKKS aggregation per GRPO step"
TARGET_PCT = 5.0  # issue target: CKKS adds at most 5% per GRPO step at 3 clients


def _pcts(values: list[float]) -> str:
    return ", ".join(f"{x:+.0f}%" for x in values)


def _kb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def where_the_time_goes(row: dict) -> dict[str, float]:
    """CPU ms per step of each CKKS part inside the CKKS runs (medians over repeats), the extra
    serialisation of ciphertext replies over plaintext ones, their sum, and the measured CPU
    difference between a CKKS step and a plaintext step."""
    p, c = row["plain"]["parts_ms"], row["ckks"]["parts_ms"]
    out = {"encrypt": c.get("encrypt", 0.0),
           "reply_serialisation_extra": c.get("wire query.score reply", 0.0) - p.get("wire query.score reply", 0.0),
           "server_check": c.get("server check", 0.0), "server_sum": c.get("server sum", 0.0),
           "decryption_round": c.get("decryption round", 0.0), "decrypt": c.get("decrypt", 0.0)}
    out["parts"] = sum(v for k, v in out.items() if k != "decrypt")
    out["measured"] = 1e3 * (row["ckks"]["cpu_step_s"] - row["plain"]["cpu_step_s"])
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
        "Plaintext and CKKS runs alternate on the same client folders, `--repeats` times each, the order "
        "swapped every repeat; a step is timed from one reward call to the next, so the trainer's setup and "
        "the first step's one-off costs are excluded. Each step is timed on the wall clock and in process "
        "CPU time: on a shared machine other jobs delay this process (wall) but add nothing to its CPU time, "
        "so the CPU figure is the steadier measure of what CKKS costs. The third table times each CKKS part "
        "inside the CKKS runs (CPU time of the real functions); the fourth times each part alone.",
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
        met = [name for name, x in (("CPU time", c), ("wall clock", w)) if x <= TARGET_PCT]
        verdict = ("met on " + " and ".join(met)) if met else "missed"
        lines.append(
            f"- **{r['clients']} clients: CKKS adds {c:+.1f}% CPU time per step ({_pcts(r['cpu_overhead_pct_by_repeat'])} "
            f"by repeat) and {w:+.1f}% wall-clock time ({_pcts(r['overhead_pct_by_repeat'])})"
            + (f": the {TARGET_PCT:.0f}% target is {verdict}.**" if r["clients"] == 3 else ".**")
            + f" Inside the CKKS runs the CKKS parts take {t['parts']:.0f} ms of CPU per step (encryption "
            f"{t['encrypt']:.1f} ms for all clients, the server's checks and sum {t['server_check'] + t['server_sum']:.1f} ms, "
            f"the decryption round trip {t['decryption_round']:.1f} ms, of which {t['decrypt']:.1f} ms decrypting), "
            f"{100 * t['parts'] / 1e3 / r['plain']['cpu_step_s']:.1f}% of a plaintext step's CPU time; the median CKKS "
            f"step took {t['measured']:+.0f} ms of CPU against the median plaintext step (whole steps vary by more "
            "than that from run to run: the per-repeat figures show by how much). Timed alone, the parts add "
            f"{costs['total_clients_in_turn']:.0f} ms ({r['component_overhead_pct']:.1f}%) with the clients in turn, "
            f"{costs['total_clients_in_parallel']:.0f} ms ({r['component_overhead_parallel_pct']:.1f}%) with the "
            "clients encrypting in parallel as on separate hosts.")
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
        "seconds rather than milliseconds; see the loopback measurement below.",
    ]
    return lines


def render(rows: list[dict], command: str, date: str) -> str:
    """The BENCHMARKS.md section body for ``rows`` (explanation, tables, reading)."""
    lines = _intro(rows, command, date) + [
        "", "| clients | responses/step | GRPO step, plaintext (s) | GRPO step, CKKS (s) | wall-clock overhead "
        "(median; per repeat) | CPU per step, plaintext (s) | CPU per step, CKKS (s) | CPU overhead (median; per "
        "repeat) | reward call, plaintext (s) | reward call, CKKS (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, c = r["plain"], r["ckks"]
        lines.append(f"| {r['clients']} | {r['responses_per_step']} | {p['step_s']:.3f} | {c['step_s']:.3f} | "
                     f"{r['overhead_pct']:+.1f}% ({_pcts(r['overhead_pct_by_repeat'])}) | {p['cpu_step_s']:.3f} | "
                     f"{c['cpu_step_s']:.3f} | {r['cpu_overhead_pct']:+.1f}% ({_pcts(r['cpu_overhead_pct_by_repeat'])}) | "
                     f"{p['reward_s']:.3f} | {c['reward_s']:.3f} |")
    lines += ["", "Bytes per step:", "", "| clients | ciphertexts (clients + aggregate) | server receives, plaintext | "
              "server receives, CKKS | server sends, plaintext | server sends, CKKS |", "|---|---|---|---|---|---|"]
    for r in rows:
        p, c = r["plain"], r["ckks"]
        lines.append(f"| {r['clients']} | {_kb(c['ciphertext_bytes'])} | {_kb(p['bytes_up'])} | {_kb(c['bytes_up'])} | "
                     f"{_kb(p['bytes_down'])} | {_kb(c['bytes_down'])} |")
    lines += ["", "Where the CPU time goes inside the CKKS runs (ms per step, median over repeats):", "",
              "| clients | encrypt (all clients) | ciphertext replies' serialisation, extra | server check | "
              "server sum | decryption round trip (decryption) | CKKS parts | CKKS step - plaintext step (CPU) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = where_the_time_goes(r)
        lines.append(f"| {r['clients']} | {t['encrypt']:.1f} | {t['reply_serialisation_extra']:.1f} | "
                     f"{t['server_check']:.1f} | {t['server_sum']:.1f} | {t['decryption_round']:.1f} "
                     f"({t['decrypt']:.1f}) | {t['parts']:.1f} | {t['measured']:.1f} |")
    lines += ["", "CKKS work per step, each part timed alone (median of 15, ms) and as a share of the plaintext step:",
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
