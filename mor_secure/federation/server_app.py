"""The MoR ServerApp. The run folder comes from the factory (``mor-secure run``) or run_config."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mor_secure.errors import ConfigError
from mor_secure.federation.orchestrator import run_server


def make_server_app(run_dir: Path | None = None, progress: bool = True) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        folder = run_dir
        if folder is None:
            from mor_secure.runner import prepare_from_run_config

            folder = prepare_from_run_config(context.run_config, context.run_id)
        if folder is None:
            raise ConfigError("no run folder: set run_config 'run-dir' or 'config'")
        run_server(Path(folder), grid, progress=progress)

    return app


app = make_server_app()
