"""The DP step against an independent reference, the noise each party adds, and where that noise comes from.

These are the tests the mutation check (scripts/mutation_check.py) relies on: each would fail if clipping
were disabled or applied to the mean, if sums were divided by the realized batch, if a noise scale were
halved, or if a DP generator followed the run config's seed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import privacy_loss_distribution

from dpfpl.common.config import RunConfig
from dpfpl.common.methods import DpSettings, PromptLearner, SgdSettings, build_method, factorize
from dpfpl.common.privacy import (
    PrivacyAccountant,
    add_gaussian_noise,
    combined_noise_multiplier,
    dp_generator,
    epsilon_for,
    poisson_sample,
)
from dpfpl.common.privacy.mechanisms import standard_normal

EXPECTED_BATCH = 8
C_LOCAL, C_GLOBAL = 0.05, 0.03  # small enough that every sample of the batch is clipped


def _loss(encoder, feats, labels, scale=20.0):
    return lambda prompt: F.cross_entropy(scale * feats @ encoder(prompt).t(), labels, reduction="none")


def _clip_jointly_by_hand(parts: list[torch.Tensor], bound: float) -> list[torch.Tensor]:
    norm = math.sqrt(sum(float(p.pow(2).sum()) for p in parts))
    return [p * min(1.0, bound / norm) for p in parts]


def test_dp_step_equals_a_per_sample_loop_clipped_and_divided_by_the_expected_batch(encoder, batch):
    """DP-FPL with z_L = 0: the reply and the local factor gradients are exactly sum_j clip(.)_j / B, computed
    here one sample at a time with plain autograd."""
    feats, labels = batch
    learner = PromptLearner(build_method("dpfpl", rank=2), encoder, 20.0)
    gen = torch.Generator().manual_seed(21)
    p_global = torch.randn(8, encoder.width, generator=gen) * 0.02
    p_local = torch.randn(8, encoder.width, generator=gen) * 0.02
    replay = copy.deepcopy(gen)
    out = learner.train_step(
        p_global,
        {"p_local": p_local},
        {},
        feats,
        labels,
        EXPECTED_BATCH,
        DpSettings(True, 0.0, C_LOCAL, C_GLOBAL),
        SgdSettings(0.1),
        gen,
    )
    idx = poisson_sample(len(labels), EXPECTED_BATCH / len(labels), replay)
    u, v, r = factorize(p_local, 2, replay)
    assert len(idx) == out.batch_size and out.batch_size != EXPECTED_BATCH  # realized != expected batch
    loss = _loss(encoder, feats[idx], labels[idx])
    global_sum, gu_sum, gv_sum = 0.0, 0.0, 0.0
    for j in range(len(idx)):
        prompt = (p_global + u @ v + r).requires_grad_(True)
        (g,) = torch.autograd.grad(loss(prompt)[j], prompt)
        assert float(g.norm()) > C_GLOBAL and math.hypot(float((g @ v.t()).norm()), float((u.t() @ g).norm())) > C_LOCAL
        global_sum = global_sum + g * min(1.0, C_GLOBAL / float(g.norm()))
        gu, gv = _clip_jointly_by_hand([g @ v.t(), u.t() @ g], C_LOCAL)
        gu_sum, gv_sum = gu_sum + gu, gv_sum + gv
    assert torch.allclose(out.global_grad, global_sum / EXPECTED_BATCH, rtol=1e-4, atol=1e-8)
    assert torch.allclose(out.local_grads[0], gu_sum / EXPECTED_BATCH, rtol=1e-4, atol=1e-8)
    assert torch.allclose(out.local_grads[1], gv_sum / EXPECTED_BATCH, rtol=1e-4, atol=1e-8)


def test_server_noise_std_is_z_times_clip_over_b_times_n():
    from dpfpl.server_app.strategy import global_update

    cfg = RunConfig(
        lr_global=1.0,
        batch_size=4,
        max_grad_norm_global=3.0,
        target_epsilon=0,
        noise_multiplier_local=1.0,
        noise_multiplier_global=2.0,
    )
    zeros = [torch.zeros(200, 100) for _ in range(5)]
    p_global, _, std = global_update(cfg, torch.zeros(200, 100), None, zeros, 2.0, torch.Generator().manual_seed(0))
    expected = 2.0 * 3.0 / (4 * 5)
    assert std == pytest.approx(expected)
    assert float(p_global.std()) == pytest.approx(expected, rel=0.03)  # the noise really added, not just reported


def test_dp_generators_are_seeded_from_the_os_and_follow_the_seed_only_without_dp(tmp_path):
    from dpfpl.server_app.checkpoint import ServerState
    from dpfpl.server_app.strategy import PromptStrategy

    draw = lambda gen: torch.randn(8, generator=gen)  # noqa: E731
    assert not torch.equal(draw(dp_generator(True, 7)), draw(dp_generator(True, 7)))
    assert torch.equal(draw(dp_generator(False, 7)), draw(dp_generator(False, 7)))

    def server_noise() -> torch.Tensor:
        cfg = RunConfig(
            run_dir=str(tmp_path), target_epsilon=0, noise_multiplier_local=1.0, noise_multiplier_global=1.0, seed=3
        )
        state = ServerState(
            p_global=torch.zeros(2, 4),
            momentum=None,
            server_round=0,
            run_token="t",
            noise_multiplier_global=1.0,
            config_fingerprint="f",
        )
        return draw(PromptStrategy(cfg, state).noise_generator)

    assert not torch.equal(server_noise(), server_noise())  # same run config, unpredictable noise


def test_secure_noise_is_standard_normal_fresh_per_release_and_leaves_the_generator_alone():
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state()
    first, second = (
        standard_normal((400, 250), gen, torch.float32, secure=True),
        standard_normal((400, 250), gen, torch.float32, secure=True),
    )
    assert torch.equal(gen.get_state(), before)
    assert not torch.equal(first, second)
    for sample in (first, second):
        assert float(sample.mean()) == pytest.approx(0.0, abs=0.01)
        assert float(sample.std()) == pytest.approx(1.0, abs=0.01)
    noisy = add_gaussian_noise(torch.zeros(400, 250), 0.5, gen, secure=True)
    assert float(noisy.std()) == pytest.approx(0.5, rel=0.02)


def test_published_prompt_epsilon_matches_the_stacked_gaussian_in_dp_accounting():
    """The composition, checked outside the code under test: both releases of one Poisson batch, scaled to
    unit noise, are one Gaussian mechanism with sensitivity sqrt(z_L^-2 + z_G^-2); dp-accounting composes it."""
    z_l, z_g, q, steps = 4.0, 6.0, 0.05, 20
    acc = PrivacyAccountant(1e-5)
    for _ in range(steps):
        acc.record_step(z_l, z_g, q)
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1.0,
        sensitivity=math.sqrt(z_l**-2 + z_g**-2),
        sampling_prob=q,
        value_discretization_interval=1e-4,
        use_connect_dots=True,
    ).self_compose(steps)
    independent = pld.get_epsilon_for_delta(1e-5)
    assert acc.epsilon_published() == pytest.approx(independent, rel=0.01)
    assert combined_noise_multiplier(z_l, z_g) == pytest.approx(1 / math.sqrt(z_l**-2 + z_g**-2))
    assert acc.epsilon_published() > max(acc.epsilon_local(), acc.epsilon_global())
    assert epsilon_for(z_l, q, steps, 1e-5) == pytest.approx(acc.epsilon_local())


def test_a_node_that_trusts_no_aggregator_adds_the_global_noise_to_its_own_reply(encoder, batch):
    """global-noise = "node": the reply is the clipped sum plus N(0, (z_G C_G)^2), over B, before it leaves. Same
    generator state: the two replies differ by exactly that noise (the batch is drawn before it)."""
    feats, labels = batch
    learner = PromptLearner(build_method("dpfpl", rank=2), encoder, 20.0)
    p_global = torch.randn(8, encoder.width, generator=torch.Generator().manual_seed(3)) * 0.02
    p_local = torch.randn(8, encoder.width, generator=torch.Generator().manual_seed(4)) * 0.02
    outs = []
    for at_node in (0.0, 4.0):
        outs.append(
            learner.train_step(
                p_global,
                {"p_local": p_local},
                {},
                feats,
                labels,
                EXPECTED_BATCH,
                DpSettings(True, 0.0, C_LOCAL, C_GLOBAL, noise_multiplier_global_at_node=at_node),
                SgdSettings(0.1),
                torch.Generator().manual_seed(21),
            )
        )
    assert outs[0].batch_size == outs[1].batch_size
    noise = outs[1].global_grad - outs[0].global_grad
    assert float(noise.std()) == pytest.approx(4.0 * C_GLOBAL / EXPECTED_BATCH, rel=0.1)
    assert abs(float(noise.mean())) < 4.0 * C_GLOBAL / EXPECTED_BATCH / 5
