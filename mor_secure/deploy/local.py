"""Flower's deployment runtime, hardened: SuperLink and SuperNode command lines from the kits,
and a loopback rehearsal (every process on 127.0.0.1) used by the tests.

Flower 1.42 facts this relies on (checked in its source and ``--help``):

* ``flower-superlink`` serves the Fleet, Control and Runtime APIs over HTTP(S) on one
  ``--host``/``--port`` (default 127.0.0.1:8000); TLS from ``--ssl-certfile/--ssl-keyfile``
  (``--ssl-ca-certfile`` for its own SuperExec). ``--enable-supernode-auth`` refuses every
  SuperNode whose public key was not added with ``flwr supernode register KEY.pub CONN``.
  ``--disable-runtime-dependency-installation`` stops it running ``uv sync`` for each app.
* ``flower-supernode --superlink HOST:PORT --root-certificates CA --auth-supernode-private-key
  KEY --node-config '...'``; each SuperNode also serves a local Runtime API on ``--port``
  (default 9094), so SuperNodes sharing a host need distinct ports.
* ``flwr`` reads connections from ``$FLWR_HOME/config.toml`` (``[superlink.<name>]`` with
  ``address`` and an absolute ``root-certificates``).
* Both daemons start their SuperExec (and the App processes) as subprocesses found on PATH:
  the virtual environment's ``bin`` must be on PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from mor_secure.crypto.provision import load_client_kit, load_server_kit
from mor_secure.errors import ConfigError

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's commands: this Python's ``bin`` on PATH, its own FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # a SuperNode's SuperExec looks for new tasks every second by default; each reward round trip
    # waited 0.5 s for it on average. 0.1 s costs one local poll of the SuperNode ten times a second.
    # The SuperLink's own SuperExec keeps Flower's 1 s (superlink_env).
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    return env


def superlink_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for ``flower-superlink``: its SuperExec looks for a ServerApp to start every 1 s,
    Flower's default, not every 0.1 s. It starts one ServerApp per run, so the faster poll gains
    under a second per run, and it cost the SuperLink a request each time: 13 of the 86 requests
    per GRPO step that its HTTP API served in a GRPO run (3 clients, the executor deployment of
    ``bench perf`` (b), every HTTP call logged; measured 2026-12-02 on 2 CPUs)."""
    env = dict(env)
    env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)
    return env


def superlink_argv(server_kit: Path, host: str, port: int) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication, no runtime installs."""
    kit = load_server_kit(server_kit)
    return ["flower-superlink", *kit.superlink_tls_args(), "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]


def supernode_argv(client_kit: Path, client_dir: Path, superlink: str, runtime_port: int,
                   scorer_socket: Path | None = None, adaptive_poll: bool = False,
                   executor_secret: Path | None = None) -> list[str]:
    """``flower-supernode`` with the kit's CA and node key; client and kit folders as node config,
    and the client's scoring service (``mor-secure client serve``) when ``scorer_socket`` is given.
    ``adaptive_poll`` runs it through ``mor-secure client supernode`` (``deploy/supernode.py``).
    ``executor_secret``: ``--isolation process`` with that SuperExec secret; the SuperNode then
    waits for ``mor-secure client serve --runtime-api 127.0.0.1:RUNTIME_PORT`` to run its tasks."""
    kit = load_client_kit(client_kit)
    node_config = f'client-dir="{Path(client_dir).resolve()}" kit-dir="{Path(client_kit).resolve()}"'
    if scorer_socket is not None:
        node_config += f' scorer-socket="{Path(scorer_socket).resolve()}"'
    args = ["--superlink", superlink, *kit.supernode_args(), "--node-config", node_config,
            "--host", LOOPBACK, "--port", str(runtime_port)]
    if executor_secret is not None:
        args += ["--isolation", "process", "--superexec-auth-secret-file", str(Path(executor_secret).resolve())]
    if adaptive_poll:
        return [_mor_secure_bin(), "client", "supernode", "--", *args]
    return ["flower-supernode", *args]


def write_connection(flwr_home: Path, name: str, address: str, ca_pem: Path) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one TLS connection ``name`` (the default)."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"connection name {name!r} must be letters, digits, '-' or '_'")
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
                    f'root-certificates = "{Path(ca_pem).resolve()}"\n')
    return path


def scoring_service_argv(client_dir: Path, client_kit: Path | None = None, threads: int | None = None,
                         runtime_port: int | None = None) -> list[str]:
    """``mor-secure client serve`` for ``client_dir``: on its socket ``client_dir/scorer.sock``, or,
    with ``runtime_port``, as the ClientApp executor of the SuperNode whose Runtime API is
    ``127.0.0.1:runtime_port`` (with the folder's ``superexec_auth.secret``)."""
    argv = [_mor_secure_bin(), "client", "serve", "--dir", str(Path(client_dir).resolve())]
    if client_kit is not None:
        argv += ["--kit", str(Path(client_kit).resolve())]
    if runtime_port is not None:
        argv += ["--runtime-api", f"{LOOPBACK}:{runtime_port}"]
    return argv + (["--threads", str(threads)] if threads is not None else [])


def _mor_secure_bin() -> str:
    return str(Path(sys.executable).parent / "mor-secure")


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    """Return once a Unix socket exists at ``path``; RuntimeError if ``proc`` exits first,
    TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if Path(path).is_socket():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the process meant to create {path} exited with code {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"no socket at {path} after {timeout_s:.0f}s")


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Return once ``host:port`` accepts TCP connections; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


@dataclass
class ProcessGroup:
    """Processes started for a deployment, each logging to its own file; ``stop`` ends them all.

    Guarantee: after ``stop`` (also on exceptions, as a context manager) no process started here,
    and no descendant of one (SuperExec, App processes), is left running.
    """

    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None,
              cpus: Sequence[int] | None = None) -> subprocess.Popen:
        """Start ``argv`` logging to ``log_dir/name.log``; ``cpus``: run it, and every process it
        starts, on those CPUs only (``taskset``), as if they were another host's."""
        if cpus is not None:
            argv = [*pin_argv(cpus), *argv]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, grace_s: float = 10.0) -> None:
        family = []
        for proc in self.procs.values():
            try:
                family += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in family:
            _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=grace_s)
        for p in alive:
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace_s)
        for proc in self.procs.values():
            proc.poll()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def pin_argv(cpus: Sequence[int]) -> list[str]:
    """The prefix that runs a command on ``cpus`` only (util-linux ``taskset``; its children inherit it)."""
    cpus = sorted(set(int(c) for c in cpus))
    available = os.sched_getaffinity(0)
    if not cpus or not set(cpus) <= available:
        raise ConfigError(f"CPUs {cpus} to pin to: each must be one this process may run on ({sorted(available)})")
    taskset = shutil.which("taskset")
    if taskset is None:
        raise ConfigError("pinning processes to CPUs needs `taskset` (util-linux): install it, e.g. "
                          "`apt-get install util-linux`")
    return [taskset, "--cpu-list", ",".join(map(str, cpus))]


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass
