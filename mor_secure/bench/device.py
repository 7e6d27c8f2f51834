"""``mor-secure bench device``: the pipeline's model code on real-size models, on an accelerator.

Tests, the demo and the other benchmarks use tiny models on CPUs. This command builds real-size
models (``size: base``: a 1024 x 24 vision tower and a 2048 x 24 language model, about 1.2 billion
parameters each, random weights from the transformers config classes: nothing is downloaded) of
the three client families, on a GPU, and times the same library code the pipeline runs:

(a) **a client's reward-model step, DP-SGD over non-private**, per Opacus grad-sample mode: the
    real :func:`mor_secure.rewards.train.train_reward_model` (frozen vision tower, LoRA r 16 on the
    language model, projector and scalar head trainable; Opacus' ``make_private`` with Poisson
    sampling), on one batch of pairs per step as ``bench perf`` (a) does (DP-SGD's sampling rate 1,
    so both sides see the same batch size), the first step left out, ``torch.cuda.synchronize``
    before each time is read;
(b) **a GRPO step** of a real-size LLaVA policy with TRL's GRPOTrainer (frozen reference, KL
    penalty), rewarded by three real-size client RMs (LLaVA, Idefics3, PaliGemma) on the same GPU
    through the same ``MixtureReward``, router and clip-and-noise release as the pipeline; the
    reward call (the three clients' scoring) is timed inside each step.

From (b)'s in-process step and the extra time per step that ``bench perf`` (b) measured for
rewards through Flower over TLS (its file ``benchmarks/perf_results.json``), the section states the
ratio that transport would give at this step size. That figure combines two measurements from two
machines and says so: the transport's cost (messages of prompts, responses and scores, whose size
does not grow with the models) was not measured on the GPU machine.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mor_secure.bench.calibration import dpsgd_plans_once
from mor_secure.bench.timing import TimedReward, median, ratios, train_once, try_mode
from mor_secure.config import GrpoSection
from mor_secure.errors import ConfigError
from mor_secure.models.factory import FAMILIES as _FAMILY_TABLE

FAMILIES = tuple(_FAMILY_TABLE)  # llava, idefics3, paligemma

SECTION, TITLE = "device", "Real-size models on a GPU"
# one-line smoke sizes (seconds on a CPU): every part runs, the numbers mean nothing
QUICK = {"size": "tiny", "image_size": 32, "batch_size": 4, "steps": 3, "repeats": 1, "modes": ("hooks",),
         "families": ("llava",), "grpo": {"steps": 3, "prompts_per_step": 2, "num_generations": 2}}
_OWNED = {"llava": ["colour", "size"], "idefics3": ["count"], "paligemma": ["position", "shape"]}


def resolve_device(name: str) -> torch.device:
    """``cuda`` (or ``cuda:N``) only where PyTorch sees such a device; ``cpu`` always."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: PyTorch sees no CUDA device here (torch {torch.__version__}, "
                          f"cuda build: {torch.version.cuda}); run it on a machine with a GPU, or pass "
                          "--device cpu --size tiny for a smoke run")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--device {name}: use cuda, cuda:N or cpu")
    return device


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _build_rm(family: str, size: str, image_size: int, device: torch.device, lora_r: int, seed: int = 0):
    from mor_secure.data import vocabulary
    from mor_secure.models.factory import build_vlm
    from mor_secure.rewards.reward_model import RewardModel

    vlm = build_vlm(family, vocabulary(), size=size, image_size=image_size, seed=seed, device=device)
    return RewardModel(vlm, lora_r=lora_r, seed=seed).to(device)


def _model_shape(rm, pair: dict) -> dict:
    enc = rm.vlm.encode([pair["image"]], [f"{pair['question']} {pair['chosen']}"])
    return {"params": sum(p.numel() for p in rm.parameters()),
            "trainable_params": sum(p.numel() for p in rm.trainable_parameters()),
            "tokens": int(enc["input_ids"].shape[1])}


def bench_rm_steps(device: torch.device, *, size: str, image_size: int, families: Sequence[str],
                   modes: Sequence[str], batch_size: int, steps: int, repeats: int, lora_r: int = 16,
                   progress: bool = True) -> dict:
    """(a): per family, the median RM step without DP and per Opacus grad-sample mode, with peaks."""
    from mor_secure.data import make_client_pairs
    from mor_secure.rewards.train import TrainSettings

    if steps < 3:
        raise ConfigError(f"--steps {steps}: at least 3 (the first step and the last are not timed)")
    out: dict = {"families": {}, "failed_modes": {}}
    working = list(modes)
    total = repeats * len(families) * (1 + len(modes))
    with tqdm(total=total, desc="(a) RM step", disable=not progress) as bar, dpsgd_plans_once():
        pairs = {fam: make_client_pairs("shapes", _OWNED.get(fam, ["colour"]), batch_size, seed=i,
                                        image_size=image_size, client_index=i, n_clients=len(families))
                 for i, fam in enumerate(families)}
        runs: dict[str, dict[str, list[dict]]] = {fam: {} for fam in families}
        for fam in families:
            rm = _build_rm(fam, size, image_size, device, lora_r)
            out["families"][fam] = _model_shape(rm, pairs[fam][0])
            del rm
        for rep in range(repeats):
            for fam in families:
                base = TrainSettings(epochs=steps, batch_size=batch_size, lr=0.5, optimizer="sgd", dp=False,
                                     target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, seed=rep)
                order = [("none", False, "hooks"), *[(m, True, m) for m in working]]
                if rep % 2:
                    order.reverse()
                for name, dp, mode in order:
                    bar.update(1)
                    if name != "none" and name not in working:
                        continue
                    bar.set_postfix_str(f"{fam} {name}")
                    _reset_peak(device)
                    build = functools.partial(_build_rm, fam, size, image_size, device, lora_r)
                    row = try_mode(name, functools.partial(train_once, build, pairs[fam], dp=dp, mode=mode,
                                                           settings_base=base, sync=_sync(device)),
                                   working=working, families=families, runs=runs, failed=out["failed_modes"])
                    if row is None:
                        continue
                    row["peak_gb"] = _peak_gb(device)
                    runs[fam].setdefault(name, []).append(row)
    for fam in families:
        none = runs[fam]["none"]
        fam_row = out["families"][fam]
        fam_row.update(none_s=median([r["step_s"] for r in none]), none_peak_gb=none[-1]["peak_gb"], modes={},
                       none_forward_s=median([r["forward_s"] for r in none]),
                       none_rest_s=median([r["rest_s"] for r in none]))
        for mode in working:
            rs = runs[fam].get(mode, [])
            m = {"step_s": median([r["step_s"] for r in rs]), "peak_gb": rs[-1]["peak_gb"],
                 "forward_s": median([r["forward_s"] for r in rs]), "rest_s": median([r["rest_s"] for r in rs]),
                 "ratio_by_repeat": [r["step_s"] / n["step_s"] for r, n in zip(rs, none)]}
            m["ratio"] = m["step_s"] / fam_row["none_s"]
            fam_row["modes"][mode] = m
        if fam_row["modes"]:
            best = min(fam_row["modes"], key=lambda k: fam_row["modes"][k]["ratio"])
            fam_row["best_mode"], fam_row["best_ratio"] = best, fam_row["modes"][best]["ratio"]
    out["working_modes"] = working
    return out


def bench_grpo_step(device: torch.device, *, size: str, image_size: int, steps: int, prompts_per_step: int,
                    num_generations: int, clip_bound: float = 5.0, noise_std: float = 0.1,
                    progress: bool = True) -> dict:
    """(b): GRPO steps of a real-size policy, rewards from three real-size client RMs in-process."""
    from mor_secure.alignment.grpo import MixtureReward, build_dataset, run_grpo
    from mor_secure.alignment.policy import prompt_features
    from mor_secure.bench.alignment import local_scorer
    from mor_secure.data import make_server_sets, vocabulary
    from mor_secure.models.factory import build_vlm
    from mor_secure.rewards.router import Router

    if steps < 3:
        raise ConfigError(f"--grpo-steps {steps}: at least 3 (the first step is left out, then one interval)")
    _reset_peak(device)
    with tempfile.TemporaryDirectory(prefix="mor-bench-device-") as tmp:
        root = Path(tmp)
        data = make_server_sets("shapes", None, 0, image_size, n_public=prompts_per_step * (steps + 2),
                                n_objective=8, n_eval=8)["public"]
        images, questions = [r["image"] for r in data], [r["question"] for r in data]
        dataset = build_dataset(images, questions, [r["family"] for r in data])
        policy = build_vlm("llava", vocabulary(), size=size, image_size=image_size, seed=0, device=device)
        policy.save(root / "policy")  # TRL builds the frozen GRPO reference from this path
        policy.model.config._name_or_path = str(root / "policy")
        rms = {fam: _build_rm(fam, size, image_size, device, lora_r=16, seed=i) for i, fam in enumerate(FAMILIES)}
        order = sorted(rms)
        feats = prompt_features(policy, images, questions)
        router = Router(feats.shape[1], order)
        router.fit_projection(feats)
        # the clients' releases as ``ClientNode.score`` makes them: raw score, clipped, noised
        releases = [local_scorer(rms[name], clip_bound, noise_std, seed=i) for i, name in enumerate(order)]

        def scorer(imgs, qs, responses, index):
            out = np.hstack([release(imgs, qs, responses, index)[0] for release in releases])
            return out, np.ones_like(out, dtype=bool)

        sync = _sync(device) or (lambda: None)

        def timed_scorer(*args):
            sync()  # the policy's queued generation work belongs to the step, not to the reward call
            t0 = time.perf_counter()
            result = scorer(*args)
            sync()
            scoring.append(time.perf_counter() - t0)
            return result

        scoring: list[float] = []
        cfg = GrpoSection(steps=steps, prompts_per_step=prompts_per_step, num_generations=num_generations,
                          max_completion_length=1)
        timed = TimedReward(MixtureReward(timed_scorer, router, feats, images, questions), [], [])
        t0 = time.perf_counter()
        history = run_grpo(policy, dataset, timed, cfg, out_dir=root / "trainer", seed=0, progress=progress)
        run_s = time.perf_counter() - t0
        peak = _peak_gb(device)
        counts = {"policy_params": sum(p.numel() for p in policy.model.parameters()),
                  "rm_params": {n: sum(p.numel() for p in rm.parameters()) for n, rm in rms.items()}}
    step_s = np.diff(timed.starts)[1:].tolist()  # from one reward call to the next; the first left out
    return {"steps": len(history), "step_s": median(step_s), "steps_s": step_s,
            "reward_s": median(timed.seconds[1:]), "rewards_s": timed.seconds, "scoring_s": scoring,
            "responses_per_step": prompts_per_step * num_generations, "prompts_per_step": prompts_per_step,
            "num_generations": num_generations, "run_s": run_s, "peak_gb": peak,
            "kl_last": history[-1]["kl"] if history else None, **counts}


def bench_device(*, device: str = "cuda", size: str = "base", image_size: int = 128,
                 families: Sequence[str] = FAMILIES, modes: Sequence[str] = ("hooks", "functorch"),
                 batch_size: int = 16, steps: int = 4, repeats: int = 2, grpo: dict | None = None,
                 progress: bool = True) -> dict:
    dev = resolve_device(device)
    tf32 = dev.type == "cuda"
    if tf32:  # fp32 weights, TF32 tensor-core matrix products (PyTorch's opt-in; stated in the section)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
            "size": size, "image_size": image_size, "batch_size": batch_size, "steps_per_run": steps,
            "repeats": repeats, "tf32": tf32, "torch": torch.__version__}
    t0 = time.perf_counter()
    info["rm"] = bench_rm_steps(dev, size=size, image_size=image_size, families=families, modes=modes,
                                batch_size=batch_size, steps=steps, repeats=repeats, progress=progress)
    info["grpo"] = bench_grpo_step(dev, size=size, image_size=image_size, progress=progress,
                                   **{"steps": 4, "prompts_per_step": 4, "num_generations": 8, **(grpo or {})})
    info["seconds"] = time.perf_counter() - t0
    return info


# -- the section ------------------------------------------------------------------------------------
def _transport_extra(perf_results: Path | None) -> tuple[float, str, str] | None:
    """The extra seconds per GRPO step that ``bench perf`` (b) measured for its best Flower-over-TLS
    setup, with that side's name and the file's date; None without the file."""
    if perf_results is None or not perf_results.is_file():
        return None
    stored = json.loads(perf_results.read_text())
    sides = stored.get("result", {}).get("grpo", {}).get("sides", {})
    # each side's step over its own in-process side (the extra deployments have their own): the
    # step's whole extra time, transport and the CPU it takes from the server's step alike; only the
    # deployments with one reward round trip per GRPO step, the schedule the device steps are timed on
    extras = {k: v["step_s"] * (1 - 1 / v["ratio"]) for k, v in sides.items()
              if k.startswith("tls") and "_k4" not in k and v.get("ratio")}
    if not extras:
        return None
    best = min(extras, key=extras.get)
    extra = extras[best]
    return extra, best, stored.get("date", "?")


INTRO = ("The pipeline's own model code on models of real size: `train_reward_model` (Opacus DP-SGD), "
         "`RewardModel.score`, `prompt_features`, `MixtureReward` and `run_grpo` (TRL's GRPOTrainer), with random "
         "weights from the transformers config classes, built on the device (nothing downloaded). Each run below "
         "is one command, with its date and machine; `--report-only` renders them again from "
         "`benchmarks/device_results.json`, and a rerun of the same command replaces its run.")


def across_runs(runs: Sequence[dict], perf_results: Path | None = None) -> list[str]:
    """One line per part comparing the stored runs by batch size (read off the runs, nothing else)."""
    if len(runs) < 2:
        return []
    by_batch = sorted(runs, key=lambda r: r["result"]["batch_size"])
    fams = {f for r in runs for f in r["result"]["rm"]["families"]}
    rm_parts = []
    for fam in sorted(fams):
        cells = [f"{r['result']['rm']['families'][fam]['best_ratio']:.2f}x at {r['result']['batch_size']} pairs "
                 f"(non-private step {r['result']['rm']['families'][fam]['none_s']:.2f} s)"
                 for r in by_batch if "best_ratio" in r["result"]["rm"]["families"].get(fam, {})]
        rm_parts.append(f"{fam} " + ", ".join(cells))
    extra = _transport_extra(perf_results)
    g_parts = []
    for r in sorted(runs, key=lambda r: r["result"]["grpo"]["responses_per_step"]):
        g = r["result"]["grpo"]
        cell = f"{g['responses_per_step']} responses per step: {g['step_s']:.2f} s"
        if extra is not None:
            cell += f" (with Flower over TLS, estimated {(g['step_s'] + extra[0]) / g['step_s']:.2f}x)"
        g_parts.append(cell)
    return ["**Across the runs.** DP-SGD's best mode over non-private, by batch: " + "; ".join(rm_parts) + ". "
            "GRPO step in-process, by responses per step: " + "; ".join(g_parts) + ".", ""]


def render(runs: Sequence[dict], perf_results: Path | None = None) -> str:
    """The section: every stored run (``{"command", "date", "machine", "result"}``), oldest first."""
    return "\n".join([INTRO, "", *across_runs(runs, perf_results),
                      *(render_run(r["result"], r["command"], r["date"], r["machine"], perf_results) for r in runs)])


def render_run(info: dict, command: str, date: str, machine_line: str, perf_results: Path | None = None) -> str:
    rm, g = info["rm"], info["grpo"]
    prec = "fp32 weights, TF32 matrix products" if info.get("tf32") else "fp32"
    lines = [f"### `{command}`", "",
             f"Measured {date} on {info['device_name']} ({info['device']}); host: {machine_line}; "
             f"{info['seconds'] / 60:.1f} min. Models of size `{info['size']}`, images "
             f"{info['image_size']}x{info['image_size']} px, {prec}.", "",
             "#### (a) Reward-model step, DP-SGD over non-private", "",
             f"Batch {info['batch_size']} pairs (one batch per step, DP-SGD sampling rate 1), {info['steps_per_run']} "
             f"steps per run, the first left out; median step per run, then over {info['repeats']} repeats "
             "(non-private and DP runs alternate). Target of `bench perf` (a): best mode at most 1.5x.", ""]
    modes = rm["working_modes"]
    head = "| RM family | parameters | trainable | tokens per input | non-private step (s) | peak GPU memory (GB) |"
    sep = "|---|---|---|---|---|---|"
    for m in modes:
        head += f" {m} step (s) | {m} ratio (per repeat) | {m} peak (GB) |"
        sep += "---|---|---|"
    lines += [head + " best |", sep + "---|"]

    def gb(x):
        return "-" if x is None else f"{x:.1f}"

    def count(n):
        return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"

    for fam, r in rm["families"].items():
        row = (f"| {fam} | {count(r['params'])} | {count(r['trainable_params'])} | {r['tokens']} | "
               f"{r['none_s']:.3f} | {gb(r['none_peak_gb'])} |")
        for m in modes:
            mm = r["modes"][m]
            row += f" {mm['step_s']:.3f} | **{mm['ratio']:.2f}x** ({ratios(mm['ratio_by_repeat'])}) | {gb(mm['peak_gb'])} |"
        row += f" {r.get('best_mode', '-')} {r.get('best_ratio', float('nan')):.2f}x |"
        lines.append(row)
    for mode, err in rm["failed_modes"].items():
        lines += ["", f"- `{mode}` did not run: `{err}`"]
    parts = [f"{fam}: {r['none_forward_s'] * 1e3:.0f} -> {r['modes'][r['best_mode']]['forward_s'] * 1e3:.0f} ms in the "
             f"two forward passes, {r['none_rest_s'] * 1e3:.0f} -> {r['modes'][r['best_mode']]['rest_s'] * 1e3:.0f} ms in "
             "backward, per-sample gradients, clipping, noise and the update"
             for fam, r in rm["families"].items() if r.get("best_mode") and "forward_s" in r["modes"][r["best_mode"]]]
    if parts:
        lines += ["", "Where the best mode's extra time goes (medians, wall clock after a synchronize): "
                  + "; ".join(parts) + "."]
    worst = max((r["best_ratio"] for r in rm["families"].values() if "best_ratio" in r), default=float("nan"))
    lines += ["", f"Best mode, worst family: **{worst:.2f}x** (target 1.5x: {'met' if worst <= 1.5 else 'missed'})."]
    lines += ["", f"#### (b) GRPO step, policy and three client RMs of size `{info['size']}`", "",
              f"Policy: LLaVA, {count(g['policy_params'])} parameters (all trained; TRL keeps a frozen copy as "
              f"the KL reference). Client RMs: " + ", ".join(f"{n} {count(p)}" for n, p in g["rm_params"].items())
              + f" (untrained: scoring costs the same whatever the weights). {g['responses_per_step']} responses per "
              f"step ({g['prompts_per_step']} prompts x {g['num_generations']} samples, 1 completion token), "
              f"{g['steps']} steps, a step timed from one reward call to the next, the first left out.", "",
              "| GRPO step (s) | of which the three clients' scoring (s) | steps (s) | peak GPU memory (GB) | "
              "whole run (s) |", "|---|---|---|---|---|",
              f"| {g['step_s']:.3f} | {median(g['scoring_s'][1:]):.3f} | "
              + ", ".join(f"{x:.3f}" for x in g["steps_s"]) + f" | {gb(g['peak_gb'])} | {g['run_s']:.1f} |"]
    extra = _transport_extra(perf_results)
    if extra is not None:
        x, side, when = extra
        est = (g["step_s"] + x) / g["step_s"]
        lines += ["", f"Rewards through Flower over TLS at this step size (**an estimate from two measurements**, "
                  f"not a run of the deployment on this machine): `bench perf` (b), {when}, measured {x:.2f} s extra "
                  f"per GRPO step for its best setup (`{side}`) on its own machine; the messages carry prompts, "
                  f"responses and scores, whose size does not grow with the models, and the clients' scoring is "
                  f"already inside the in-process step. ({g['step_s']:.2f} + {x:.2f}) / {g['step_s']:.2f} = "
                  f"**{est:.2f}x** (target 1.5x: {'met' if est <= 1.5 else 'missed'}, as an estimate)."]
    return "\n".join(lines) + "\n"


def write_section(path: Path | str, body: str) -> str:
    from mor_secure.bench.markdown import update_section

    return update_section(path, SECTION, TITLE, body)


def load_runs(results: Path) -> list[dict]:
    if not results.is_file():
        return []
    stored = json.loads(results.read_text())
    return stored.get("runs", [])


def run(*, command: str, out: Path | None, results: Path | None, perf_results: Path | None,
        progress: bool = True, **kwargs) -> tuple[dict, str]:
    """Measure, keep the run in ``results`` (replacing a stored run of the same command), render
    every stored run and (``out``) write the section."""
    import datetime as dt

    from mor_secure.bench.markdown import machine

    info = bench_device(progress=progress, **kwargs)
    entry = {"command": command, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "machine": machine(), "result": info}
    runs = [r for r in (load_runs(results) if results is not None else []) if r["command"] != command]
    runs.append(entry)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        tmp = results.with_name(results.name + ".tmp")
        tmp.write_text(json.dumps({"runs": runs}, indent=1, default=str))
        tmp.replace(results)
    body = render(runs, perf_results)
    if out is not None:
        write_section(out, body)
    return info, body


def report(results: Path, out: Path | None, perf_results: Path | None) -> str:
    runs = load_runs(results)
    if not runs:
        raise ConfigError(f"no device results at {results}; run `mor-secure bench device` on a GPU machine first")
    body = render(runs, perf_results)
    if out is not None:
        write_section(out, body)
    return body


def quick_kwargs() -> dict:
    return copy.deepcopy(QUICK)
