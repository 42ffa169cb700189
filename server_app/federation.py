"""How many clients a run has when its run config leaves it to the federation (``num-clients = 0``).

Why: ``flwr run .`` runs on the federation Flower is pointed at, and Flower's default local simulation has 2
SuperNodes. A partitioned data set must be split for exactly as many clients as there are SuperNodes (each
simulated node trains partition ``partition-id`` of ``num-partitions``), so a fixed default would stop the plain
command at setup. With ``num-clients = 0`` the ServerApp waits for the nodes as every round does (at least
min-clients), counts the connected ones and runs with that number, as Flower's own examples read the partition
count from the node config. The resolved number is what the run records (its fingerprint, ``config.json``, the
summary) and what every train and evaluation message tells the nodes (``NUM_CLIENTS_KEY``). An explicit
``num-clients`` is used as is, without contacting the Grid.
"""

from __future__ import annotations

import logging

from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from dpfpl.common.config import RunConfig
from dpfpl.common.secfpp.protocol import check_run_config

log = logging.getLogger("dpfpl.server")

NUM_CLIENTS_KEY = "num-clients"  # in every train/evaluation message's config: the run's number of clients
FROM_FEDERATION = 0  # the run config's num-clients that means "as many as the federation has"


def resolve_num_clients(grid: Grid, cfg: RunConfig) -> RunConfig:
    """``cfg`` with an explicit ``num-clients``: its own, or the number of SuperNodes connected once at least
    min-clients are. The resolved config is validated again as an explicit one would be (e.g. SecFPP's decoding
    threshold against that many nodes)."""
    if cfg.num_clients != FROM_FEDERATION:
        return cfg
    _, node_ids = sample_nodes(grid, cfg.min_clients, cfg.min_clients)
    count = len(node_ids)
    log.info("num-clients not set: training on the %d SuperNode%s of the federation", count, "" if count == 1 else "s")
    resolved = RunConfig(**{**cfg.model_dump(), "num_clients": count})
    check_run_config(resolved)
    return resolved
