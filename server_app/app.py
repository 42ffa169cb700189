"""ServerApp (thin): run config -> strategy -> rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig

from .runner import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(dict(context.run_config))
    run_federation(grid, cfg)
