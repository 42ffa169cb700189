"""CoOp-style prompt learning on OpenCLIP's text tower.

The text prompt of class c is ``[SOS] ctx_1 ... ctx_n CLASSNAME . [EOS]``: one learnable context shared by
all classes, class token at the end (CoOp's "end" position, as in DP-FPL). Only the context is learned; the
rest of the tower is frozen.

Why truncate: the text transformer is causal and the feature is read at the EOT token, so positions after
the last EOT of the batch of class prompts cannot change any output. Dropping them makes every forward and
backward pass proportionally cheaper (77 -> ~25 tokens for short class names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import prefix_sharing
from .models import cached_clip, register_model_configs

if TYPE_CHECKING:
    from .config import RunConfig

CONTEXT_PLACEHOLDER = "X"
HANDCRAFTED_TEMPLATE = "a photo of a {}."


@dataclass
class TextTower:
    """The parts of an OpenCLIP text transformer that a prompt learner needs (works for ``CLIP`` and
    ``CustomTextCLIP`` with OpenCLIP's own ``TextTransformer``)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Module | None
    attn_mask: torch.Tensor | None

    @classmethod
    def of(cls, model: nn.Module) -> TextTower:
        owner = model.text if hasattr(model, "text") else model
        if not hasattr(owner, "token_embedding") or not hasattr(owner, "transformer"):
            raise TypeError(
                f"{type(model).__name__} has no OpenCLIP text transformer (token_embedding + transformer); "
                "prompt learning needs a model with OpenCLIP's own text tower (e.g. ViT-B-16, RN50)."
            )
        pool = getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax"))
        if pool != "argmax":
            raise TypeError(f"text pooling '{pool}' is not supported; only EOT (argmax) pooling is")
        return cls(
            token_embedding=owner.token_embedding,
            positional_embedding=owner.positional_embedding,
            transformer=owner.transformer,
            ln_final=owner.ln_final,
            text_projection=owner.text_projection,
            attn_mask=owner.attn_mask,
        )

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    def encode_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Run the tower on token embeddings ``x`` (S, L, width), read the feature at each EOT."""
        length = x.shape[1]
        x = x + self.positional_embedding[:length]
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        return self.project(x[torch.arange(x.shape[0], device=x.device), eot_index])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The text projection applied to EOT features (after ``ln_final``)."""
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Module):
            return self.text_projection(x)
        return x @ self.text_projection


class PromptTextEncoder(nn.Module):
    """Maps a learnable context (n_ctx, width) to normalized text features (C, D) for all C classes.

    Token ids, the frozen prefix (SOS) and suffix (class name, '.', EOS) embeddings are computed once at
    construction, never per step. With ``share_prefix`` (default, where the tower supports it) the positions
    ``[SOS] ctx`` common to all classes run once instead of C times (``prefix_sharing``: exact, causal mask).
    """

    def __init__(
        self, model: nn.Module, tokenizer, classnames: list[str], n_ctx: int, share_prefix: bool = True
    ) -> None:
        super().__init__()
        if not classnames:
            raise ValueError("the class-name list is empty")
        self.tower = TextTower.of(model)
        self.n_ctx = n_ctx
        self.classnames = list(classnames)
        placeholder = " ".join([CONTEXT_PLACEHOLDER] * n_ctx)
        tokens = tokenizer([f"{placeholder} {name.replace('_', ' ')}." for name in classnames])
        eot = tokens.argmax(dim=-1)
        context_length = tokens.shape[1]
        if int(eot.max()) >= context_length - 1:
            raise ValueError(
                f"a class prompt with n_ctx={n_ctx} does not fit the model's context length "
                f"{context_length}; shorten the class names or use a smaller n_ctx"
            )
        length = int(eot.max()) + 1  # truncate after the last EOT: later positions change nothing
        tokens = tokens[:, :length]
        with torch.no_grad():
            embedding = self.tower.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot_index", eot, persistent=False)
        self.register_buffer("prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)
        self._tokenizer = tokenizer
        self.share_prefix = share_prefix and self._causal() and prefix_sharing.supports(self.tower.transformer)

    def _causal(self) -> bool:
        """The shared prefix is exact only under a causal mask (the EOT-pooled CLIP text towers have one)."""
        mask = self.tower.attn_mask
        if mask is None:
            return False
        length = self.sequence_length
        expected = torch.full((length, length), float("-inf")).triu(1)
        return bool(torch.equal(mask[:length, :length].float().cpu(), expected))

    @property
    def width(self) -> int:
        return self.tower.width

    @property
    def sequence_length(self) -> int:
        return int(self.tokens.shape[1])

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx: (n_ctx, width) -> normalized text features (C, D)."""
        if self.share_prefix:
            return self._forward_shared(ctx)
        n_cls = self.prefix.shape[0]
        ctx = ctx.to(self.prefix.dtype).unsqueeze(0).expand(n_cls, -1, -1)
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1)
        return F.normalize(self.tower.encode_embeddings(x, self.eot_index), dim=-1)

    def backward_bytes_per_sample(self) -> int:
        """Estimated bytes one per-sample cotangent needs during the vectorized backward (see
        ``methods.engine.memory_chunk_size``): the gradients of one block's activations (the residual stream
        and attention output, the MLP's hidden layer) for every position the forward runs per class, the
        broadcast prefix keys and values, and the attention scores. Measured on ViT-B-16 at C = 100 with the
        shared prefix: ~9 MiB per cotangent, against ~20 MiB estimated here."""
        n_cls, length, n_prefix = self.prefix.shape[0], self.sequence_length, 1 + self.n_ctx
        block = self.tower.transformer.resblocks[0]
        heads = block.attn.num_heads if hasattr(block, "attn") else 8
        hidden = block.mlp.c_fc.out_features if hasattr(block, "mlp") else 4 * self.width
        if self.share_prefix:
            positions = n_prefix + n_cls * (length - n_prefix)
            scores = heads * (n_prefix * n_prefix + n_cls * (length - n_prefix) * length)
            broadcast = 2 * n_cls * n_prefix * self.width
        else:
            positions, scores, broadcast = n_cls * length, heads * n_cls * length * length, 0
        return 4 * (positions * (2 * self.width + hidden) + broadcast + 3 * scores)

    def _forward_shared(self, ctx: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        n_prefix, length = 1 + self.n_ctx, self.sequence_length
        pos = tower.positional_embedding[:length]
        prefix = torch.cat([self.prefix[0], ctx.to(self.prefix.dtype)], dim=0) + pos[:n_prefix]  # (P, d), once
        suffix = self.suffix + pos[n_prefix:]  # (C, S, d)
        masks = getattr(self, "_masks", None)
        if masks is None or masks[0].device != suffix.device or masks[0].dtype != suffix.dtype:
            masks = self._masks = prefix_sharing.causal_masks(n_prefix, length - n_prefix, suffix.dtype, suffix.device)
        hidden = tower.ln_final(prefix_sharing.run_shared_prefix(tower.transformer, prefix, suffix, masks))
        eot = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.eot_index - n_prefix]
        return F.normalize(tower.project(eot), dim=-1)

    @torch.no_grad()
    def handcrafted_features(self, template: str = HANDCRAFTED_TEMPLATE) -> torch.Tensor:
        """Zero-shot text features of ``template.format(classname)`` for every class (normalized)."""
        tokens = self._tokenizer([template.format(c.replace("_", " ")) for c in self.classnames])
        tokens = tokens.to(self.prefix.device)
        eot = tokens.argmax(dim=-1)
        tokens = tokens[:, : int(eot.max()) + 1]
        x = self.tower.token_embedding(tokens)
        return F.normalize(self.tower.encode_embeddings(x, eot), dim=-1)

    def init_context(self, init_text: str, generator: torch.Generator | None = None) -> torch.Tensor:
        return _init_context(self.tower.token_embedding, self._tokenizer, self.n_ctx, init_text, generator)

    @torch.no_grad()
    def reference_context_norm(self) -> float:
        """The norm of a typical n_ctx-token context: sqrt(n_ctx) x the RMS norm of the token embeddings.
        A public scale (the frozen model's own) against which prompt perturbations are measured."""
        cached = getattr(self, "_reference_norm", None)
        if cached is None:  # the frozen embeddings never change: computed once per encoder
            cached = self._reference_norm = reference_context_norm(self.tower.token_embedding, self.n_ctx)
        return cached


@torch.no_grad()
def reference_context_norm(token_embedding: nn.Embedding, n_ctx: int) -> float:
    """sqrt(n_ctx) x the RMS norm of the frozen token embeddings: the norm of a typical n_ctx-token context,
    a public scale for the noise-bounded steps of the nodes (p_L) and of the server (p_G)."""
    rows = token_embedding.weight.float().pow(2).sum(1).mean().sqrt()
    return float(rows) * n_ctx**0.5


CONTEXT_INIT_STD = 0.02  # CoOp / DP-FPL / FedPGP: learnable prompt tensors start at N(0, 0.02^2)


def random_context(
    rows: int, width: int, generator: torch.Generator | None = None, std: float = CONTEXT_INIT_STD
) -> torch.Tensor:
    """A (rows, width) tensor drawn from N(0, std^2): the random init of a learnable prompt tensor."""
    return torch.randn(rows, width, generator=generator) * std


@torch.no_grad()
def _init_context(
    token_embedding: nn.Embedding, tokenizer, n_ctx: int, init_text: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Context initialization: random N(0, 0.02^2) (CoOp/DP-FPL default) or the embedding of a text.

    An init text shorter than n_ctx fills the first positions; the rest stay random.
    """
    width = token_embedding.weight.shape[1]
    ctx = random_context(n_ctx, width, generator)
    if init_text:
        ids = tokenizer([init_text])[0]
        ids = ids[1 : int(ids.argmax())]  # drop SOS ... EOT
        if len(ids) > n_ctx:
            raise ValueError(f"ctx-init '{init_text}' has {len(ids)} tokens, more than n_ctx={n_ctx}")
        ctx[: len(ids)] = token_embedding(ids.to(token_embedding.weight.device)).cpu()
    return ctx.to(token_embedding.weight.dtype)


def context_from_text(model, n_ctx: int, init_text: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``model`` is a ``LoadedModel``; used by the server to initialize the global prompt."""
    return _init_context(TextTower.of(model.model).token_embedding, model.tokenizer, n_ctx, init_text, generator)


def initial_global_prompt(cfg: RunConfig) -> torch.Tensor:
    """The run's first global prompt, public (every party derives it from the run seed): a random N(0, 0.02^2) context (width from the model config, no weights needed on the server), or the
    token embeddings of ``ctx-init`` (then the server loads the frozen model once)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.ctx_init:
        return context_from_text(cached_clip(cfg.model_name, cfg.pretrained, None), cfg.n_ctx, cfg.ctx_init, gen)
    register_model_configs()
    model_cfg = open_clip.get_model_config(cfg.model_name)
    if model_cfg is None:
        raise ValueError(f"unknown OpenCLIP model '{cfg.model_name}'")
    width = model_cfg["text_cfg"]["width"]
    return random_context(cfg.n_ctx, width, gen)
