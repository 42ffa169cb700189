"""The fast DP-FPL step computes the same update as the naive reference step kept in ``dpfpl/bench/``.

The benchmark's speed-up is only meaningful if both compute the same thing: the fast path (cached image
features, sequences truncated after the EOT, the shared [SOS]+ctx prefix run once, batched per-sample
gradients in memory-sized chunks) against the reference (image tower on the minibatch, the full context
length, a Python loop of per-sample forward/backward passes). Same seed, same randomness order: the
released gradient, the noisy local factor gradients and the new p_L must agree up to float rounding.
"""

import pytest
import torch
import torch.nn.functional as F

from dpfpl.bench.reference import FullContextEncoder, naive_dpfpl_step
from dpfpl.common.methods import DpSettings, PromptLearner, SgdSettings, build_method
from dpfpl.common.prompt import PromptTextEncoder, random_context

torch.set_num_threads(1)

N_CTX, RANK, N, BATCH = 8, 2, 10, 6
NAMES = ["cat", "sea lion", "golden retriever", "fire truck", "tabby cat"]


@pytest.fixture(scope="module")
def setting(tiny_model):
    model = tiny_model.model.eval()
    gen = torch.Generator().manual_seed(3)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    pixels = torch.randn(N, 3, size, size, generator=gen)
    labels = torch.randint(0, len(NAMES), (N,), generator=gen)
    width = model.token_embedding.weight.shape[1]
    p_global = random_context(N_CTX, width, gen) * 5  # larger than init, so gradients are not tiny
    p_local = random_context(N_CTX, width, gen) * 5
    scale = float(model.logit_scale.exp())
    return model, pixels, labels, p_global, p_local, scale


def _fast(model, tokenizer, pixels, labels, p_global, p_local, scale, clip, noise, share_prefix, chunk):
    enc = PromptTextEncoder(model, tokenizer, NAMES, N_CTX, share_prefix=share_prefix)
    learner = PromptLearner(build_method("dpfpl", rank=RANK), enc, scale, chunk_size=chunk)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(pixels), dim=-1)  # the node's cache: once per image
    return enc, learner.train_step(
        p_global,
        {"p_local": p_local},
        {},
        feats,
        labels,
        BATCH,
        DpSettings(True, noise, clip, clip),
        SgdSettings(0.5),
        torch.Generator().manual_seed(11),
    )


@pytest.mark.parametrize("share_prefix,chunk", [(True, None), (True, 4), (False, 3)])
def test_fast_step_equals_naive_reference(tiny_model, setting, share_prefix, chunk):
    model, pixels, labels, p_global, p_local, scale = setting
    naive = naive_dpfpl_step(
        model,
        FullContextEncoder(model, tiny_model.tokenizer, NAMES, N_CTX),
        pixels,
        labels,
        BATCH,
        p_global,
        p_local,
        RANK,
        0.7,
        0.05,
        0.05,
        0.5,
        torch.Generator().manual_seed(11),
        scale,
    )
    enc, fast = _fast(
        model, tiny_model.tokenizer, pixels, labels, p_global, p_local, scale, 0.05, 0.7, share_prefix, chunk
    )
    assert enc.share_prefix == share_prefix  # the path under test is the one that ran
    assert enc.sequence_length < naive_context_length(tiny_model)  # truncated after the last EOT
    assert fast.batch_size == naive["batch"] > 0
    torch.testing.assert_close(fast.global_grad, naive["global_grad"], rtol=1e-4, atol=1e-6)
    for a, b in zip(fast.local_grads, naive["local_grads"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.local["p_local"], naive["p_local"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(fast.local["p_local"], p_local)  # the step did move p_L


def naive_context_length(tiny_model) -> int:
    return int(tiny_model.tokenizer(["x"]).shape[1])


def test_reference_detects_a_different_step(tiny_model, setting):
    """The comparison above can fail: another seed (other sample, factorization and noise) differs."""
    model, pixels, labels, p_global, p_local, scale = setting
    naive = naive_dpfpl_step(
        model,
        FullContextEncoder(model, tiny_model.tokenizer, NAMES, N_CTX),
        pixels,
        labels,
        BATCH,
        p_global,
        p_local,
        RANK,
        0.7,
        0.05,
        0.05,
        0.5,
        torch.Generator().manual_seed(12),
        scale,
    )
    _, fast = _fast(model, tiny_model.tokenizer, pixels, labels, p_global, p_local, scale, 0.05, 0.7, True, None)
    assert not torch.allclose(fast.local["p_local"], naive["p_local"], rtol=1e-4, atol=1e-6)
    # and the clip of 0.05 used above binds: without it the released gradient is another one
    unclipped = naive_dpfpl_step(
        model,
        FullContextEncoder(model, tiny_model.tokenizer, NAMES, N_CTX),
        pixels,
        labels,
        BATCH,
        p_global,
        p_local,
        RANK,
        0.0,
        1e6,
        1e6,
        0.5,
        torch.Generator().manual_seed(11),
        scale,
    )
    assert not torch.allclose(unclipped["global_grad"], fast.global_grad, rtol=1e-2, atol=0)


def test_shared_prefix_encoder_equals_full_sequence(tiny_model):
    """The [SOS]+ctx prefix run once for all classes gives the features of the full causal sequence."""
    model = tiny_model.model
    ctx = random_context(N_CTX, model.token_embedding.weight.shape[1], torch.Generator().manual_seed(5)) * 5
    shared = PromptTextEncoder(model, tiny_model.tokenizer, NAMES, N_CTX)
    full = PromptTextEncoder(model, tiny_model.tokenizer, NAMES, N_CTX, share_prefix=False)
    reference = FullContextEncoder(model, tiny_model.tokenizer, NAMES, N_CTX)
    assert shared.share_prefix and not full.share_prefix
    with torch.no_grad():
        torch.testing.assert_close(shared(ctx), full(ctx), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shared(ctx), reference(ctx), rtol=1e-4, atol=1e-5)
