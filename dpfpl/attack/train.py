"""A prompt trained by the engine on a given record set: the attack's target and its shadows.

It is a federation of one node run without transport: every step is the node's ``PromptLearner.train_step``
(Poisson sample, per-sample gradients, clipping, local noise, local update) followed by the server's
``global_update`` (global noise, SGD on p_G); the noise multipliers are calibrated by the same functions the
node and the server use, and every step is recorded in a ``PrivacyAccountant``. One node is the worst case
for the target: its records alone move p_G. The result is exported through ``dpfpl.publish``, so the
attacker gets exactly what a node would publish.

Generators are seeded (``seed``) so that the experiment is reproducible; in a deployment the noise comes
from the OS (``dpfpl.client_app.node``), which does not change the mechanism.
"""

from __future__ import annotations

import torch

from ..client_app.node import local_noise_multiplier
from ..common.config import RunConfig
from ..common.methods import DpSettings, PromptLearner, SgdSettings
from ..common.models import LoadedModel
from ..common.privacy import PrivacyAccountant
from ..common.prompt import initial_global_prompt
from ..publish import PublishedPrompt, accountant_privacy, build_published_prompt
from ..server_app.strategy import global_noise_multiplier, global_update


def train_prompt(
    cfg: RunConfig,
    learner: PromptLearner,
    model: LoadedModel,
    features: torch.Tensor,
    labels: torch.Tensor,
    progress=None,
) -> PublishedPrompt:
    """``cfg.num_server_rounds`` engine steps (one per round, as in the paper) on (features, labels)."""
    method = learner.method
    q = min(1.0, cfg.batch_size / len(labels))
    z_global = global_noise_multiplier(cfg, q, method)
    z_local = local_noise_multiplier(cfg, q, z_global, method)
    p_global = initial_global_prompt(cfg) if method.shares_global else None
    local = learner.init_local(torch.Generator().manual_seed(cfg.seed * 100_003 + 1))
    momentum_local: dict[str, torch.Tensor] = {}
    momentum_global = None
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + 7919)
    accountant = PrivacyAccountant(cfg.delta)
    dp = DpSettings(cfg.dp, z_local, cfg.max_grad_norm_local, cfg.max_grad_norm_global, cfg.secure_noise)
    opt = SgdSettings(cfg.lr_local, cfg.momentum, cfg.weight_decay)
    for _ in range(cfg.num_server_rounds):
        step = learner.train_step(p_global, local, momentum_local, features, labels, cfg.batch_size, dp, opt, generator)
        local, momentum_local = step.local, step.momentum
        if step.global_grad is not None:
            p_global, momentum_global, _ = global_update(
                cfg, p_global, momentum_global, [step.global_grad], z_global, generator
            )
        if cfg.dp:
            accountant.record_step(z_local, z_global, q)
        if progress is not None:
            progress()
    # one node: its records are the only ones in p_G, so "other clients" is itself
    privacy = accountant_privacy(
        accountant,
        cfg.dp,
        cfg.delta,
        z_local if method.local else None,
        z_global if method.shares_global else None,
        (accountant.epsilon_published() if method.local else accountant.epsilon_global())
        if cfg.dp and method.shares_global
        else None,
    )
    return build_published_prompt(
        learner,
        model,
        learner.encoder.classnames,
        p_global,
        local,
        privacy,
        cfg.rank,
        source={
            "trained-by": "membership-inference experiment",
            "records": len(labels),
            "steps": cfg.num_server_rounds,
            "seed": cfg.seed,
        },
    )
