"""Smoke test of ``mor-secure bench alignment --quick`` (the full benchmark is run by hand; BENCHMARKS.md):
one seed of the held-out variant of the shapes track, a subset of the methods, through the real CLI.
Checks the structure only: rows and families present, accuracies finite in [0, 1], router weights
summing to one, the section landing in the BENCHMARKS.md named by --out (other sections kept), the
three plots written, and a rerun with the same settings measuring nothing again."""

import json
import math

import numpy as np
import pytest

from mor_secure.bench.markdown import read_section, update_section
from mor_secure.cli import main
from mor_secure.errors import ConfigError

pytestmark = pytest.mark.slow

METHODS = ["base", "uniform", "fedavg", "centralized", "mor:eps8", "oracle"]


def test_quick_bench_alignment_writes_table_section_and_plots(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    update_section(out, "other", "Another benchmark", "kept as it is")
    results = tmp_path / "results.json"
    argv = ["bench", "alignment", "--quick", "--tracks", "shapes-heldout", "--seeds", "1",
            "--methods", ",".join(METHODS), "--out", str(out), "--results", str(results),
            "--work-dir", str(tmp_path / "work"), "--no-progress"]
    assert main(argv) == 0

    data = json.loads(results.read_text())
    track = data["tracks"]["shapes-heldout"]
    assert track["heldout"] == ["size"]
    assert all("size" not in c["families"] for c in track["clients"].values())
    families = track["families"]
    assert set(families) == {"colour", "shape", "count", "position", "size"}
    rows = track["seeds"]["0"]
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        acc = row["accuracy"]
        assert set(acc) == set(families) | {"mean"}, method
        assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in acc.values()), method
    weights = rows["mor:eps8"]["router_weights"]
    assert set(weights) == set(families)
    for fam, w in weights.items():
        assert set(w) == set(track["clients"]) and abs(sum(w.values()) - 1.0) < 1e-4, fam
    assert rows["fedavg"]["fedavg_rounds"] == 2 and rows["fedavg"]["local_epochs_per_round"] == 1
    for method, row in rows.items():  # the harness's reward ranking, for every method with a reward
        if method in ("base", "oracle"):  # no reward model to rank with
            assert not row.get("reward_top1"), method
            continue
        top = row["reward_top1"]
        assert set(top) == set(families) | {"mean"}, method
        assert all(0.0 <= v <= 1.0 for v in top.values()) and top["mean"] == pytest.approx(
            sum(top[f] for f in families) / len(families)), method

    digests = {m: [r["rm_digests"] for r in row["grpo_runs"]] for m, row in rows.items() if m not in ("base", "oracle")}
    assert set(digests["fedavg"][0]) == {"fedavg"} and set(digests["centralized"][0]) == {"centralized"}
    assert set(digests["uniform"][0]) == set(digests["mor:eps8"][0]) == set(track["clients"])
    assert digests["uniform"][0] == digests["mor:eps8"][0]  # one seed's rows score with the same client RMs
    assert all("CPUs" in run["machine"] for row in rows.values() for run in row.get("grpo_runs", [row]))

    section = read_section(out, "alignment")
    assert section is not None
    assert "within every seed, the runs that scored with the same reward model used the same draw of it" in section
    assert "`mor-secure bench alignment --tracks shapes-heldout --seeds 1 --methods " in section and "--quick`" in section
    assert "CPUs" in section  # the machine line
    for label in ("| base policy (no alignment) |", "| uniform mixture (no router) |", "| FedAvg RM",
                  "| centralized RM, no DP (upper bound) |", "| MoR, ε = 8 |", "size (held out)",
                  "| answer key as a 0/1 reward (reference) |", "Answer key as a 0/1 reward (reference): "):
        assert label in section, label
    assert read_section(out, "other").endswith("kept as it is")
    for name in ("alignment_privacy_utility.png", "alignment_by_family.png", "alignment_router_weights.png"):
        png = tmp_path / "benchmarks" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(benchmarks/{name})" in section

    assert "Reward ranking (benchmark harness)" in section and "Reward against policy (1 seed(s)" in section
    held = [x for x in section.splitlines() if x.startswith("- Held-out family size (owned by no client): the router gives ")]
    assert len(held) == 1 and "Accuracy on size: MoR, ε = 8 " in held[0] and "(chance 50%)" in held[0], held
    assert "- How well each reward knows size (the share of its prompts on which the reward ranks the oracle answer " \
           "first, mean over seeds): uniform mixture (no router) " in section

    # the same command again: every row is in the results file, nothing is measured twice
    stamps = {m: r["finished"] for m, r in rows.items()}
    assert main(argv) == 0
    again = json.loads(results.read_text())["tracks"]["shapes-heldout"]["seeds"]["0"]
    assert {m: r["finished"] for m, r in again.items()} == stamps

    # a second GRPO run of one method: only it runs; its seed's accuracy becomes the mean of both runs
    argv2 = [a if a != ",".join(METHODS) else "uniform" for a in argv] + ["--grpo-runs", "2"]
    assert main(argv2) == 0
    twice = json.loads(results.read_text())["tracks"]["shapes-heldout"]["seeds"]["0"]
    assert {m: r["finished"] for m, r in twice.items() if m != "uniform"} == \
        {m: t for m, t in stamps.items() if m != "uniform"}
    runs = twice["uniform"]["grpo_runs"]
    assert [r["grpo_run"] for r in runs] == [0, 1]
    assert runs[0]["accuracy"] == rows["uniform"]["accuracy"]  # the stored run is kept as run 0
    for fam, v in twice["uniform"]["accuracy"].items():
        assert v == pytest.approx((runs[0]["accuracy"][fam] + runs[1]["accuracy"][fam]) / 2)
    section = read_section(out, "alignment")
    assert "| method | seeds | GRPO runs |" in section
    assert "| uniform mixture (no router) | 1 | 2 |" in section
    assert "(uniform mixture (no router), 2 runs)" in section  # GRPO's own spread, in the reading

    # rows stored without the reward ranking get it from the work folder, with no GRPO run
    stored = json.loads(results.read_text())
    kept = {m: r.pop("reward_top1") for m, r in stored["tracks"]["shapes-heldout"]["seeds"]["0"].items()
            if "reward_top1" in r}
    results.write_text(json.dumps(stored))
    assert main(argv + ["--fill-reward-top1"]) == 0
    filled = json.loads(results.read_text())["tracks"]["shapes-heldout"]["seeds"]["0"]
    assert {m: r["finished"] for m, r in filled.items()} == {m: r["finished"] for m, r in twice.items()}
    for m, top in kept.items():
        if m.startswith("mor:"):  # the router is fitted again, on fresh noised scores of the objective set
            assert set(filled[m]["reward_top1"]) == set(top)
        else:  # the same reward models, clipped, no noise: the same ranking
            assert filled[m]["reward_top1"] == top, m

    # another seed on its own (parts of the benchmark side by side): only seed 1 runs; seed 0 is kept
    argv3 = [a if a != ",".join(METHODS) else "base" for a in argv] + ["--first-seed", "1"]
    assert main(argv3) == 0
    seeds = json.loads(results.read_text())["tracks"]["shapes-heldout"]["seeds"]
    assert set(seeds) == {"0", "1"} and set(seeds["1"]) == {"base"}
    assert {m: r["finished"] for m, r in seeds["0"].items()} == {m: r["finished"] for m, r in filled.items()}
    capsys.readouterr()
    assert main(argv3[:-1] + ["-1"]) == 2
    assert "--first-seed -1 --seeds 1: the first seed is 0 or more" in capsys.readouterr().err
    assert main(argv + ["--fill-reward-top1", "--report-only"]) == 2
    assert "--report-only and --fill-reward-top1 exclude each other" in capsys.readouterr().err


def test_grpo_runs_are_merged_and_legacy_rows_count_as_run_zero():
    from mor_secure.bench.alignment import grpo_runs_of, merge_rows, missing_runs

    legacy = {"accuracy": {"colour": 0.5, "mean": 0.4}, "reward_first": 1.0, "reward_last": 2.0, "kl_last": 0.1,
              "grpo_steps": 4, "seconds": 10.0, "cpu_seconds": 9.0, "phases": {"GRPO": [8.0, 7.0]},
              "router_weights": {"colour": {"a": 1.0}}}
    rows = {"mor:eps8": legacy, "base": {"accuracy": {"colour": 0.25, "mean": 0.3}}}
    assert missing_runs(rows, "mor:eps8", 3) == [1, 2]
    assert missing_runs(rows, "base", 3) == [] and missing_runs({}, "base", 3) == [0]
    assert missing_runs({}, "uniform", 2) == [0, 1]
    assert grpo_runs_of(rows["base"]) == []
    new = {"accuracy": {"colour": 0.9, "mean": 0.6}, "grpo_runs": [
        {"grpo_run": 2, "accuracy": {"colour": 0.9, "mean": 0.6}, "reward_first": 0.0, "reward_last": 4.0,
         "kl_last": 0.3, "grpo_steps": 4}], "seconds": 5.0, "cpu_seconds": 4.0, "phases": {"GRPO": [4.0, 3.5]},
        "router_weights": {"colour": {"a": 0.5}}}
    merged = merge_rows(legacy, new)
    assert [r["grpo_run"] for r in merged["grpo_runs"]] == [0, 2]
    assert merged["accuracy"] == {"colour": pytest.approx(0.7), "mean": pytest.approx(0.5)}
    assert merged["reward_last"] == pytest.approx(3.0) and merged["seconds"] == 15.0
    assert merged["phases"]["GRPO"] == [12.0, 10.5]
    assert merged["router_weights"] == legacy["router_weights"]  # the stored row's own figures are kept
    assert missing_runs({"mor:eps8": merged}, "mor:eps8", 3) == [1]


def test_rm_digest_tells_draws_apart_and_rm_draws_names_the_split_runs():
    import copy

    import torch

    from mor_secure.bench.alignment import rm_digest, rm_draws

    torch.manual_seed(0)
    rm = torch.nn.Linear(4, 1)
    twin = copy.deepcopy(rm)
    assert rm_digest(rm) == rm_digest(twin) and len(rm_digest(rm)) == 16
    with torch.no_grad():  # one weight one ulp away: another draw
        twin.weight[0, 0] = torch.nextafter(twin.weight[0, 0], torch.tensor(10.0))
    assert rm_digest(rm) != rm_digest(twin)

    def run(g, **digests):
        return {"grpo_run": g, "accuracy": {"mean": 0.5}, "rm_digests": digests}

    entry = {"seeds": {"0": {"base": {"accuracy": {"mean": 0.3}},
                             "uniform": {"grpo_runs": [run(0, a="x", b="y")]},
                             "mor:eps8": {"grpo_runs": [run(0, a="x", b="y")]}}}}
    assert rm_draws(entry).endswith("within every seed, the runs that scored with the same reward model used the "
                                    "same draw of it.")
    entry["seeds"]["1"] = {"single:b": {"grpo_runs": [run(0, b="y")]},
                           "mor:eps8": {"grpo_runs": [run(0, a="x", b="y"), run(1, a="x", b="z")]},
                           "uniform": {"accuracy": {"mean": 0.4}, "reward_first": 0.1}}  # stored before digests
    text = rm_draws(entry)
    assert "recorded by 5 GRPO runs; 1 older runs did not record it" in text
    assert ("seed 1, b: single RM: b, MoR, ε = 8 (GRPO run 0) vs MoR, ε = 8 (GRPO run 1)" in text
            and "seed 1, a" not in text and "seed 0" not in text), text
    assert rm_draws({"seeds": {"0": {"uniform": {"accuracy": {"mean": 0.4}, "reward_first": 0.1}}}}) == ""


def test_single_client_rows_can_be_named():
    from mor_secure.bench.alignment import expand_methods

    assert expand_methods(["mor:eps8", "single:b", "uniform"], ["a", "b"], [8.0], 8.0) == \
        ["single:b", "uniform", "mor:eps8"]
    assert expand_methods(["single"], ["a", "b"], [8.0], 8.0) == ["single:a", "single:b"]
    with pytest.raises(ConfigError, match=r"\['single:z'\]: no such client; the clients are a, b"):
        expand_methods(["single:z"], ["a", "b"], [8.0], 8.0)


def test_targets_state_the_paired_difference_and_whether_it_is_resolved():
    from mor_secure.bench.alignment import paired_difference, targets

    def row(mean):
        return {"accuracy": {"colour": mean, "mean": mean}}

    seeds = {str(k): {"mor:eps8": row(0.50 + d), "uniform": row(0.44 + d), "single:a": row(0.49 + e),
                      "centralized": row(0.52)}
             for k, (d, e) in enumerate([(0.00, 0.05), (0.02, -0.04), (-0.01, 0.00)])}
    entry = {"seeds": seeds, "families": ["colour"], "ref_epsilon": 8.0, "clients": {"a": {"families": ["colour"]}}}
    d, se, n = paired_difference(entry, "mor:eps8", "uniform")
    assert (round(d, 6), n) == (6.0, 3) and se == pytest.approx(0.0, abs=1e-9)
    lines = targets(entry)
    assert lines[0].startswith("MoR at ε = 8 minus the uniform mixture: +6.0 ± 0.0 points (paired over 3 seeds; "
                               "resolved") and lines[0].endswith("(target ≥ +5: met)")
    assert "MoR minus the best single-client RM (a): " in lines[1] and "not resolved" in lines[1]
    assert lines[2].startswith("MoR minus the centralized non-private RM: -1.7") and lines[2].endswith("met)")
    # a client without its single-RM row: the "every single client" target is not claimed
    entry["clients"]["b"] = {"families": ["colour"]}
    partial = targets(entry)[1]
    assert partial.endswith("(target > 0 against every single client: not checked, no row for b; above the one "
                            "measured)"), partial


def test_zero_grpo_runs_is_refused(tmp_path, capsys):
    argv = ["bench", "alignment", "--quick", "--tracks", "shapes", "--seeds", "1", "--methods", "uniform",
            "--grpo-runs", "0", "--results", str(tmp_path / "r.json"), "--work-dir", str(tmp_path / "w"),
            "--no-progress"]
    assert main(argv) == 2
    assert "--grpo-runs 0: at least 1 GRPO run per seed and method" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


class _PlantedRM:
    """Test double for a reward model (the function under test only calls ``score``): +1 for the answer
    ``truth`` gives an image, 0 for every other; ``flat`` scores everything 0 (all ties)."""

    def __init__(self, truth: dict, flat: bool = False) -> None:
        self.truth, self.flat = truth, flat

    def score(self, images, questions, responses):
        import torch

        return torch.tensor([0.0 if self.flat else float(self.truth[id(im)] == r) for im, r in zip(images, responses)])


def test_reward_top1_counts_strict_firsts_per_family():
    import torch
    from PIL import Image

    from mor_secure.bench.alignment import FixedRouter, reward_top1
    from mor_secure.data.families import get_family

    colours = get_family("colour").answers
    images = [Image.new("RGB", (4, 4)) for _ in range(4)]
    records = [{"image": im, "question": "q", "family": "colour", "answer": colours[i % 2]}
               for i, im in enumerate(images)]
    right = {id(im): r["answer"] for im, r in zip(images, records)}
    wrong = {id(im): (colours[2] if i < 3 else r["answer"]) for i, (im, r) in enumerate(zip(images, records))}
    feats = torch.zeros(len(records), 3)
    # the oracle-like RM ranks every answer right; the one wrong on 3 of 4 prompts gets 1/4
    assert reward_top1([_PlantedRM(right)], [5.0], FixedRouter(["a"]), feats, records) == {"colour": 1.0, "mean": 1.0}
    assert reward_top1([_PlantedRM(wrong)], [5.0], FixedRouter(["b"]), feats, records)["colour"] == 0.25
    # a flat RM ties every answer: no prompt counts (a tie is a miss, not a first place)
    assert reward_top1([_PlantedRM(right, flat=True)], [5.0], FixedRouter(["c"]), feats, records)["colour"] == 0.0
    # the uniform mixture of the right and the flat RM still ranks right; of right and wrong, ties become misses
    both = reward_top1([_PlantedRM(right), _PlantedRM(right, flat=True)], [5.0, 5.0], FixedRouter(["a", "c"]),
                       feats, records)
    assert both["colour"] == 1.0
    tied = reward_top1([_PlantedRM(right), _PlantedRM(wrong)], [5.0, 5.0], FixedRouter(["a", "b"]), feats, records)
    assert tied["colour"] == 0.25  # 3 prompts: right and wrong answers tie at 0.5; the 4th agrees


def test_answer_key_scorer_rewards_the_oracle_answer_only(tmp_path):
    """The ``oracle`` reference row's reward: 1 for a response whose first word is the public prompt's
    oracle answer (drawn again by the harness; the server's prompts carry none), 0 otherwise."""
    from mor_secure.bench.alignment import SeedRun, load_track
    from mor_secure.data import make_server_sets
    from mor_secure.data.families import get_family

    track = load_track("shapes", quick=True)
    run = SeedRun(track, 0, tmp_path / "work", tmp_path / "base", 2, False)
    assert all("answer" not in r for r in run.public)  # what the server holds
    d = run.cfg.data
    keyed = make_server_sets("shapes", None, 0, d.image_size, d.public_prompts, d.objective_pairs, d.eval_prompts,
                             public_answers=True)["public"]
    scorer = run.answer_key_scorer()
    picked = [0, 3, 5]
    images = [run.public[i]["image"] for i in picked]
    questions = [run.public[i]["question"] for i in picked]
    wrong = [next(a for a in get_family(keyed[i]["family"]).answers if a != keyed[i]["answer"]) for i in picked]
    responses = [keyed[i]["answer"] for i in picked] + [f"{keyed[i]['answer']} because" for i in picked] + wrong
    index = np.array([0, 1, 2] * 3)
    scores, present = scorer(images, questions, responses, index)
    assert scores[:, 0].tolist() == [1.0] * 6 + [0.0] * 3 and present.all()


def test_committed_results_still_describe_the_configs():
    """The rows in benchmarks/alignment_results.json were measured under the current configs and code:
    each track's fingerprint matches (a config change, or a new config field away from the default
    the rows ran with, must come with the benchmark run again). A new field at its old behaviour's
    default leaves the fingerprint as it was."""
    from pathlib import Path

    from mor_secure.bench.alignment import Options, load_track

    stored = json.loads((Path(__file__).parents[1] / "benchmarks" / "alignment_results.json").read_text())
    extra = {"fedavg_rounds": Options().fedavg_rounds, "quick": False}
    for name in ("shapes", "digits", "shapes-heldout"):
        assert stored["tracks"][name]["fingerprint"] == load_track(name).fingerprint(extra), name
    other = load_track("shapes", overrides=["grpo.steps_per_generation=2"]).fingerprint(extra)
    assert other != stored["tracks"]["shapes"]["fingerprint"]


def test_heldout_reading_names_the_client_reward_that_knows_the_family_best():
    """On the committed shapes-heldout rows (400 GRPO steps): the reading line for the held-out family
    gives every reward's ranking there and the router's weight on the client whose reward ranks it best."""
    from pathlib import Path

    from mor_secure.bench.alignment import reading, router_weights

    entry = json.loads((Path(__file__).parents[1] / "benchmarks" / "alignment_results_400steps.json").read_text())[
        "tracks"]["shapes-heldout"]
    ranks = {}
    for rows in entry["seeds"].values():
        for m, r in rows.items():
            if m.startswith("single:") and r.get("reward_top1"):
                ranks.setdefault(m.split(":")[1], []).append(r["reward_top1"]["size"])
    best = max(ranks, key=lambda c: np.mean(ranks[c]))
    weight = router_weights(entry, "mor:eps8")["size"][best]
    line = [x for x in reading(entry) if x.startswith("How well each reward knows size")]
    assert len(line) == 1, reading(entry)
    assert (f"the best of them on size is {best}'s ({100 * np.mean(ranks[best]):.0f}%), and the router gives {best} "
            f"{weight:.2f} of the weight there") in line[0], line[0]


def test_other_step_budgets_are_found_beside_the_results_and_compared_per_track(tmp_path):
    from mor_secure.bench.alignment import budget_comparison, other_budget_files

    main_path = tmp_path / "alignment_results.json"
    long_path = tmp_path / "alignment_results_800steps.json"
    k4_path = tmp_path / "alignment_results_800steps_k4.json"
    for p in (main_path, long_path, k4_path, tmp_path / "alignment_results_quick.json",
              tmp_path / "alignment_results_heldout_entropy0.json"):
        p.write_text("{}")
    (tmp_path / "alignment_800steps.md").write_text("page")
    # other budgets and schedules, not other variants; a file lists only the files that extend its name
    assert other_budget_files(main_path) == [(long_path, tmp_path / "alignment_800steps.md"), (k4_path, None)]
    assert other_budget_files(long_path) == [(k4_path, None)]
    assert other_budget_files(k4_path) == []

    def entry(steps, mor, uni, **settings):
        seeds = {str(k): {"mor:eps8": {"accuracy": {"mean": mor + d}}, "uniform": {"accuracy": {"mean": uni}}}
                 for k, d in enumerate([0.0, 0.02, -0.01])}
        return {"seeds": seeds, "families": [], "ref_epsilon": 8.0, "clients": {},
                "settings": {"grpo_steps": steps, "pairs_per_client": 3000, **settings}}

    short = entry(400, 0.46, 0.43)
    lines = budget_comparison("shapes", short, [("alignment_800steps.md", {"tracks": {"shapes": entry(800, 0.53, 0.43)}})])
    assert "| method | 400 GRPO steps | 800 GRPO steps |" in lines
    assert "| MoR, ε = 8 | 46.3 ± 1.5 (3) | 53.3 ± 1.5 (3) |" in lines
    bullet = [x for x in lines if x.startswith("- At 800 GRPO steps")]
    assert len(bullet) == 1 and "every other setting as above" in bullet[0]
    assert "minus the uniform mixture: +10.3" in bullet[0] and "(target ≥ +5: met)" in bullet[0]
    # a file of another track adds nothing; differing settings are named, not called the same
    assert budget_comparison("digits", short, [("x.md", {"tracks": {"shapes": short}})]) == []
    other = budget_comparison("shapes", short, [("y.md", {"tracks": {"shapes": entry(800, 0.5, 0.4, pairs_per_client=100)}})])
    assert any("other settings differ: pairs_per_client 3000 → 100" in x for x in other)

    # another schedule at the same budget: named in the column, its one differing setting named, and MoR
    # paired by seed with whether the rows scored with the same reward models (digests, else accuracies)
    long, k4 = entry(800, 0.53, 0.43), entry(800, 0.50, 0.43, steps_per_generation=4)
    for seed, (mine, theirs) in enumerate([("d0", "d0"), ("d1", "d1"), ("d2", "dX")]):
        for e, digest in ((long, mine), (k4, theirs)):
            row = e["seeds"][str(seed)]["mor:eps8"]
            row["grpo_runs"] = [{"grpo_run": 0, "accuracy": row["accuracy"], "rm_digests": {"a": digest}}]
    lines = budget_comparison("shapes", long, [("k4.md", {"tracks": {"shapes": k4}})])
    assert "| method | 800 GRPO steps | 800 GRPO steps, 4 per reward round trip |" in lines
    bullet = [x for x in lines if x.startswith("- At 800 GRPO steps, 4 per reward round trip")]
    assert len(bullet) == 1 and "other settings differ: steps_per_generation 1 → 4" in bullet[0]
    assert ("MoR, ε = 8 there minus here, paired by seed: -3.0 ± 0.0 points (3 seeds; the same reward models in 2 "
            "of 3 seeds (by digest))") in bullet[0]
    for rows in long["seeds"].values():  # no digests on one side: the held-out accuracies tell, where recorded
        del rows["mor:eps8"]["grpo_runs"]
    long["seeds"]["0"]["mor:eps8"]["rm_accuracy"] = k4["seeds"]["0"]["mor:eps8"]["rm_accuracy"] = {"a": 0.9}
    bullet = [x for x in budget_comparison("shapes", long, [("k4.md", {"tracks": {"shapes": k4}})]) if "paired" in x]
    assert ("(3 seeds; the same reward models in 1 of the 1 seed(s) that recorded them (by held-out accuracy); 2 "
            "recorded neither digests nor accuracies)") in bullet[0]


def test_results_of_processes_run_side_by_side_are_merged(tmp_path, capsys):
    """``--merge``: rows of other seeds (a process run with --first-seed) and further GRPO runs join the
    results file and its section; the same measurement twice, the same GRPO run measured twice, or a
    track under other settings is refused with nothing written."""
    from pathlib import Path

    committed = json.loads((Path(__file__).parents[1] / "benchmarks" / "alignment_results.json").read_text())
    shapes = committed["tracks"]["shapes"]  # its description (families, clients, settings); rows made here

    def row(mean, run=0, finished="2026-12-01T04:00:00"):
        acc = {**{f: mean for f in shapes["families"]}, "mean": mean}
        return {"accuracy": acc, "finished": finished, "seconds": 10.0,
                "grpo_runs": [{"grpo_run": run, "accuracy": acc, "grpo_steps": 400, "reward_first": 0.0,
                               "reward_last": 1.0, "kl_last": 0.1}]}

    def results(seeds, command, fingerprint=shapes["fingerprint"]):
        entry = {**shapes, "fingerprint": fingerprint, "seeds": seeds, "commands": [command], "failed": {}}
        return {"version": 1, "tracks": {"shapes": entry}}

    first, second = tmp_path / "first.json", tmp_path / "second.json"
    failed = results({"0": {"uniform": row(0.4)}, "1": {"uniform": row(0.5)}}, "cmd A")
    failed["tracks"]["shapes"]["failed"] = {"2": {"uniform": {"error": "stopped"}}}  # measured in second.json
    first.write_text(json.dumps(failed))
    second.write_text(json.dumps(results(
        {"0": {"uniform": row(0.6, run=1, finished="2026-12-01T05:00:00")}, "2": {"uniform": row(0.3)}}, "cmd B")))
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "alignment", "--results", str(first), "--out", str(out), "--plots", str(tmp_path / "p")]
    assert main(argv + ["--merge", str(second)]) == 0
    track = json.loads(first.read_text())["tracks"]["shapes"]
    assert sorted(track["seeds"]) == ["0", "1", "2"] and track["commands"] == ["cmd A", "cmd B"]
    joined = track["seeds"]["0"]["uniform"]
    assert [r["grpo_run"] for r in joined["grpo_runs"]] == [0, 1] and joined["accuracy"]["mean"] == pytest.approx(0.5)
    assert track["seeds"]["2"]["uniform"]["accuracy"]["mean"] == 0.3 and not track["failed"]["2"]
    assert "| uniform mixture (no router) |" in read_section(out, "alignment")
    # merging the same file again: the same rows, nothing measured twice
    assert main(argv + ["--merge", str(second)]) == 2
    assert "seed 0: GRPO run(s) [1] of uniform measured in both files" in capsys.readouterr().err
    assert json.loads(first.read_text())["tracks"]["shapes"] == track  # nothing written
    # another track setting is never mixed in
    third = tmp_path / "third.json"
    third.write_text(json.dumps(results({"5": {"uniform": row(0.9)}}, "cmd C", fingerprint="other")))
    assert main(argv + ["--merge", str(third)]) == 2
    assert "track shapes was measured under other settings" in capsys.readouterr().err
    assert main(argv + ["--merge", str(tmp_path / "missing.json")]) == 2
    assert "no such results file" in capsys.readouterr().err
    assert json.loads(first.read_text())["tracks"]["shapes"] == track


def test_commands_of_rows_run_at_another_budget_name_it_so_they_reproduce(tmp_path, monkeypatch):
    """A row run when its config set another GRPO budget: the page's command gets ``--grpo-steps`` of
    the row, since the bare command now runs the config's new budget; a command that names the
    budget, or a row at the config's budget, is shown as stored."""
    from mor_secure.bench.alignment import load_track, reproducible_commands, render

    cfg = load_track("shapes").cfg
    now = cfg.grpo.steps
    cmds = ["mor-secure bench alignment --tracks shapes", "mor-secure bench alignment --grpo-steps 5 --tracks shapes",
            "mor-secure bench alignment --set grpo.steps=7", "mor-secure bench alignment --grpo-steps=9"]
    entry = {"config": "configs/demo.yaml", "commands": cmds, "settings": {"grpo_steps": now + 1}}
    assert reproducible_commands("shapes", entry) == [f"{cmds[0]} --grpo-steps {now + 1}", *cmds[1:]]
    entry["settings"]["grpo_steps"] = now
    assert reproducible_commands("shapes", entry) == cmds
    quick = load_track("shapes", quick=True).cfg.grpo.steps
    assert reproducible_commands("shapes", {**entry, "settings": {"grpo_steps": quick, "quick": True}}) == cmds
    # the page says so once, and only when a command was changed
    results = {"tracks": {"shapes": {**entry, "seeds": {}, "clients": {}, "families": [], "ref_epsilon": 8.0,
                                     "settings": {"grpo_steps": now + 1, "prompts_per_step": 1, "num_generations": 2}}}}
    page = render(results, full_command="x", date="d", machine="m", plots={})
    assert f"`{cmds[0]} --grpo-steps {now + 1}`" in page and "`--grpo-steps` is added" in page
    assert f"Full benchmark (every track, 3 seeds, every method): `x --grpo-steps {now + 1}`" in page
    full = render(results, full_command="mor-secure bench alignment", date="d", machine="m", plots={},
                  where=" --results r.json --out p.md --plots q")
    # a page of its own: every command names its files, and the full benchmark is at the rows' budget too
    assert f"`{cmds[0]} --grpo-steps {now + 1} --results r.json --out p.md --plots q`" in full
    assert f"`mor-secure bench alignment --grpo-steps {now + 1} --results r.json --out p.md --plots q`" in full
    assert "a rerun adds to them" in full
    # a setting every command overrode is the page's: the full command names it (one some omit is not)
    sets = ["mor-secure bench alignment --set grpo.steps_per_generation=4 --set router.lr=0.1",
            "mor-secure bench alignment --tracks digits --set grpo.steps_per_generation=4"]
    page = render({"tracks": {"shapes": {**results["tracks"]["shapes"], "commands": sets}}},
                  full_command="mor-secure bench alignment", date="d", machine="m", plots={})
    assert f"`mor-secure bench alignment --grpo-steps {now + 1} --set grpo.steps_per_generation=4`" in page
    results["tracks"]["shapes"]["settings"]["grpo_steps"] = now
    page = render(results, full_command="x", date="d", machine="m", plots={})
    assert f"`{cmds[0]}`" in page and "`--grpo-steps` is added" not in page and "a rerun adds" not in page
    # read from another directory, the stored relative config path still resolves
    monkeypatch.chdir(tmp_path)
    assert reproducible_commands("shapes", {**entry, "settings": {"grpo_steps": now + 1}})[0].endswith(
        f"--grpo-steps {now + 1}")
    # and so does the estimate at the config's sizes: a GRPO phase at half the config's budget scales by 2
    from mor_secure.bench.alignment import full_size_estimate

    small = {"perception_steps": 1, "pairs_per_client": cfg.data.pairs_per_client, "epochs": cfg.clients[0].training.epochs,
             "grpo_steps": now / 2, "prompts_per_step": cfg.grpo.prompts_per_step,
             "num_generations": cfg.grpo.num_generations, "fedavg_rounds": 2}
    est = full_size_estimate("shapes", {**entry, "settings": small, "seeds": {"0": {"mor:eps8": {"phases": {"GRPO": [10.0, 8.0]}}}}})
    assert est is not None and est["scale"]["grpo"] == pytest.approx(2.0) and est["wall_per_seed"] == pytest.approx(20.0)


def test_committed_400_step_results_resume_with_their_budget():
    """The 400-step page's commands carry ``--grpo-steps 400``: under that flag today's configs give the
    fingerprint its rows were stored with, so those commands continue its results (not measure again)."""
    from pathlib import Path

    from mor_secure.bench.alignment import Options, load_track

    stored = json.loads((Path(__file__).parents[1] / "benchmarks" / "alignment_results_400steps.json").read_text())
    extra = {"fedavg_rounds": Options().fedavg_rounds, "quick": False}
    for name in ("shapes", "digits", "shapes-heldout"):
        steps = stored["tracks"][name]["settings"]["grpo_steps"]
        assert steps == 400
        assert stored["tracks"][name]["fingerprint"] == load_track(name, grpo_steps=steps).fingerprint(extra), name
