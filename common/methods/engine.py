"""One training engine for every method; a method is a few named pieces:

- ``shares_global``: is there a global prompt p_G whose clipped gradient goes to the server (GDP there)?
- ``local``: the node's private part (``LocalPrompt``) and so where LDP noise goes, or ``None``;
- ``contrastive``: an extra data-independent loss term (FedPGP).

One step on a Poisson minibatch:
 1. the local part prepares this step (DP-FPL: factorize p_L) and yields its context;
 2. forward with p = p_G + local context; per-sample gradients g_j = d loss_j / dp, one batched backward;
 3. global: clip g_j (+ the contrastive term) to C_G, sum, divide by the expected batch B -> the reply;
 4. local: the parameters' per-sample gradients (linear in g_j), clipped jointly to C_L, summed, plus
    N(0, (z_L C_L)^2) per coordinate, divided by B -> the local update (never sent).
Without DP the same step runs with one ordinary backward, no clipping and no noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..privacy import add_gaussian_noise, clip_per_sample, clip_per_sample_jointly, per_sample_grads, poisson_sample
from ..prompt import CONTEXT_INIT_STD, PromptTextEncoder
from .contrastive import ContrastiveLoss
from .local import LocalPrompt, SgdSettings, Tensors

MEMORY_FRACTION = 0.25  # of the memory available at the step, for the per-sample backward's working set


def available_memory() -> int:
    """Bytes of RAM available to a new allocation without swapping (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_chunk_size(encoder: PromptTextEncoder, batch: int, device: torch.device) -> int:
    """How many per-sample cotangents one vectorized backward may carry, from the memory available now.

    Each cotangent in flight holds its own gradients of the activations of one block (tokens x width, the
    MLP's hidden layer, the attention scores); ``encoder.backward_bytes_per_sample`` estimates them with a
    safety factor (measured: ViT-B-16, C = 100, shared prefix: ~9 MiB per cotangent against an estimate of
    ~28 MiB). A quarter of what is available (MemAvailable on CPU, ``mem_get_info`` on CUDA) is used, so
    other processes on the machine keep theirs; at least 1.
    """
    available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    per_sample = max(1, encoder.backward_bytes_per_sample())
    return max(1, min(max(batch, 1), int(MEMORY_FRACTION * available // per_sample)))


class CanaryRecords(Protocol):
    """A privacy audit's canaries (``dpfpl.audit.canaries``): the per-sample prompt gradients of the canary
    records in this step's Poisson sample, shaped like ``g`` (k, n_ctx, d); it also sees the local part's step
    context, so that it can tell where each canary's clipped local contribution goes."""

    def records(self, g: torch.Tensor, aux: Any, local: Tensors) -> torch.Tensor: ...


@dataclass(frozen=True)
class DpSettings:
    enabled: bool
    noise_multiplier_local: float
    max_grad_norm_local: float
    max_grad_norm_global: float
    secure_noise: bool = False  # every noise bit from the OS CSPRNG (``dpfpl.common.privacy.standard_normal``)
    # z_G the node adds to its own clipped global sum before it leaves (node config ``global-noise = "node"``):
    # the release is then the charged Gaussian mechanism whoever receives it; 0: the aggregator adds the noise
    noise_multiplier_global_at_node: float = 0.0


@dataclass(frozen=True)
class Method:
    name: str
    shares_global: bool
    local: LocalPrompt | None = None
    contrastive: ContrastiveLoss | None = None

    @property
    def trains(self) -> bool:
        return self.shares_global or self.local is not None


@dataclass
class StepResult:
    global_grad: torch.Tensor | None  # sum_j clip(g_j) / B, the only tensor that leaves the node; None: nothing
    local: Tensors
    momentum: Tensors
    loss: float
    batch_size: int
    local_grads: list[torch.Tensor] = field(default_factory=list)  # noised averages (tests inspect them)


class PromptLearner:
    """Runs a method's step and builds its personalized prompt, for one node's text encoder."""

    def __init__(
        self, method: Method, encoder: PromptTextEncoder, logit_scale: float, chunk_size: int | None = None
    ) -> None:
        self.method = method
        self.encoder = encoder
        self.logit_scale = logit_scale
        self.chunk_size = chunk_size  # None: sized per step to the memory available (memory_chunk_size)
        self._handcrafted: torch.Tensor | None = None

    def init_local(
        self, generator: torch.Generator, std: float = CONTEXT_INIT_STD, text_context: torch.Tensor | None = None
    ) -> Tensors:
        """The node's fresh local part. A method whose whole prompt is local (CoOp) starts it at
        ``text_context`` (the ``ctx-init`` text's embeddings) when given; otherwise the local part is drawn
        at scale ``std`` and added to p_G (which carries the text init)."""
        if self.method.local is None:
            return {}
        local = self.method.local.init(self.encoder.n_ctx, self.encoder.width, generator, std)
        if text_context is not None and not self.method.shares_global and "p_local" in local:
            local["p_local"] = text_context.to(local["p_local"].dtype).clone()
        return local

    def noised_size(self) -> int:
        """Coordinates of one local DP release (0: the method has no local part)."""
        local = self.method.local
        return 0 if local is None else local.noised_size(self.encoder.n_ctx, self.encoder.width)

    def _compose(self, p_global: torch.Tensor | None, local_context: torch.Tensor | None) -> torch.Tensor:
        parts = [p for p in ((p_global if self.method.shares_global else None), local_context) if p is not None]
        if not parts:
            raise ValueError(f"method '{self.method.name}' has no learnable prompt")
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def personalized_prompt(
        self, p_global: torch.Tensor | None, local: Tensors, local_context: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The node's prompt at evaluation/export time; ``None`` for zero-shot (hand-crafted prompts).
        ``local_context``: the local part as a context already (the published mean of p_L's iterates)."""
        if not self.method.trains:
            return None
        if local_context is None and self.method.local is not None and local:
            local_context = self.method.local.eval_context(local)
        return self._compose(p_global, local_context)

    def text_features(
        self,
        p_global: torch.Tensor | None,
        local: Tensors,
        encoder: PromptTextEncoder | None = None,
        local_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text features of the personalized prompt for the training classes, or for another class list
        (``encoder``: e.g. the novel classes of a base-to-novel evaluation; same context, other names)."""
        encoder = encoder or self.encoder
        prompt = self.personalized_prompt(p_global, local, local_context)
        return encoder.handcrafted_features() if prompt is None else encoder(prompt)

    def _loss_fn(self, features: torch.Tensor, labels: torch.Tensor):
        def fn(prompt: torch.Tensor) -> torch.Tensor:
            logits = self.logit_scale * features @ self.encoder(prompt).t()
            return F.cross_entropy(logits, labels, reduction="none")

        return fn

    def _regularizer(self, p_global: torch.Tensor | None, prompt: torch.Tensor):
        """(extra gradient for p_G's reply, extra gradient for the local context), per sample; zeros if none."""
        zero = torch.zeros_like(prompt)
        if self.method.contrastive is None or p_global is None:
            return zero, zero
        if self._handcrafted is None:
            with torch.no_grad():
                self._handcrafted = self.encoder.handcrafted_features()
        via_global, via_prompt = self.method.contrastive.gradients(self.encoder, p_global, prompt, self._handcrafted)
        return via_global + via_prompt, via_prompt

    def train_step(
        self,
        p_global: torch.Tensor | None,
        local: Tensors,
        momentum: Tensors,
        features: torch.Tensor,
        labels: torch.Tensor,
        expected_batch: int,
        dp: DpSettings,
        opt: SgdSettings,
        generator: torch.Generator,
        sample_rate: float | None = None,
        canaries: CanaryRecords | None = None,
    ) -> StepResult:
        """One step. ``sample_rate``: the Poisson rate q, public by declaration in a node (default B / n, for
        experiments that treat the size as public); sums are divided by ``expected_batch`` B either way, a
        public constant, so one record moves a release by at most C / B. ``canaries``: a privacy audit's extra
        records (``dpfpl.audit.canaries``), joined to the batch's per-sample gradients before clipping; ``None``
        (every run but an audit) leaves the step exactly as it is."""
        method = self.method
        if not method.trains:
            raise ValueError(f"method '{method.name}' does not train")
        if method.shares_global and p_global is None:
            raise ValueError(f"method '{method.name}' needs the global prompt")
        n = len(labels)
        q = min(1.0, expected_batch / n) if sample_rate is None else sample_rate
        idx = poisson_sample(n, q, generator).to(labels.device)
        if features.dim() == 3:  # (views, N, D): one augmented view per sampled record, drawn by the node
            view = torch.randint(features.shape[0], (len(idx),), generator=generator).to(labels.device)
            feats = features[view, idx]
        else:
            feats = features[idx]
        labs = labels[idx]
        aux = method.local.prepare(local, generator) if method.local is not None else None
        local_ctx = method.local.context(local, aux) if method.local is not None else None
        prompt = self._compose(p_global, local_ctx).detach()
        extra_global, extra_local = self._regularizer(p_global, prompt)
        loss_fn = self._loss_fn(feats, labs)
        b = len(idx)

        if dp.enabled:
            chunk = self.chunk_size or memory_chunk_size(self.encoder, b, prompt.device)
            g, losses = per_sample_grads(loss_fn, prompt, chunk)  # (b, n_ctx, d)
            if canaries is not None:  # an audit: its canary records go through the same clip, sum and noise
                g = torch.cat([g, canaries.records(g, aux, local)])
            global_sum = (
                clip_per_sample(g + extra_global, dp.max_grad_norm_global).sum(0) if method.shares_global else None
            )
            if global_sum is not None and dp.noise_multiplier_global_at_node > 0:
                global_std = dp.noise_multiplier_global_at_node * dp.max_grad_norm_global
                global_sum = add_gaussian_noise(global_sum, global_std, generator, dp.secure_noise)
            local_sums = []
            if method.local is not None:
                per_sample = method.local.param_grads(g + extra_local, aux, local)
                noise_std = dp.noise_multiplier_local * dp.max_grad_norm_local
                local_sums = [
                    add_gaussian_noise(c.sum(0), noise_std, generator, dp.secure_noise)
                    for c in clip_per_sample_jointly(per_sample, dp.max_grad_norm_local)
                ]
        else:
            leaf = prompt.requires_grad_(True)
            losses = loss_fn(leaf)
            (g_sum,) = torch.autograd.grad(losses.sum(), leaf) if b else (torch.zeros_like(prompt),)
            losses = losses.detach()
            global_sum = g_sum + b * extra_global if method.shares_global else None
            local_sums = (
                method.local.param_grads(g_sum + b * extra_local, aux, local) if method.local is not None else []
            )
        # Divide by the *expected* batch size: with Poisson sampling the actual size is data-dependent and
        # dividing by it would break the sensitivity bound.
        global_grad = None if global_sum is None else (global_sum / expected_batch).detach()
        local_grads = [s / expected_batch for s in local_sums]
        new_local, new_momentum = (
            method.local.apply(local, local_grads, aux, momentum, opt)
            if method.local is not None
            else (local, momentum)
        )
        loss = float(losses.mean()) if b else float("nan")
        return StepResult(global_grad, new_local, new_momentum, loss, b, local_grads)
