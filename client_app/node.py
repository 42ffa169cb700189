"""A node's work for one message: load state, run the method, save state. Flower-free, so it is testable
and the ClientApp handlers stay thin."""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from functools import lru_cache

import torch

from common.config import NodeConfig, RunConfig
from common.evaluation import accuracy, cross_entropy
from common.methods import DpFplMethod
from common.methods.dpfpl import DpSettings
from common.models import LoadedModel, cached_clip
from common.node import NodeData, load_node_data
from common.privacy import PrivacyAccountant, calibrate_noise_multiplier
from common.prompt import PromptTextEncoder

from .state import NodeState

log = logging.getLogger("dpfpl.client")


@lru_cache(maxsize=4)
def _encoder(model_name: str, pretrained: str, cache: str | None, seed: int, n_ctx: int, classnames: tuple[str, ...],
             device: torch.device):
    model = cached_clip(model_name, pretrained, cache, seed)
    model.model.to(device)
    return model, PromptTextEncoder(model.model, model.tokenizer, list(classnames), n_ctx).to(device)


@lru_cache(maxsize=16)
def _node_data(cfg: RunConfig, node: NodeConfig, model: LoadedModel, device: torch.device) -> NodeData:
    data = load_node_data(cfg, node, model, node.cache_dir)
    return NodeData(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(data).items()})


@dataclass
class TrainOutcome:
    global_grad: torch.Tensor
    metrics: dict[str, float]


def local_noise_multiplier(cfg: RunConfig, sample_rate: float, z_global: float) -> float:
    """z_L for this node: given directly, or calibrated by the accountant for this node's q and the planned
    number of rounds. With calibrate-for = "published", z_L is chosen so that the published prompt
    (LDP and GDP on the same batch, combined multiplier) meets the target."""
    if not cfg.dp:
        return 0.0
    if not cfg.uses_calibration:
        return cfg.noise_multiplier_local
    if cfg.calibrate_for == "each":
        return calibrate_noise_multiplier(cfg.target_epsilon, sample_rate, cfg.num_server_rounds, cfg.delta)
    z_eff = calibrate_noise_multiplier(cfg.target_epsilon, sample_rate, cfg.num_server_rounds, cfg.delta)
    rest = 1.0 / z_eff**2 - (1.0 / z_global**2 if z_global > 0 else 0.0)
    if rest <= 0:
        raise ValueError("the global noise alone already exceeds the published-prompt budget; check z_G")
    return 1.0 / math.sqrt(rest)


class DpFplNode:
    def __init__(self, cfg: RunConfig, node: NodeConfig) -> None:
        self.cfg = cfg
        self.node = node
        self.state_dir = node.resolved_state_dir(cfg.run_dir)
        classnames = tuple(cfg.class_list())
        self.device = node.resolved_device()
        self.model, self.encoder = _encoder(cfg.model_name, cfg.pretrained, node.cache_dir, cfg.seed, cfg.n_ctx,
                                            classnames, self.device)
        self.data = _node_data(cfg, node, self.model, self.device)
        self.method = DpFplMethod(self.encoder, float(self.model.model.logit_scale.exp()), cfg.rank,
                                  use_residual=cfg.method == "dpfpl")

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.cfg.batch_size / self.data.num_train)

    def _state(self, run_token: str, z_global: float) -> NodeState:
        state = NodeState.load(self.state_dir)
        if state is not None and state.run_key == run_token:
            return state
        if state is not None:
            backup = self.state_dir / f"local_state.{state.run_key or 'old'}.safetensors"
            (self.state_dir / "local_state.safetensors").replace(backup)
            log.warning("state of another run moved to %s; starting a fresh local prompt", backup)
        # p_L's init may follow the seed; its noise and sampling must not be predictable (OS entropy)
        init = torch.Generator().manual_seed(self.cfg.seed * 100_003 + (self.node.partition_id or 0) + 1)
        p_local = self.encoder.init_context("", init).detach()
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        return NodeState(p_local=p_local, generator=gen, accountant=PrivacyAccountant(self.cfg.delta),
                         noise_multiplier_local=local_noise_multiplier(self.cfg, self.sample_rate, z_global),
                         run_key=run_token)

    def train(self, p_global: torch.Tensor, server_round: int, run_token: str, z_global: float) -> TrainOutcome:
        state = self._state(run_token, z_global)
        dp = DpSettings(self.cfg.dp, state.noise_multiplier_local, self.cfg.max_grad_norm_local,
                        self.cfg.max_grad_norm_global)
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        result = self.method.train_step(
            to(p_global), to(state.p_local), to(state.momentum), self.data.train_features, self.data.train_labels,
            self.cfg.batch_size, dp, self.cfg.lr_local, self.cfg.momentum, self.cfg.weight_decay, state.generator,
        )
        state.p_local, state.momentum, state.last_round = result.p_local, result.momentum, server_round
        if self.cfg.dp:
            state.accountant.record_step(state.noise_multiplier_local, z_global, self.sample_rate)
        state.save(self.state_dir)
        log.info("node %s round %d: loss %.4f on %d samples", self.node.partition_id, server_round,
                 result.loss, result.batch_size)
        metrics: dict[str, float] = {
            "num-examples": float(self.data.num_train),
            "batch-size": float(result.batch_size),
            "noise-multiplier-local": state.noise_multiplier_local,
        }
        if self.cfg.dp:
            metrics["epsilon-local"] = state.accountant.epsilon_local()
            metrics["epsilon-published"] = state.accountant.epsilon_published()
        else:
            # Without DP there is no guarantee to protect; with DP the batch loss is a non-private function
            # of the training data and stays on the node.
            metrics["train-loss"] = result.loss
        return TrainOutcome(result.global_grad.cpu(), metrics)

    def evaluate(self, p_global: torch.Tensor | None, run_token: str) -> dict[str, float]:
        """Zero-shot (p_global None) or personalized-prompt accuracy on local and neighbor test images."""
        with torch.no_grad():
            if p_global is None:
                text = self.encoder.handcrafted_features()
            else:
                state = NodeState.load(self.state_dir)
                p_local = state.p_local if state is not None and state.run_key == run_token else torch.zeros_like(p_global)
                gen = torch.Generator().manual_seed(0)
                prompt = self.method.personalized_prompt(p_global.to(self.device), p_local.to(self.device), gen)
                text = self.encoder(prompt)
        d = self.data
        return {
            "local-acc": accuracy(text, d.local_features, d.local_labels),
            "neighbor-acc": accuracy(text, d.neighbor_features, d.neighbor_labels),
            "local-loss": cross_entropy(text, d.local_features, d.local_labels, self.method.logit_scale),
            "num-examples": float(d.num_train),
        }
