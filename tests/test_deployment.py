"""Flower's deployment runtime on loopback: a real TLS SuperLink with SuperNode authentication,
three real SuperNodes with their own client folders and kits, a MoR job through ``flwr run``
with CKKS aggregation, and the connections that must be refused.

Every server binds 127.0.0.1 on a free port; every process is bounded by a timeout and killed
in teardown (``ProcessGroup``), descendants included.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers.hardening import record as hardening_record

from mor_secure.config import load_config
from mor_secure.crypto.provision import provision
from mor_secure.deploy.client_init import EXECUTOR_SECRET, init_client_folder
from mor_secure.deploy.local import (
    LOOPBACK, ProcessGroup, flower_env, free_port, scoring_service_argv, superlink_argv, superlink_env,
    supernode_argv,
    wait_for_port, wait_for_socket, write_connection,
)
from mor_secure.federation import hops
from mor_secure.privacy.ledger import load_public_key, verify_ledger

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "deploy_smoke.yaml"
CLIENTS = ["alpha", "beta", "gamma"]
# alpha: `mor-secure client supernode` (adaptive poll), Flower's per-message ClientApp scores itself;
# beta: Flower's flower-supernode, its per-message ClientApp relays to beta's scoring service (socket);
# gamma: `mor-secure client supernode --isolation process`, its scoring service is the ClientApp executor
SOCKET_CLIENT, EXECUTOR_CLIENT = "beta", "gamma"
SERVICE_CLIENTS = (SOCKET_CLIENT, EXECUTOR_CLIENT)
ADAPTIVE_CLIENTS = ("alpha", "gamma")
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """A running SuperLink (TLS + SuperNode auth) with the three clients' keys registered.

    ``delta`` is provisioned by the same CA but never registered.
    """
    root = tmp_path_factory.mktemp("deploy")
    kits = provision(root / "kits", [*CLIENTS, "delta"])
    env = flower_env(root / "flwr_home")
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    write_connection(root / "flwr_home", "local", address, kits.server_dir / "ca.pem")
    with ProcessGroup(root / "logs") as group:
        (root / "hops").mkdir()
        group.start("superlink", ["timeout", str(RUN_TIMEOUT_S + 120), *superlink_argv(kits.server_dir, LOOPBACK, port)],
                    superlink_env({**env, hops.ENV: str(root / "hops" / "server.jsonl")}), cwd=root)  # the ServerApp's hop trace
        wait_for_port(LOOPBACK, port, timeout_s=60)
        for name in CLIENTS:
            reg = subprocess.run(["flwr", "supernode", "register", str(kits.server_dir / "supernodes" / f"{name}.pub"),
                                  "local"], env=env, capture_output=True, text=True, timeout=60)
            assert reg.returncode == 0 and "registered" in reg.stdout, reg.stdout + reg.stderr
        yield {"root": root, "kits": kits, "env": env, "address": address, "group": group}


def start_node(link, name: str, argv: list[str], timeout_s: int = 60):
    env = link["env"]
    if name.endswith(EXECUTOR_CLIENT):  # the executor client's SuperNode and service trace their hops
        env = {**env, hops.ENV: str(link["root"] / "hops" / f"{name}.jsonl")}
    return link["group"].start(name, ["timeout", str(timeout_s), *argv], env, cwd=link["root"])


def refused(link, name: str, argv: list[str]) -> tuple[int, str]:
    """Start a SuperNode that must fail to join; its exit code and log."""
    proc = start_node(link, name, [*argv, "--max-retries", "1", "--max-wait-time", "10"])
    rc = proc.wait(timeout=60)
    return rc, link["group"].log(name)


def node_argv(link, kit: str, adaptive_poll: bool = False) -> list[str]:
    folder = link["root"] / "unused" / kit
    return supernode_argv(link["kits"].client_dirs[kit], folder, link["address"], free_port(),
                          adaptive_poll=adaptive_poll)


@pytest.mark.parametrize("adaptive_poll", [False, True], ids=["flower-supernode", "client-supernode"])
def test_supernode_without_the_ca_is_refused(link, adaptive_poll):
    argv = node_argv(link, "alpha", adaptive_poll)
    i = argv.index("--root-certificates")
    rc, log = refused(link, "no_ca", argv[:i] + argv[i + 2:])  # system trust store only
    assert rc != 0 and "CERTIFICATE_VERIFY_FAILED" in log
    hardening_record("tests/test_deployment.py::test_supernode_without_the_ca_is_refused", inputs=1, bad_inputs=1)


def test_plaintext_supernode_is_refused(link):
    argv = node_argv(link, "alpha")
    i = argv.index("--root-certificates")
    rc, log = refused(link, "plaintext", argv[:i] + ["--insecure"] + argv[i + 4:])  # no CA, no node key
    assert rc != 0 and "could not establish a connection" in log
    hardening_record("tests/test_deployment.py::test_plaintext_supernode_is_refused", inputs=1, bad_inputs=1)


@pytest.mark.parametrize("adaptive_poll", [False, True], ids=["flower-supernode", "client-supernode"])
def test_unregistered_supernode_is_refused(link, adaptive_poll):
    rc, log = refused(link, "unregistered", node_argv(link, "delta", adaptive_poll))
    assert rc != 0 and "Failed to activate SuperNode" in log
    hardening_record("tests/test_deployment.py::test_unregistered_supernode_is_refused", inputs=1, bad_inputs=1)


def test_plaintext_control_connection_is_refused(link):
    home = link["root"] / "flwr_home_plaintext"
    home.mkdir(exist_ok=True)
    address = link["address"]
    (home / "config.toml").write_text(f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\n'
                                      f'address = "{address}"\ninsecure = true\n')
    env = {**link["env"], "FLWR_HOME": str(home)}
    res = subprocess.run(["flwr", "supernode", "list", "plain"], env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode != 0, res.stdout
    assert "alpha" not in res.stdout
    hardening_record("tests/test_deployment.py::test_plaintext_control_connection_is_refused", inputs=1, bad_inputs=1)


@pytest.fixture(scope="module")
def job(link):
    """Three SuperNodes with their own folders, one MoR job (CKKS on) through ``flwr run``."""
    root, kits, env = link["root"], link["kits"], link["env"]
    cfg = load_config(CONFIG)
    for name in CLIENTS:
        folder = init_client_folder(cfg, name, root / "clients" / name, kits.client_dirs[name])
        sock, runtime_port = None, free_port()
        if name == SOCKET_CLIENT:  # this client keeps its RM loaded in `mor-secure client serve`
            proc = start_node(link, f"service_{name}", scoring_service_argv(folder, kits.client_dirs[name]),
                              timeout_s=RUN_TIMEOUT_S + 60)
            sock = folder / "scorer.sock"
            wait_for_socket(sock, proc, timeout_s=120)
        secret = folder / EXECUTOR_SECRET if name == EXECUTOR_CLIENT else None
        link.setdefault("runtime_ports", {})[name] = runtime_port
        start_node(link, f"supernode_{name}", supernode_argv(kits.client_dirs[name], folder, link["address"],
                                                              runtime_port, sock, adaptive_poll=name in ADAPTIVE_CLIENTS,
                                                              executor_secret=secret),
                   timeout_s=RUN_TIMEOUT_S + 60)
        if name == EXECUTOR_CLIENT:  # the same service, as the SuperNode's ClientApp executor
            wait_for_port(LOOPBACK, runtime_port, timeout_s=60)
            start_node(link, f"service_{name}", scoring_service_argv(folder, kits.client_dirs[name],
                                                                     runtime_port=runtime_port),
                       timeout_s=RUN_TIMEOUT_S + 60)
    run_dir = root / "server_run"
    run_config = f"run-dir='{run_dir}' config='{CONFIG}' server-kit='{kits.server_dir}'"
    submit = subprocess.run(["flwr", "run", str(REPO), "local", "--run-config", run_config],
                            env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    deadline = time.monotonic() + RUN_TIMEOUT_S
    record = {}
    while time.monotonic() < deadline:
        path, audit = run_dir / "run_record.json", run_dir / "key_audit.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        finished = audit.exists() and "after_run" in json.loads(audit.read_text())  # the ServerApp's last write
        if record.get("status") == "failed" or (record.get("status") == "completed" and finished):
            break
        time.sleep(2)
    logs = {n: link["group"].log(n)[-2000:] for n in ["superlink", *[f"service_{c}" for c in SERVICE_CLIENTS],
                                                      *[f"supernode_{c}" for c in CLIENTS]]}
    assert record.get("status") == "completed", json.dumps({"record": record, "logs": logs}, indent=1)
    return run_dir, root


def test_mor_job_completes_over_tls_with_ckks(job):
    run_dir, root = job
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["phases_completed"] == ["rm_training", "warmup", "router_fit", "grpo", "evaluation"]
    assert record["encryption"] == "ckks" and record["mode"] == "deployment"
    grpo = json.loads((run_dir / "metrics" / "grpo.json").read_text())
    assert grpo["encryption"] == "ckks" and grpo["ciphertext_bytes"] > 0
    events = (run_dir / "events.jsonl").read_text().splitlines() if (run_dir / "events.jsonl").exists() else []
    assert not [e for e in events if json.loads(e)["kind"] in ("rejected", "decrypt_failed", "no_scores")], events
    hardening_record("tests/test_deployment.py::test_mor_job_completes_over_tls_with_ckks", runs=1, runs_finished=1)


def test_adaptive_supernodes_ran_flower_with_the_poll_replaced(job, link):
    """alpha and gamma ran through `mor-secure client supernode` (the substitution took: the
    launcher says so only when it did), beta through Flower's own command; all three finished the
    job above with TLS and node authentication."""
    for name in CLIENTS:
        log = link["group"].log(f"supernode_{name}")
        assert "SuperNode ID" in log, log[-2000:]
        assert ("with adaptive polling" in log) == (name in ADAPTIVE_CLIENTS), log[-2000:]
        assert "running flower-supernode unchanged" not in log and "only partly" not in log


def test_server_process_held_no_private_ckks_context(job):
    run_dir, _ = job
    audit = json.loads((run_dir / "key_audit.json").read_text())
    assert audit["encrypted_mixing_on"]["private"] == 0
    assert audit["encrypted_mixing_on"]["public"] >= 1, "the census must see the server's public context"
    assert audit["after_run"]["private"] == 0


def test_each_client_ledger_verifies_on_its_own_disk(job):
    run_dir, root = job
    steps = load_config(CONFIG).grpo.steps
    for name in CLIENTS:
        folder = root / "clients" / name
        assert verify_ledger(folder / "ledger.jsonl", load_public_key(folder / "ledger_key.pub")).ok
        phases = [json.loads(x)["context"]["phase"] for x in (folder / "ledger.jsonl").read_text().splitlines()]
        assert phases[0] == "rm_training" and phases.count("router_fit") == 1 and phases.count("grpo") == steps


@pytest.mark.parametrize("name", SERVICE_CLIENTS)
def test_scoring_service_answered_every_request_of_its_client(job, link, name):
    """beta's per-message ClientApp relayed to its service, gamma's service ran the SuperNode's
    tasks itself: each service process trained and scored (the ledger entries above are its
    writes), and it stops cleanly on SIGTERM and says how many requests it answered."""
    _, root = job
    proc = link["group"].procs[f"service_{name}"]
    assert proc.poll() is None, "the service died during the run:\n" + link["group"].log(f"service_{name}")
    psutil.Process(proc.pid).children()[0].send_signal(signal.SIGTERM)  # `timeout` runs the service as its child
    proc.wait(timeout=30)
    log = link["group"].log(f"service_{name}")
    served = int(re.search(r"stopped after (\d+) request", log).group(1))
    ledger = (root / "clients" / name / "ledger.jsonl").read_text().splitlines()
    # one train request, then one request per release (router fit, GRPO steps) plus evaluation
    # and decrypt requests, which release nothing new
    assert served >= len(ledger), (served, len(ledger), log[-2000:])
    assert not (root / "clients" / name / "scorer.sock").exists()
    if name == EXECUTOR_CLIENT:  # every task it acquired was one request, none failed
        tasks, failed = map(int, re.search(r"after (\d+) task\(s\), (\d+) failed", log).groups())
        assert tasks == served and failed == 0, log[-2000:]


def test_hop_trace_splits_each_score_round_trip_of_the_executor_client(job, link):
    """gamma's SuperNode and its service as executor noted each part of every reward round trip
    (with the ServerApp's push and pulls): one time line per round trip whose hops add up to it."""
    path = hops.critical_path(*hops.read_deployment(link["root"] / "hops", [EXECUTOR_CLIENT]), kind="query.score")
    assert path["round_trips"] >= load_config(CONFIG).grpo.steps, path
    assert 0 < path["total_s"] < RUN_TIMEOUT_S
    # each of the client's events comes after the one before it on the path (the objects are stored
    # after the message arrived, the executor reads them after that, ...): every hop but the server's
    # poll wait (which may overlap the reply's push) took time in the typical round trip
    medians = {h["event"]: h["median_s"] for h in path["hops"]}
    assert all(v > 0 for e, v in medians.items() if e != hops.SERVER_PULL), medians
    # the ServerApp and gamma's SuperNode traced their requests to the SuperLink: in each round trip
    # the server pushed the request and pulled the replies, gamma pulled it, its objects, and pushed one
    sent = hops.requests_per_trip(*hops.read_deployment(link["root"] / "hops", [EXECUTOR_CLIENT]), kind="query.score")
    assert sent["round_trips"] == path["round_trips"], sent
    for route in ("/v1/runtime/push-messages", "/v1/runtime/pull-messages", "/v1/fleet/pull-messages",
                  "/v1/fleet/pull-object", "/v1/fleet/push-messages"):
        assert sent["per_path"].get(route, 0) >= 1, (route, sent)


@pytest.mark.parametrize("secret", [None, b"not the folder's secret"], ids=["no-secret", "wrong-secret"])
def test_runtime_api_gives_tasks_only_to_the_executor_with_the_secret(job, link, secret):
    """Threat T25: gamma's SuperNode runs with --isolation process and the folder's SuperExec
    secret; a local process without it cannot acquire gamma's tasks."""
    from mor_secure.federation.runtime_executor import ExecutorRefused, RuntimeExecutor

    executor = RuntimeExecutor(f"{LOOPBACK}:{link['runtime_ports'][EXECUTOR_CLIENT]}",
                               lambda *a: pytest.fail("no task may reach this executor"), auth_secret=secret)
    with pytest.raises(ExecutorRefused, match=r"refused AcquireTask \(401\).*--superexec-auth-secret-file"):
        executor.run(idle_timeout_s=5)
    hardening_record("tests/test_deployment.py::test_runtime_api_gives_tasks_only_to_the_executor_with_the_secret",
                     inputs=1, bad_inputs=1)
