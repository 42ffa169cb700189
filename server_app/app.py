"""ServerApp (thin): run config -> strategy -> rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfpl.common.config import RunConfig
from dpfpl.common.console import console_logging
from dpfpl.common.secfpp.protocol import check_run_config

from .runner import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    console_logging()  # per-round metrics next to Flower's own lines, each once
    cfg = RunConfig.from_flower(dict(context.run_config))
    check_run_config(cfg)
    run_federation(grid, cfg)
