"""The run's strategy, chosen once from its config: the method's strategy class and its train exchange.

Why one place: the round loop (``server_app/runner.py``) asks the strategy what to do (``train_round``,
``after_aggregation``) and never looks at the method's name or at ``secure-aggregation``; what differs between
runs is decided here, as a Flower user picks a strategy class and wraps it before ``strategy.start``.
"""

from __future__ import annotations

from dpfpl.common.config import RunConfig

from .checkpoint import ServerState
from .secagg_round import SecureTrainExchange
from .secfpp_round import SecfppStrategy
from .strategy import ClearTrainExchange, PromptStrategy, TrainExchange


def build_strategy(cfg: RunConfig, state: ServerState) -> PromptStrategy:
    """SecFPP's per-cluster strategy or the one-global-prompt strategy of every other method, with the train
    exchange of secure aggregation (the server sees only the noised sum) or in the clear."""
    train_exchange: TrainExchange = SecureTrainExchange() if cfg.secure_aggregation else ClearTrainExchange()
    strategy_class = SecfppStrategy if cfg.method == "secfpp" else PromptStrategy
    return strategy_class(cfg, state, train_exchange)
