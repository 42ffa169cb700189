"""ServerApp (thin): run config -> strategy -> rounds."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfpl.common.config import RunConfig
from dpfpl.common.secfpp.protocol import check_run_config

from .runner import run_federation

app = ServerApp()


def _console_logging() -> None:
    """Per-round metrics go to the console next to Flower's own log lines."""
    logger = logging.getLogger("dpfpl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("dpfpl %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _console_logging()
    cfg = RunConfig.from_flower(dict(context.run_config))
    check_run_config(cfg)
    run_federation(grid, cfg)
