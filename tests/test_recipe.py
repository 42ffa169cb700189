"""The mechanisms that make DP personalization safe to turn on: a noise-bounded local step (no node's prompt
collapses under its own LDP noise), a text-initialized prompt that starts as the hand-written one, and a
validation split so that hyperparameters are chosen without test images."""

import math

import numpy as np
import pytest
import torch

from dpfpl.common.config import RunConfig
from dpfpl.common.methods import DpSettings, PromptLearner, SgdSettings, build_method
from dpfpl.common.optim import noise_bounded_lr
from dpfpl.common.prompt import PromptTextEncoder

# the issue that motivated the mechanism: a digit client with 291 records at B = 32 (q = 0.11) over 50
# steps gets z_L = 6.95 at the demo's epsilon
SMALL_NODE_RECORDS, SMALL_NODE_Z = 291, 6.95


def _demo_config(**overrides) -> RunConfig:
    from dpfpl.presets import DEMO_PRESET

    return RunConfig.from_flower({**RunConfig.defaults(), **DEMO_PRESET, **overrides})


NAMES = (
    "lr",
    "radius",
    "reference_norm",
    "noise_multiplier",
    "max_grad_norm",
    "expected_batch",
    "steps",
    "noised_size",
)


def test_noise_bounded_lr_bounds_the_expected_noise_walk():
    lr = noise_bounded_lr(
        lr=0.1,
        radius=0.2,
        reference_norm=0.5,
        noise_multiplier=6.95,
        max_grad_norm=1.0,
        expected_batch=32,
        steps=50,
        noised_size=264,
    )
    assert 0 < lr < 0.1
    gen = torch.Generator().manual_seed(0)
    walks = torch.stack(
        [(lr * 6.95 * 1.0 / 32 * torch.randn(50, 264, generator=gen)).sum(0).norm() for _ in range(200)]
    )
    assert float(walks.pow(2).mean().sqrt()) == pytest.approx(0.2 * 0.5, rel=0.05)
    # off, or nothing noised: the configured lr
    assert noise_bounded_lr(**dict(zip(NAMES, (0.1, 0.0, 0.5, 6.95, 1.0, 32, 50, 264)))) == 0.1
    assert noise_bounded_lr(**dict(zip(NAMES, (0.1, 0.2, 0.5, math.inf, 1.0, 32, 50, 264)))) == 0.1
    assert (
        noise_bounded_lr(**dict(zip(NAMES, (1e-6, 0.2, 0.5, 6.95, 1.0, 32, 50, 264)))) == 1e-6
    )  # never above the configured lr


@pytest.fixture(scope="module")
def recipe_encoder(tiny_model):
    cfg = _demo_config()
    return PromptTextEncoder(tiny_model.model, tiny_model.tokenizer, [f"class {i}" for i in range(6)], cfg.n_ctx)


def _local_drift(
    encoder: PromptTextEncoder, logit_scale: float, cfg: RunConfig, lr: float, max_norm: float, feature_dim: int
) -> float:
    """How far a small node's local prompt moves from its init in a run of cfg.num_server_rounds noisy steps."""
    learner = PromptLearner(build_method("dpfpl", cfg.rank), encoder, logit_scale)
    gen = torch.Generator().manual_seed(0)
    local = learner.init_local(gen, cfg.local_init_std)
    start = local["p_local"].clone()
    p_global = encoder.init_context(cfg.ctx_init, gen)
    feats = torch.nn.functional.normalize(torch.randn(SMALL_NODE_RECORDS, feature_dim, generator=gen), dim=-1)
    labels = torch.randint(0, 2, (SMALL_NODE_RECORDS,), generator=gen)
    dp = DpSettings(True, SMALL_NODE_Z, max_norm, max_norm)
    momentum: dict = {}
    for _ in range(cfg.num_server_rounds):
        step = learner.train_step(p_global, local, momentum, feats, labels, cfg.batch_size, dp, SgdSettings(lr), gen)
        local, momentum = step.local, step.momentum
    return float((local["p_local"] - start).norm())


def test_a_small_node_under_heavy_local_noise_stays_near_its_init(recipe_encoder, tiny_model):
    """With the demo recipe, a node as small as the demo's smallest keeps its local prompt within the noise
    radius of its init; with the old fixed step (lr 0.1, C = 10) the same node's prompt is swamped."""
    cfg = _demo_config()
    assert cfg.dp and cfg.local_noise_radius > 0 and cfg.ctx_init
    reference = recipe_encoder.reference_context_norm()
    lr = noise_bounded_lr(
        lr=cfg.lr_local,
        radius=cfg.local_noise_radius,
        reference_norm=reference,
        noise_multiplier=SMALL_NODE_Z,
        max_grad_norm=cfg.max_grad_norm_local,
        expected_batch=cfg.batch_size,
        steps=cfg.num_server_rounds,
        noised_size=build_method("dpfpl", cfg.rank).local.noised_size(cfg.n_ctx, recipe_encoder.width),
    )
    scale = float(tiny_model.model.logit_scale.exp())
    dim = tiny_model.model.text_projection.shape[1]
    bound = 1.5 * cfg.local_noise_radius * reference
    assert _local_drift(recipe_encoder, scale, cfg, lr, cfg.max_grad_norm_local, dim) <= bound
    assert _local_drift(recipe_encoder, scale, cfg, 0.1, 10.0, dim) > 10 * bound


def test_text_init_starts_from_the_hand_written_prompt(recipe_encoder):
    cfg = _demo_config()
    ctx = recipe_encoder.init_context(cfg.ctx_init)
    gen = torch.Generator().manual_seed(0)
    # a method with a global prompt: p_G carries the text, the local part starts near zero
    dpfpl = PromptLearner(build_method("dpfpl", cfg.rank), recipe_encoder, 1.0)
    local = dpfpl.init_local(gen, cfg.local_init_std, ctx)
    assert float(local["p_local"].norm()) < 0.05 * float(ctx.norm())
    # CoOp's whole prompt is local: it starts at the text
    coop = PromptLearner(build_method("coop"), recipe_encoder, 1.0)
    assert torch.equal(coop.init_local(gen, cfg.local_init_std, ctx)["p_local"], ctx)
    # and that prompt's text features are the hand-crafted ones ("a photo of a {c}.")
    with torch.no_grad():
        assert torch.allclose(recipe_encoder(ctx), recipe_encoder.handcrafted_features(), atol=1e-5)


def test_validation_split_never_reads_test_images():
    from dpfpl.common.node_data import evaluation_indices, run_dataset, run_partition

    cfg = RunConfig(evaluation="validation", validation_fraction=0.25)
    data = run_dataset(cfg)
    part = run_partition(cfg)
    test = set(data.test_indices().tolist())
    held_out = set(evaluation_indices(cfg, data).tolist())
    assert held_out and not held_out & test
    for client in part.clients:
        train, val = set(client.train.tolist()), set(client.test.tolist())
        assert val and not train & val and not (train | val) & test
        assert val <= held_out
        assert len(val) / (len(val) + len(train)) == pytest.approx(0.25, abs=0.02)
    # the same seed gives the same split; the test protocol is unchanged
    assert np.array_equal(run_partition(cfg.model_copy(update={"seed": 0})).clients[0].test, part.clients[0].test)
    assert set(run_partition(RunConfig()).clients[0].test.tolist()) <= test
    with pytest.raises(ValueError, match="base-novel"):
        RunConfig(evaluation="validation", partition="base-novel")


def test_the_server_bounds_its_noise_walk_on_the_global_prompt_by_the_same_rule():
    from dpfpl.common.models import cached_clip
    from dpfpl.common.prompt import reference_context_norm
    from dpfpl.server_app.strategy import global_learning_rate

    cfg = _demo_config(pretrained="none")
    model = cached_clip(cfg.model_name, cfg.pretrained, None).model  # the model the server reads its scale from
    shape = (cfg.n_ctx, model.token_embedding.weight.shape[1])
    lr = global_learning_rate(cfg, 43.0, 10, shape)  # z_G of the demo at epsilon 0.1: the rule binds
    reference = reference_context_norm(model.token_embedding, cfg.n_ctx)
    walk = lr * 43.0 * cfg.max_grad_norm_global * math.sqrt(cfg.num_server_rounds * math.prod(shape))
    assert lr < cfg.lr_global
    assert walk / (cfg.batch_size * 10) == pytest.approx(cfg.global_noise_radius * reference, rel=1e-6)
    # off, or without DP: the configured step
    assert global_learning_rate(cfg.model_copy(update={"global_noise_radius": 0.0}), 43.0, 10, shape) == cfg.lr_global
    assert global_learning_rate(cfg.model_copy(update={"dp": False}), 43.0, 10, shape) == cfg.lr_global
