"""The ``mor-secure`` command.

  mor-secure run CONFIG [--set key=value ...] [--run-dir DIR]   run MoR end to end (simulation)
  mor-secure run --resume RUN_DIR                                continue a stopped run from its last checkpoint
  mor-secure ledger verify LEDGER --key PUBKEY                   check a ledger's chain and signatures
  mor-secure report RUN_DIR                                      write the privacy-accounting report
  mor-secure budget plan --epsilon E --delta D --records N ...   plan noise before anything runs
  mor-secure provision OUT --clients a,b,c [--hosts ...]         issue per-party kits (TLS, node auth, CKKS)
  mor-secure client init CONFIG --name N --out DIR [--kit KIT]   prepare a SuperNode's own client folder
  mor-secure bench ckks [--clients 3,16] [--steps S]             CKKS aggregation cost per GRPO step
  mor-secure bench perf [--repeats N] [--clients 3,...,64] [--quick]  DP-SGD, Flower and scaling ratios
  mor-secure bench alignment [--tracks ...] [--seeds N] [--methods ...]  MoR against the baselines
  mor-secure bench device [--device cuda] [--size base]          real-size models on a GPU: RM and GRPO steps
  mor-secure audit privacy CONFIG [--out JSON]                   one-run canary audit: epsilon lower bounds
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mor_secure.errors import ConfigError, MorSecureError
from mor_secure.quiet import quiet_libraries


def cmd_run(args: argparse.Namespace) -> int:
    from mor_secure.config import load_config
    from mor_secure.errors import ConfigError
    from mor_secure.runner import finish, prepare_run, resume_run, simulate

    if args.resume:
        if args.config or args.set or args.run_dir:
            raise ConfigError("--resume RUN_DIR continues a run with the config in RUN_DIR/config.yaml; "
                              "give no CONFIG, --set or --run-dir with it")
        run_dir = resume_run(Path(args.resume), progress=not args.no_progress)
        print(finish(run_dir), flush=True)
        return 0
    if not args.config:
        raise ConfigError("mor-secure run needs a CONFIG (e.g. configs/demo.yaml), or --resume RUN_DIR")
    cfg = load_config(args.config, args.set)
    if cfg.federation.mode != "simulation":
        raise MorSecureError("mor-secure run drives the simulation; for deployment see README 'Across machines'")
    run_dir = prepare_run(cfg, Path(args.run_dir) if args.run_dir else None)
    print(f"run folder: {run_dir}", flush=True)
    if cfg.insecure_flags:
        print(f"RISK FLAGS IN FORCE: {', '.join(cfg.insecure_flags)}", flush=True)
    simulate(run_dir, progress=not args.no_progress)
    print(finish(run_dir), flush=True)
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from mor_secure.privacy.ledger import load_public_key, verify_ledger

    ledger = Path(args.ledger)
    key = Path(args.key) if args.key else ledger.parent / "ledger_key.pub"
    result = verify_ledger(ledger, load_public_key(key))
    if result.ok:
        print(f"OK: {ledger} verifies ({result.entries} entries, chain and signatures intact)")
        return 0
    if result.first_bad is None:
        print(f"FAILED: {ledger}: {result.reason}")
        return 1
    reason = result.reason.split(": ", 1)[1]  # drop the "line N: " prefix
    print(f"FAILED: {ledger}: entry {result.first_bad} (line {result.first_bad}) is the first bad entry: {reason}. "
          f"Entries before it verify: {result.entries}.")
    if result.torn_tail:
        print("It is an unfinished final write (a crash mid-append): it was never committed, so nothing was "
              "released under it; the client moves it aside the next time it opens the ledger.")
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from mor_secure.compliance.report import write_report

    html, js = write_report(Path(args.run_dir))
    print(f"privacy report: {html}\nmachine-readable: {js}")
    return 0


def cmd_budget_plan(args: argparse.Namespace) -> int:
    from mor_secure.compliance.report import _jsonable
    from mor_secure.errors import ConfigError
    from mor_secure.privacy.planner import plan_budget

    phases = {}
    for item in args.phase_releases:
        name, _, count = item.partition("=")
        if not name or not count.strip().isdigit():
            raise ConfigError(f"--phase-releases takes PHASE=COUNT, e.g. grpo=200. Found {item!r}.")
        phases[name] = int(count)
    plan = plan_budget(target_epsilon=args.epsilon, delta=args.delta, num_records=args.records,
                       epochs=args.epochs, batch_size=args.batch_size, score_releases=args.score_releases,
                       score_count=args.score_count, clip_bound=args.clip_bound,
                       opacus_accountant=args.accountant, phase_releases=phases)
    print(json.dumps(_jsonable(plan.to_dict()), indent=2) if args.json else plan.render())
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from mor_secure.crypto.provision import provision

    result = provision(Path(args.out), [c for c in args.clients.split(",") if c],
                       hosts=[h for h in args.hosts.split(",") if h], days=args.days, force=args.force)
    print(f"CA: {result.ca_dir}\nserver kit: {result.server_dir}")
    for name, folder in result.client_dirs.items():
        print(f"client kit {name}: {folder}")
    return 0


def cmd_audit_privacy(args: argparse.Namespace) -> int:
    from mor_secure.audit.privacy import check_audit, load_audit_config, render_table, run_privacy_audit, write_result

    cfg = load_audit_config(args.config, args.set)
    result = run_privacy_audit(cfg, progress=not args.no_progress)
    print(f"{render_table(result)}\nresult: {write_result(result, args.out)}")
    problems = check_audit(result)
    for problem in problems:
        print(f"AUDIT FAILED: {problem}")
    return 1 if problems else 0


def cmd_client_init(args: argparse.Namespace) -> int:
    from mor_secure.config import load_config
    from mor_secure.deploy.client_init import init_client_folder
    from mor_secure.federation.scoring_service import EXECUTOR_SECRET

    folder = init_client_folder(load_config(args.config, args.set), args.name, Path(args.out),
                                Path(args.kit) if args.kit else None)
    node_config = f'client-dir="{folder}"' + (f' kit-dir="{Path(args.kit).resolve()}"' if args.kit else "")
    kit = f" --kit {Path(args.kit).resolve()}" if args.kit else ""
    print(f"client folder: {folder}\n"
          f"start its SuperNode (README, deployment step 3) with: mor-secure client supernode -- ... --port PORT "
          f"--isolation process --superexec-auth-secret-file {folder / EXECUTOR_SECRET} --node-config '{node_config}'\n"
          f"then its scoring service, the SuperNode's ClientApp executor: "
          f"mor-secure client serve --dir {folder}{kit} --runtime-api 127.0.0.1:PORT\n"
          f"or, with Flower's per-message ClientApp, relaying to `mor-secure client serve --dir {folder}{kit}`: "
          f"add scorer-socket=\"{folder / 'scorer.sock'}\" to the node config")
    return 0


def cmd_client_serve(args: argparse.Namespace) -> int:
    from mor_secure.federation.scoring_service import run_service

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: give at least 1")
        import torch

        torch.set_num_threads(args.threads)
    return run_service(Path(args.dir), Path(args.kit) if args.kit else None,
                       Path(args.socket) if args.socket else None, runtime_api=args.runtime_api,
                       auth_secret_file=Path(args.superexec_auth_secret_file) if args.superexec_auth_secret_file
                       else None)


def cmd_client_supernode(args: argparse.Namespace) -> int:
    from mor_secure.deploy.supernode import main as supernode_main

    flower_args = list(args.flower_args)
    if flower_args[:1] == ["--"]:
        flower_args = flower_args[1:]
    if not flower_args:
        raise ConfigError("client supernode: give flower-supernode's arguments after `--`, e.g. "
                          "`mor-secure client supernode -- --superlink HOST:PORT --root-certificates CA ...`")
    if not 0 < args.floor_s <= 3:
        raise ConfigError(f"--floor-s {args.floor_s}: give a value in (0, 3] seconds")
    return supernode_main(flower_args, floor_s=args.floor_s)


def cmd_bench_ckks(args: argparse.Namespace) -> int:
    import datetime as dt

    from mor_secure.bench.markdown import default_out
    from mor_secure.deploy.bench import bench_ckks, render, write_section

    counts = tuple(int(c) for c in args.clients.split(",") if c)
    rows = bench_ckks(counts, steps=args.steps, repeats=args.repeats, prompts_per_step=args.prompts_per_step,
                      num_generations=args.num_generations)
    defaults = vars(build_parser().parse_args(["bench", "ckks"]))
    given = [(k, v) for k, v in vars(args).items() if k in defaults and k not in ("func", "out") and v != defaults[k]]
    command = " ".join(["mor-secure bench ckks", *(f"--{k.replace('_', '-')} {v}" for k, v in given)])
    body = render(rows, command, dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    print(body)
    out = Path(args.out) if args.out else default_out()
    write_section(out, body)
    print(f"written: section 'ckks' of {out}")
    return 0


def cmd_bench_perf(args: argparse.Namespace) -> int:
    import json as _json

    from mor_secure.bench import perf
    from mor_secure.bench.markdown import default_out

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(c) for c in text.split(",") if c)

    out = Path(args.out) if args.out else (None if args.quick else default_out())
    results = Path(args.results) if args.results else (None if args.quick else default_out().parent
                                                       / "benchmarks" / "perf_results.json")
    if args.report_only:
        if results is None:
            raise ConfigError("--report-only needs --results (--quick keeps no results file)")
        print(perf.report(results, out))
        if out is not None:
            print(f"written: section 'perf' of {out} from {results}")
        return 0
    if args.quick:
        parts = {k: dict(v) for k, v in perf.QUICK.items()}
    else:
        parts = {"dpsgd": {"repeats": args.repeats, "steps": args.dpsgd_steps, "batch_size": args.batch_size,
                           "modes": tuple(m for m in args.modes.split(",") if m)},
                 "grpo": {"clients": args.grpo_clients, "steps": args.grpo_steps, "repeats": args.grpo_repeats,
                          "transport": args.transport},
                 "rounds": {"counts": ints(args.clients), "repeats": args.repeats, "engine": args.engine}}
    defaults = vars(build_parser().parse_args(["bench", "perf"]))
    given = [(k, v) for k, v in vars(args).items() if k in defaults and k != "func" and v != defaults[k]]
    command = " ".join(["mor-secure bench perf", *(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                                                    for k, v in given if k not in ("json", "no_progress", "out",
                                                                                   "results"))])
    result, body = perf.run(command=command, out=out, progress=not args.no_progress, results=results, **parts)
    print(body)
    if out is not None:
        print(f"written: section 'perf' of {out}")
    if args.json:
        Path(args.json).write_text(_json.dumps(result, indent=2, default=str))
    return 0


def cmd_bench_device(args: argparse.Namespace) -> int:
    from mor_secure.bench import device
    from mor_secure.bench.markdown import default_out

    repo_bench = default_out().parent / "benchmarks"
    out = Path(args.out) if args.out else (None if args.quick else default_out())
    results = Path(args.results) if args.results else (None if args.quick else repo_bench / "device_results.json")
    perf_results = Path(args.perf_results) if args.perf_results else repo_bench / "perf_results.json"
    if args.report_only:
        if results is None:
            raise ConfigError("--report-only needs --results (--quick keeps no results file)")
        print(device.report(results, out, perf_results))
        if out is not None:
            print(f"written: section '{device.SECTION}' of {out} from {results}")
        return 0
    if args.quick:
        kwargs = device.quick_kwargs()
    else:
        kwargs = {"size": args.size, "image_size": args.image_size, "batch_size": args.batch_size,
                  "steps": args.steps, "repeats": args.repeats,
                  "modes": tuple(m for m in args.modes.split(",") if m),
                  "grpo": {"steps": args.grpo_steps, "prompts_per_step": args.prompts_per_step,
                           "num_generations": args.num_generations}}
    defaults = vars(build_parser().parse_args(["bench", "device"]))
    skip = ("func", "no_progress", "out", "results", "perf_results")
    given = [(k, v) for k, v in vars(args).items() if k in defaults and k not in skip and v != defaults[k]]
    command = " ".join(["mor-secure bench device", *(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                                                      for k, v in given)])
    _, body = device.run(command=command, out=out, results=results, perf_results=perf_results,
                         progress=not args.no_progress, device=args.device, **kwargs)
    print(body)
    if out is not None:
        print(f"written: section '{device.SECTION}' of {out}")
    return 0


def cmd_bench_alignment(args: argparse.Namespace) -> int:
    from mor_secure.bench import alignment
    from mor_secure.bench.markdown import default_out

    repo = default_out().parent
    opts = alignment.Options(
        tracks=[t for t in args.tracks.split(",") if t], seeds=args.seeds, first_seed=args.first_seed,
        methods=[m for m in args.methods.split(",") if m],
        epsilons=[float(e) for e in args.epsilons.split(",") if e], grpo_steps=args.grpo_steps,
        fedavg_rounds=args.fedavg_rounds, quick=args.quick,
        configs={k: v for k, v in (("shapes", args.shapes_config), ("digits", args.digits_config)) if v},
        overrides=args.set,
        work_dir=Path(args.work_dir) if args.work_dir else repo / "runs" / ("bench-alignment-quick" if args.quick
                                                                             else "bench-alignment"),
        results=Path(args.results) if args.results else repo / "benchmarks" / (
            "alignment_results_quick.json" if args.quick else "alignment_results.json"),
        fresh=args.fresh, progress=not args.no_progress, grpo_runs=args.grpo_runs)
    defaults = vars(build_parser().parse_args(["bench", "alignment"]))
    skip = ("func", "out", "results", "work_dir", "plots", "no_progress", "fresh", "report_only", "fill_reward_top1",
            "merge")
    given = [(k, v) for k, v in vars(args).items() if k in defaults and k not in skip and v != defaults[k]]
    parts = []
    for k, v in given:
        for item in (v if isinstance(v, list) else [v]):
            parts.append(f"--{k.replace('_', '-')}" + ("" if item is True else f" {item}"))
    command = " ".join(["mor-secure bench alignment", *parts])
    start = time.perf_counter()
    if args.report_only and args.fill_reward_top1:
        raise ConfigError("--report-only and --fill-reward-top1 exclude each other: the second computes")
    if args.merge and args.fill_reward_top1:
        raise ConfigError("--merge and --fill-reward-top1 exclude each other: merge first, then fill")
    if args.merge:
        results = alignment.merge_results(opts.results, [Path(p) for p in args.merge])
    elif args.report_only:
        results = alignment.load_results(opts.results)
    elif args.fill_reward_top1:
        results = alignment.fill_reward_top1(opts)
    else:
        results = alignment.run_bench(opts, command=command)
    out = Path(args.out) if args.out else (None if args.quick else default_out())
    if out is None:
        print(f"results: {opts.results} (--quick writes BENCHMARKS.md only with --out)")
        return 0
    plots = Path(args.plots) if args.plots else out.parent / "benchmarks"
    body = alignment.write_report(results, out, plots, full_command="mor-secure bench alignment",
                                  wall_s=None if args.report_only or args.merge else time.perf_counter() - start,
                                  results_path=opts.results)
    print(body)
    print(f"written: section '{alignment.SECTION}' of {out}; plots in {plots}; results {opts.results}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-secure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run MoR end to end in Flower's simulation engine")
    run.add_argument("config", nargs="?", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set grpo.steps=10 (repeatable)")
    run.add_argument("--run-dir", help="run folder to create (default: <run.output_dir>/<name>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a stopped run: completed phases are skipped, GRPO continues from its last "
                          "checkpoint, clients keep their reward models and ledgers")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    ledger = sub.add_parser("ledger", help="privacy ledger tools").add_subparsers(dest="ledger_cmd", required=True)
    verify = ledger.add_parser("verify", help="verify a ledger's hash chain and signatures")
    verify.add_argument("ledger")
    verify.add_argument("--key", help="the client's ledger public key (default: ledger_key.pub beside it)")
    verify.set_defaults(func=cmd_ledger_verify)

    report = sub.add_parser("report", help="write the privacy-accounting report of a run")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    budget = sub.add_parser("budget", help="privacy budget tools").add_subparsers(dest="budget_cmd", required=True)
    plan = budget.add_parser("plan", help="noise and epsilon per phase for a target, before anything runs")
    plan.add_argument("--epsilon", type=float, required=True)
    plan.add_argument("--delta", type=float, required=True)
    plan.add_argument("--records", type=int, required=True, help="private preference pairs of the client")
    plan.add_argument("--epochs", type=int, required=True)
    plan.add_argument("--batch-size", type=int, required=True)
    plan.add_argument("--score-releases", type=int, default=0, help="planned score vectors (output route)")
    plan.add_argument("--score-count", type=int, default=0, help="scores per released vector")
    plan.add_argument("--clip-bound", type=float, default=None)
    plan.add_argument("--phase-releases", action="append", default=[], metavar="PHASE=COUNT",
                      help="score vectors a phase releases, in run order (repeat), e.g. --phase-releases "
                           "router_fit=1 --phase-releases grpo=200; replaces --score-releases and shows "
                           "the epsilon each phase would spend")
    plan.add_argument("--accountant", choices=["rdp", "prv"], default="rdp",
                      help="Opacus accountant that calibrates the DP-SGD noise (default rdp, as `mor-secure run` "
                           "trains); the primary accountant (dp-accounting PLD) must agree in either case")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_budget_plan)

    prov = sub.add_parser("provision", help="issue TLS, node-auth and CKKS kits for every party")
    prov.add_argument("out")
    prov.add_argument("--clients", required=True, help="comma-separated client names")
    prov.add_argument("--hosts", default="127.0.0.1,localhost,::1", help="SuperLink host names/addresses")
    prov.add_argument("--days", type=int, default=365)
    prov.add_argument("--force", action="store_true", help="replace existing kits")
    prov.set_defaults(func=cmd_provision)

    client = sub.add_parser("client", help="client-side tools").add_subparsers(dest="client_cmd", required=True)
    init = client.add_parser("init", help="prepare this client's own folder for a SuperNode (deployment)")
    init.add_argument("config", help="the consortium's YAML config (the same file as the server's)")
    init.add_argument("--name", required=True, help="this client's name in the config")
    init.add_argument("--out", required=True, help="the folder to create (the SuperNode's client-dir)")
    init.add_argument("--kit", help="this client's kit from `mor-secure provision` (its ledger key is used)")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    init.set_defaults(func=cmd_client_init)
    serve = client.add_parser("serve", help="keep this client's reward model loaded and answer its SuperNode's "
                                            "ClientApp over a local socket (deployment; see README)")
    serve.add_argument("--dir", required=True, help="the client folder (from `mor-secure client init`)")
    serve.add_argument("--kit", help="this client's kit (needed for CKKS)")
    serve.add_argument("--socket", help="Unix socket to create (default: DIR/scorer.sock)")
    serve.add_argument("--threads", type=int, help="torch threads for training and scoring (default: torch's)")
    serve.add_argument("--runtime-api", metavar="HOST:PORT",
                       help="be the ClientApp executor of the SuperNode whose Runtime API is here (start that "
                            "SuperNode with --isolation process): no socket, no process per message")
    serve.add_argument("--superexec-auth-secret-file", metavar="FILE",
                       help="with --runtime-api: the file given to the SuperNode's --superexec-auth-secret-file")
    serve.set_defaults(func=cmd_client_serve)
    snode = client.add_parser(
        "supernode", help="run Flower's flower-supernode with adaptive polling (deployment; see README)",
        usage="mor-secure client supernode [--floor-s S] -- FLOWER_SUPERNODE_ARGS...",
        description="Flower's own SuperNode, except that after an empty pull it sleeps an eighth of the "
                    "time since its last message (from --floor-s up to Flower's 3 s), or through most of the gap "
                    "it learnt requests come in, instead of 3 s, and "
                    "looks for its ClientApp's reply every 0.02 s instead of 0.5 s. Everything after `--` "
                    "goes to flower-supernode unchanged.")
    snode.add_argument("--floor-s", type=float, default=0.02,
                       help="shortest wait between pulls, right after a message (default 0.02 s)")
    snode.add_argument("flower_args", nargs=argparse.REMAINDER, help="`--` then flower-supernode's arguments")
    snode.set_defaults(func=cmd_client_supernode)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)
    bench_ckks = bench.add_parser("ckks", help="time per GRPO step and bytes per step, with and without CKKS")
    bench_ckks.add_argument("--clients", default="3,16", help="comma-separated client counts")
    bench_ckks.add_argument("--steps", type=int, default=4,
                            help="GRPO steps per run, alternating plaintext and CKKS (at least 4)")
    bench_ckks.add_argument("--prompts-per-step", type=int, default=16, help="prompts per GRPO step (demo: 16)")
    bench_ckks.add_argument("--num-generations", type=int, default=8, help="samples per prompt (demo: 8)")
    bench_ckks.add_argument("--repeats", type=int, default=2, help="runs, each starting with the other mode")
    bench_ckks.add_argument("--out", help="BENCHMARKS.md whose 'ckks' section is replaced "
                            "(default: the repository's BENCHMARKS.md)")
    bench_ckks.set_defaults(func=cmd_bench_ckks)
    bench_perf = bench.add_parser("perf", help="DP-SGD vs non-private RM step, GRPO step with rewards through "
                                  "Flower (TLS) vs in-process, one Flower round with 3..64 clients")
    bench_perf.add_argument("--repeats", type=int, default=3, help="repeats of (a) and (c) (medians are reported)")
    bench_perf.add_argument("--results", help="JSON of the measured numbers, command and date "
                            "(default: benchmarks/perf_results.json; none with --quick)")
    bench_perf.add_argument("--report-only", action="store_true",
                            help="only render the section again from --results (no measurement)")
    bench_perf.add_argument("--clients", default="3,8,16,32,64", help="client counts for the Flower round (c)")
    bench_perf.add_argument("--engine", choices=["simulation", "inproc"], default="simulation",
                            help="(c) in Flower's simulation engine (Ray) or an in-process grid")
    bench_perf.add_argument("--modes", default="hooks,functorch,ew,ghost", help="Opacus grad-sample modes for (a)")
    bench_perf.add_argument("--batch-size", type=int, default=128, help="(a) RM batch size (demo: 256)")
    bench_perf.add_argument("--dpsgd-steps", type=int, default=12,
                            help="(a) steps per training run (at least 3; the first and the last are not timed)")
    bench_perf.add_argument("--grpo-clients", type=int, default=3, help="(b) clients")
    bench_perf.add_argument("--grpo-steps", type=int, default=5, help="(b) GRPO steps per run (at least 2)")
    bench_perf.add_argument("--grpo-repeats", type=int, default=3, help="(b) runs per side")
    bench_perf.add_argument("--transport", choices=["tls", "grid"], default="tls",
                            help="(b) Flower's deployment runtime over TLS on loopback, or the in-process grid only")
    bench_perf.add_argument("--quick", action="store_true",
                            help="tiny sizes, seconds (smoke); writes only with an explicit --out")
    bench_perf.add_argument("--out", help="BENCHMARKS.md whose 'perf' section is replaced "
                            "(default: the repository's BENCHMARKS.md)")
    bench_perf.add_argument("--json", help="also write the raw results as JSON")
    bench_perf.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench_perf.set_defaults(func=cmd_bench_perf)
    bench_al = bench.add_parser("alignment", help="MoR against the baselines (single RM, uniform, FedAvg, "
                                "centralized) at several epsilons: oracle accuracy after GRPO, mean +- std over seeds")
    bench_al.add_argument("--tracks", default="shapes,digits,shapes-heldout,digits-heldout",
                          help="comma-separated: shapes, digits, and their -heldout variants (one family owned by "
                               "no client: generalisation)")
    bench_al.add_argument("--seeds", type=int, default=3, help="N seeds per track, from --first-seed")
    bench_al.add_argument("--first-seed", type=int, default=0,
                          help="first seed (default 0): processes with distinct seeds, each with its own --results "
                               "and --work-dir, run parts of the benchmark side by side")
    bench_al.add_argument("--methods", default="base,single,uniform,fedavg,centralized,mor",
                          help="comma-separated subset of base, single, uniform, fedavg, centralized, mor (MoR "
                               "without DP and at every --epsilons), or single MoR rows such as mor:eps8, mor:nodp; "
                               "oracle (the answer key as a 0/1 reward: a reference no server could have) runs "
                               "only when named")
    bench_al.add_argument("--epsilons", default="1,4,8", help="client DP-SGD epsilons of the MoR rows")
    bench_al.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps per method (default: the config's)")
    bench_al.add_argument("--grpo-runs", type=int, default=1,
                          help="GRPO runs per seed and method, each sampling with its own seed from the same base "
                               "policy and reward models (a seed's accuracy is their mean; stored runs are kept and "
                               "only the missing ones run)")
    bench_al.add_argument("--fedavg-rounds", type=int, default=5,
                          help="FedAvg rounds (the clients' epochs are split across them)")
    bench_al.add_argument("--shapes-config", default=None, help="config of the shapes track (default configs/demo.yaml)")
    bench_al.add_argument("--digits-config", default=None,
                          help="config of the digits track (default configs/bench_digits.yaml)")
    bench_al.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override every track's config, as for `mor-secure run` (repeatable); clients.*.KEY "
                               "sets it for every client, e.g. --set clients.*.training.epochs=4")
    bench_al.add_argument("--quick", action="store_true",
                          help="tiny sizes (smoke test); writes BENCHMARKS.md only with an explicit --out")
    bench_al.add_argument("--out", help="BENCHMARKS.md whose 'alignment' section is replaced (default: the repository's)")
    bench_al.add_argument("--plots", help="folder for the PNG plots (default: benchmarks/ beside --out)")
    bench_al.add_argument("--results", help="results JSON, rewritten after every method; a rerun with the same "
                          "settings continues from it (default: benchmarks/alignment_results.json)")
    bench_al.add_argument("--work-dir", help="client folders, reward models, base policies (default: "
                          "runs/bench-alignment)")
    bench_al.add_argument("--fresh", action="store_true", help="ignore stored results and measure everything again")
    bench_al.add_argument("--merge", action="append", default=[], metavar="RESULTS",
                          help="join the rows of another results file (e.g. a process run with --first-seed) into "
                               "--results, then rebuild the section and plots; measures nothing (repeatable)")
    bench_al.add_argument("--report-only", action="store_true",
                          help="only rebuild the section and plots from the results JSON")
    bench_al.add_argument("--fill-reward-top1", action="store_true",
                          help="add the reward-ranking diagnostic (how often each method's reward ranks the oracle "
                               "answer first) to stored rows without it, from the work folder's reward models (no "
                               "GRPO, no training), then rebuild the section")
    bench_al.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench_al.set_defaults(func=cmd_bench_alignment)
    bench_dev = bench.add_parser("device", help="real-size models (about 1.2B parameters) on a GPU: DP-SGD vs "
                                 "non-private RM step, GRPO step with three client RMs")
    bench_dev.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --size tiny: a smoke run)")
    bench_dev.add_argument("--size", default="base", help="model size preset (base: about 1.2B parameters)")
    bench_dev.add_argument("--image-size", type=int, default=128,
                           help="image side in pixels (128: 256 image tokens for LLaVA and PaliGemma)")
    bench_dev.add_argument("--batch-size", type=int, default=16, help="(a) pairs per RM step")
    bench_dev.add_argument("--steps", type=int, default=4, help="(a) RM steps per run (at least 3)")
    bench_dev.add_argument("--repeats", type=int, default=2, help="(a) runs per mode")
    bench_dev.add_argument("--modes", default="hooks,functorch", help="(a) Opacus grad-sample modes")
    bench_dev.add_argument("--grpo-steps", type=int, default=4, help="(b) GRPO steps (at least 3)")
    bench_dev.add_argument("--prompts-per-step", type=int, default=4, help="(b) prompts per GRPO step")
    bench_dev.add_argument("--num-generations", type=int, default=8, help="(b) samples per prompt")
    bench_dev.add_argument("--quick", action="store_true",
                           help="tiny sizes, seconds (smoke); writes only with an explicit --out")
    bench_dev.add_argument("--results", help="JSON of the measured numbers (default: benchmarks/device_results.json)")
    bench_dev.add_argument("--perf-results", help="bench perf's results, for the transport estimate "
                           "(default: benchmarks/perf_results.json)")
    bench_dev.add_argument("--report-only", action="store_true",
                           help="only render the section again from --results (no measurement)")
    bench_dev.add_argument("--out", help="BENCHMARKS.md whose 'device' section is replaced "
                           "(default: the repository's BENCHMARKS.md)")
    bench_dev.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench_dev.set_defaults(func=cmd_bench_device)

    audit = sub.add_parser("audit", help="privacy audits").add_subparsers(dest="audit_cmd", required=True)
    audit_privacy = audit.add_parser("privacy", help="one-run canary audit of DP-SGD reward-model training "
                                     "(Steinke, Nasr, Jagielski 2023): epsilon lower bounds")
    audit_privacy.add_argument("config", help="audit YAML, e.g. configs/audit_privacy.yaml")
    audit_privacy.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                               help="override a config value, e.g. --set canaries=200 (repeatable)")
    audit_privacy.add_argument("--out", default="audits/privacy_audit.json", help="result JSON to write")
    audit_privacy.add_argument("--no-progress", action="store_true", help="no progress bars")
    audit_privacy.set_defaults(func=cmd_audit_privacy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        return args.func(args)
    except MorSecureError as exc:
        print(f"mor-secure: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
