import copy

import pytest
import torch
import torch.nn.functional as F

from dpfpl.common.methods import DpSettings, PromptLearner, SgdSettings, build_method, factorize, rgp_reconstruct
from dpfpl.common.privacy import clip_per_sample, per_sample_grads


def test_factorization_is_orthonormal_and_exact():
    gen = torch.Generator().manual_seed(0)
    p_local = torch.randn(16, 128, generator=gen)
    u, v, r = factorize(p_local, 8, gen)
    assert u.shape == (16, 8) and v.shape == (8, 128)
    assert torch.allclose(u.t() @ u, torch.eye(8), atol=1e-5)
    assert torch.allclose(v @ v.t(), torch.eye(8), atol=1e-5)
    assert torch.allclose(u @ v + r, p_local, atol=1e-5)


def test_factorization_rejects_too_large_rank():
    with pytest.raises(ValueError, match="rank"):
        factorize(torch.randn(4, 32), 8, torch.Generator().manual_seed(0))


def _loss_fn(encoder, feats, labels, scale=20.0):
    def fn(prompt):
        return F.cross_entropy(scale * feats @ encoder(prompt).t(), labels, reduction="none")

    return fn


def test_rgp_equals_projection_formula_of_autograd_gradient(encoder, batch):
    feats, labels = batch
    gen = torch.Generator().manual_seed(3)
    p_local = torch.randn(8, encoder.width, generator=gen) * 0.02
    u, v, r = factorize(p_local, 4, gen)
    prompt = (torch.randn(8, encoder.width, generator=gen) * 0.02 + p_local).requires_grad_(True)
    (g,) = torch.autograd.grad(_loss_fn(encoder, feats, labels)(prompt).mean(), prompt)
    rebuilt = rgp_reconstruct(g @ v.t(), u.t() @ g, u, v)
    p_u, p_v = u @ u.t(), v.t() @ v
    assert torch.allclose(rebuilt, p_u @ g + g @ p_v - p_u @ g @ p_v, atol=1e-6)
    # the minus sign matters: the official code's plus sign gives a different tensor
    assert not torch.allclose(rebuilt, p_u @ g + g @ p_v + p_u @ g @ p_v, atol=1e-6)


def test_train_step_without_dp_steps_p_local_by_the_rgp_gradient(encoder, batch):
    feats, labels = batch
    method = PromptLearner(build_method("dpfpl", rank=4), encoder, 20.0)
    gen = torch.Generator().manual_seed(5)
    p_global = torch.randn(8, encoder.width, generator=gen) * 0.02
    p_local = torch.randn(8, encoder.width, generator=gen) * 0.02
    replay = copy.deepcopy(gen)
    dp = DpSettings(False, 0.0, 10.0, 10.0)
    out = method.train_step(p_global, {"p_local": p_local}, {}, feats, labels, 6, dp, SgdSettings(0.5), gen)
    # replay the same Poisson sample and factorization
    idx = (torch.rand(len(feats), generator=replay) < 6 / len(feats)).nonzero().flatten()
    u, v, _ = factorize(p_local, 4, replay)
    prompt = (p_global + p_local).requires_grad_(True)
    (g,) = torch.autograd.grad(_loss_fn(encoder, feats[idx], labels[idx])(prompt).sum() / 6, prompt)
    p_u, p_v = u @ u.t(), v.t() @ v
    expected = p_local - 0.5 * (p_u @ g + g @ p_v - p_u @ g @ p_v)
    assert torch.allclose(out.local["p_local"], expected, atol=1e-5)
    assert torch.allclose(out.global_grad, g, atol=1e-5)


def test_per_sample_grads_match_a_per_example_loop_and_clip(encoder, batch):
    feats, labels = batch
    prompt = torch.randn(8, encoder.width, generator=torch.Generator().manual_seed(0))
    fn = _loss_fn(encoder, feats, labels)
    grads, losses = per_sample_grads(fn, prompt, chunk_size=5)  # chunks of 5, 5, 2
    assert grads.shape == (12, 8, encoder.width)
    for j in range(len(feats)):
        p = prompt.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(p)[j], p)
        assert torch.allclose(grads[j], g, atol=1e-5, rtol=1e-4)
    assert torch.allclose(losses, fn(prompt), atol=1e-6)
    clipped = clip_per_sample(grads * 100, 1.0)
    norms = clipped.flatten(1).norm(dim=1)
    assert (norms <= 1.0 + 1e-5).all() and (norms > 0.99).all()


def test_local_noise_std_is_z_times_clip_bound(encoder, batch):
    """With a zero learning-rate-free view: the noised factor gradients of a step on a batch whose gradient
    is negligible (logit scale 0: uniform logits, zero loss gradient) are pure noise of std z_L C_L / B."""
    feats, labels = batch
    learner = PromptLearner(build_method("dpfpl", rank=4), encoder, 0.0)
    gen = torch.Generator().manual_seed(0)
    p_local = torch.randn(8, encoder.width, generator=gen)
    out = learner.train_step(
        torch.zeros(8, encoder.width),
        {"p_local": p_local},
        {},
        feats,
        labels,
        32,
        DpSettings(True, 2.5, 3.0, 10.0),
        SgdSettings(0.1),
        gen,
    )
    samples = torch.cat([g.flatten() for g in out.local_grads])
    expected = 2.5 * 3.0 / 32
    assert abs(float(samples.std()) - expected) / expected < 0.05
    assert float(out.global_grad.abs().max()) < 1e-6  # no noise on what is sent: GDP is the server's job


def test_one_dpfpl_step_on_real_vit_b_16_architecture():
    """ViT-B-16 with random weights: the real model's compute and shapes, no download."""
    from dpfpl.common.models import load_clip
    from dpfpl.common.prompt import PromptTextEncoder

    model = load_clip("ViT-B-16", "none")
    enc = PromptTextEncoder(model.model, model.tokenizer, ["cat", "dog", "airplane"], n_ctx=16)
    assert enc.width == 512
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(4, 512, generator=gen), dim=-1)
    labels = torch.tensor([0, 1, 2, 0])
    method = PromptLearner(build_method("dpfpl", rank=8), enc, 100.0)
    p_g, p_l = enc.init_context("", gen), enc.init_context("", gen)
    out = method.train_step(
        p_g, {"p_local": p_l}, {}, feats, labels, 4, DpSettings(True, 1.0, 10.0, 10.0), SgdSettings(1e-3), gen
    )
    assert out.global_grad.shape == (16, 512) and torch.isfinite(out.global_grad).all()
    assert not torch.equal(out.local["p_local"], p_l)
    assert float(out.global_grad.norm()) <= 10.0 * out.batch_size / 4 + 1e-4
