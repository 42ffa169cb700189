"""What differs between runs is chosen once, when the strategy is built (server_app/build.py), and the round loop
only calls the strategy's hooks: how a round's train exchange is done, what follows its aggregation, and how
the summary words the published prompt and the privacy block."""

from __future__ import annotations

import pytest
import torch
from flwr.app import MetricRecord

from dpfpl.common.config import RunConfig
from dpfpl.server_app.build import build_strategy
from dpfpl.server_app.checkpoint import ServerState
from dpfpl.server_app.runner import train_round
from dpfpl.server_app.secagg_round import SecureTrainExchange
from dpfpl.server_app.secfpp_round import SecfppStrategy
from dpfpl.server_app.strategy import ClearTrainExchange, PromptStrategy
from dpfpl.server_app.summary import privacy_block, published_prompt_note


def _state() -> ServerState:
    return ServerState(
        p_global=torch.zeros(4, 16),
        momentum=None,
        server_round=0,
        run_token="t",
        noise_multiplier_global=1.0,
        config_fingerprint="f",
    )


def _cfg(tmp_path, **overrides) -> RunConfig:
    return RunConfig(run_dir=str(tmp_path), secfpp_min_cluster_size=3, **overrides)


@pytest.mark.parametrize(
    "method,secure,strategy_class,exchange_class",
    [
        ("dpfpl", False, PromptStrategy, ClearTrainExchange),
        ("dpfpl", True, PromptStrategy, SecureTrainExchange),
        ("secfpp", False, SecfppStrategy, ClearTrainExchange),
        ("secfpp", True, SecfppStrategy, SecureTrainExchange),
        ("coop", False, PromptStrategy, ClearTrainExchange),
    ],
)
def test_the_strategy_and_its_train_exchange_are_chosen_once_from_the_config(
    tmp_path, method, secure, strategy_class, exchange_class
):
    strategy = build_strategy(_cfg(tmp_path, method=method, secure_aggregation=secure), _state())
    assert type(strategy) is strategy_class and type(strategy.train_exchange) is exchange_class
    # the privacy block says how the noise reached the sum only where the nodes added it under secure aggregation
    assert ("approximation" in privacy_block(strategy.cfg, strategy)) == secure


@pytest.mark.parametrize(
    "method,words",
    [
        ("dpfpl", "the mean of p_G over 0 rounds plus"),
        ("secfpp", "each cluster's final p_G (SecFPP's cluster prompts are not averaged) plus"),
        ("coop", "no p_G plus"),
        ("zeroshot", "the hand-crafted prompts (nothing is learned)"),
    ],
)
def test_the_published_prompt_is_worded_by_the_strategy(tmp_path, method, words):
    strategy = build_strategy(_cfg(tmp_path, method=method), _state())
    assert published_prompt_note(strategy.cfg, strategy, evaluated=True)["what"].startswith(words)


def test_a_round_is_what_the_strategys_hooks_make_of_it(tmp_path):
    """The runner's round (``train_round``) takes the train exchange and the after-aggregation step from the
    strategy: a plugged-in exchange is all it runs."""

    class FixedExchange:
        def run(self, strategy, grid, server_round, timeout):
            assert grid == "grid" and timeout == 42.0
            return None, MetricRecord({"num-replies": 3.0})

        def privacy_notes(self):
            return {}

    strategy = PromptStrategy(_cfg(tmp_path, dp=False, round_timeout=42.0), _state(), FixedExchange())
    record = train_round(strategy, "grid", 1)
    assert record["updated"] and record["num-replies"] == 3.0 and record["round"] == 1


def test_secfpps_clustering_phase_follows_only_every_secfpp_every_rounds(tmp_path):
    strategy = build_strategy(_cfg(tmp_path, method="secfpp", secfpp_every=3), _state())
    assert strategy.after_aggregation(None, 2) == {}  # no phase, no message: the Grid is not touched
    assert PromptStrategy(_cfg(tmp_path), _state()).after_aggregation(None, 3) == {}
