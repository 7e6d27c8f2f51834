"""The MoR ServerApp. The run folder comes from the factory (``mor-secure run``) or run_config.

With ``federation.encryption: ckks`` the server needs its kit's PUBLIC CKKS context:

* deployment (``flwr run``): ``run_config["server-kit"]``, the server kit of ``mor-secure
  provision`` (holds ``ckks_public.bin``, never the secret key);
* simulation (``mor-secure run``): everything runs on one machine, so the run plays the
  provisioner and issues kits into ``<run>/kits`` (server kit + one client kit each).

``key_audit.json`` counts the TenSEAL contexts the server process holds, private and public:
when encrypted mixing starts (``encrypted_mixing_on``, written by the channel) and after the run
(``after_run``, completed or failed). A private count above 0 would mean the server held a
secret key; tests assert it is 0.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mor_secure.config import load_config
from mor_secure.crypto import ckks
from mor_secure.errors import ConfigError
from mor_secure.federation import hops
from mor_secure.federation.orchestrator import run_server, write_json


def attach_server_kit(run_dir: Path, run_config) -> Path | None:
    """Name the server kit in the run record when encryption is on (see the module docstring).

    Returns the kit folder, or None when encryption is off. ConfigError when a deployment run
    with CKKS names no kit.
    """
    cfg = load_config(run_dir / "config.yaml")
    if cfg.federation.encryption != "ckks":
        return None
    given = str(run_config.get("server-kit", "") or "") if run_config is not None else ""
    if given:
        kit = Path(given).resolve()
    elif cfg.federation.mode == "deployment":
        raise ConfigError("federation.encryption is ckks in deployment mode but no server kit was given: "
                          "flwr run . <connection> --run-config \"server-kit='/abs/kits/server' ...\"")
    else:
        kit = provision_simulation_kits(run_dir, [c.name for c in cfg.clients])
    record_path = run_dir / "run_record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record["server_kit"] = str(kit)
    write_json(record_path, record)
    return kit


def provision_simulation_kits(run_dir: Path, clients: list[str]) -> Path:
    """Simulation only: issue kits into ``<run>/kits`` once (a resumed run reuses them)."""
    from mor_secure.crypto.provision import provision

    kits = run_dir / "kits"
    if not (kits / "server").is_dir():
        provision(kits, clients)
    return kits / "server"


def write_key_audit(run_dir: Path) -> dict:
    """Census of the TenSEAL contexts alive in this (server) process, added to key_audit.json."""
    gc.collect()
    path = run_dir / "key_audit.json"
    audit = json.loads(path.read_text()) if path.exists() else {"process": "server"}
    audit["after_run"] = ckks.context_census()
    write_json(path, audit)
    return audit


def make_server_app(run_dir: Path | None = None, progress: bool = True) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        hops.trace_requests()  # only with a hop trace (bench perf, the deployment test)
        folder = run_dir
        if folder is None:
            from mor_secure.runner import prepare_from_run_config

            folder = prepare_from_run_config(context.run_config, context.run_id)
        if folder is None:
            raise ConfigError("no run folder: set run_config 'run-dir' or 'config'")
        folder = Path(folder)
        try:
            attach_server_kit(folder, context.run_config)
            run_server(folder, grid, progress=progress)
        finally:
            write_key_audit(folder)

    return app


app = make_server_app()
