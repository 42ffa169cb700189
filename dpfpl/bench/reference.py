"""The naive reference step of DP-FPL, kept only to measure the fast path against.

Same algorithm as ``dpfpl.common.methods.engine.PromptLearner.train_step`` for ``dpfpl`` (factorize p_L, forward
with p_G + U v + r, per-sample gradients, per-sample clipping of g_j and jointly of (gU_j, gv_j), Gaussian
noise on the local factors' sum, RGP, SGD), written the way a first implementation would be:

* the image tower runs on every minibatch (no feature cache);
* the text tower runs on the full context length (77 tokens for OpenCLIP), no truncation after the EOT,
  no shared prefix;
* per-sample gradients by a Python loop: a forward and a backward per sample (micro-batches of one).

It draws its randomness in the same order as the engine (Poisson sample, factorization start, noise on gU,
noise on gv), so with the same generator seed both produce the same update: ``tests/test_bench_reference.py``
checks that the fast step computes exactly this (up to float rounding).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from dpfpl.common.methods import SgdSettings, rgp_reconstruct
from dpfpl.common.methods.dpfpl import factorize
from dpfpl.common.methods.local import sgd_step
from dpfpl.common.privacy import add_gaussian_noise, clip_per_sample, clip_per_sample_jointly, poisson_sample
from dpfpl.common.prompt import CONTEXT_PLACEHOLDER, TextTower


class FullContextEncoder:
    """Class prompts over the model's whole context (77 tokens), context spliced into the embeddings."""

    def __init__(self, model, tokenizer, classnames: list[str], n_ctx: int) -> None:
        self.tower = TextTower.of(model)
        self.n_ctx = n_ctx
        placeholder = " ".join([CONTEXT_PLACEHOLDER] * n_ctx)
        self.tokens = tokenizer([f"{placeholder} {c.replace('_', ' ')}." for c in classnames])
        self.eot = self.tokens.argmax(dim=-1)

    def to(self, device: torch.device) -> FullContextEncoder:
        self.tokens, self.eot = self.tokens.to(device), self.eot.to(device)
        return self

    def __call__(self, ctx: torch.Tensor) -> torch.Tensor:
        x = self.tower.token_embedding(self.tokens)  # every call, as a first implementation would
        x = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1 + self.n_ctx :]], dim=1)
        return F.normalize(self.tower.encode_embeddings(x, self.eot), dim=-1)


def naive_dpfpl_step(
    model,
    encoder: FullContextEncoder,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    expected_batch: int,
    p_global: torch.Tensor,
    p_local: torch.Tensor,
    rank: int,
    noise_multiplier: float,
    clip_global: float,
    clip_local: float,
    lr: float,
    generator: torch.Generator,
    logit_scale: float,
    samples_timed: int | None = None,
) -> dict:
    """One DP-FPL step on a Poisson sample (rate ``expected_batch / N``) of the N given images.

    With ``samples_timed`` = k < B, the per-sample loop runs on k samples only and its time is extrapolated
    linearly to B (each iteration does identical work: one forward and one backward of the same size); the
    returned dict says so, and its gradients are then those of the k samples only (timing use only).
    """
    idx = poisson_sample(len(labels), min(1.0, expected_batch / len(labels)), generator).to(labels.device)
    labels = labels[idx]
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = F.normalize(model.encode_image(pixels[idx]), dim=-1)  # image tower on every minibatch
    t_image = time.perf_counter() - t0
    batch = len(idx)
    u, v, r = factorize(p_local, rank, generator)
    prompt = (p_global + u @ v + r).detach()
    k = batch if samples_timed is None else min(batch, samples_timed)
    t1 = time.perf_counter()
    grads = []
    for j in range(k):
        p = prompt.clone().requires_grad_(True)
        logits = logit_scale * feats[j : j + 1] @ encoder(p).t()
        (g,) = torch.autograd.grad(F.cross_entropy(logits, labels[j : j + 1]), p)
        grads.append(g)
    t_loop = time.perf_counter() - t1
    t2 = time.perf_counter()
    g = torch.stack(grads)
    global_grad = clip_per_sample(g, clip_global).sum(0) / expected_batch
    clipped = clip_per_sample_jointly([g @ v.t(), u.t() @ g], clip_local)
    g_u, g_v = (
        add_gaussian_noise(c.sum(0), noise_multiplier * clip_local, generator) / expected_batch for c in clipped
    )
    new_local, _ = sgd_step({"p_local": p_local}, {"p_local": rgp_reconstruct(g_u, g_v, u, v)}, {}, SgdSettings(lr))
    t_rest = time.perf_counter() - t2
    loop_total = t_loop * batch / max(k, 1)
    return {
        "seconds": t_image + loop_total + t_rest,
        "image_tower_seconds": t_image,
        "per_sample_loop_seconds": loop_total,
        "samples_timed": k,
        "batch": batch,
        "extrapolated": k < batch,
        "global_grad": global_grad,
        "local_grads": [g_u, g_v],
        "p_local": new_local["p_local"],
    }
