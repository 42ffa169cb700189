"""The text tower run once on the prompt's shared prefix and once per class on the rest (exact).

Why: every class prompt starts with the same tokens ``[SOS] ctx_1 ... ctx_n`` (CoOp's unified context),
and the text transformer is causal, so the hidden states of those 1 + n_ctx positions are identical for
all C classes at every layer. Only the class-name positions (``CLASSNAME . [EOS]``, a few tokens) differ.
The plain tower computes the shared prefix C times; here it is computed once, its keys and values are
projected once and broadcast, and each class runs only its own suffix positions, which attend to the
shared prefix and causally to themselves. With n_ctx = 16 and short class names that is ~4x fewer tokens
in the forward pass and in every one of the B per-sample backward passes, with the same result up to float
rounding (``tests/test_prompt.py`` checks it against the full sequence).

Only OpenCLIP's standard ``ResidualAttentionBlock`` (pre-LN, ``nn.MultiheadAttention`` with packed
in-projection, optional LayerScale) is run this way; ``supports`` says whether a tower qualifies, and the
prompt encoder falls back to the full sequence otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _block_qualifies(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return (
        type(block).__name__ == "ResidualAttentionBlock"
        and not hasattr(block, "ln_1_kv")
        and isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
    )


def supports(transformer: nn.Module) -> bool:
    """True when every block of this text transformer can run with a shared prefix."""
    blocks = getattr(transformer, "resblocks", None)
    return (
        blocks is not None
        and len(blocks) > 0
        and getattr(transformer, "batch_first", False)
        and not getattr(transformer, "grad_checkpointing", False)
        and all(_block_qualifies(b) for b in blocks)
    )


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(..., L, d) -> (..., H, L, d/H)."""
    *lead, length, width = x.shape
    return x.reshape(*lead, length, n_head, width // n_head).transpose(-3, -2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(..., H, L, d/H) -> (..., L, d)."""
    *lead, heads, length, hd = x.shape
    return x.transpose(-3, -2).reshape(*lead, length, heads * hd)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention with an additive mask, as explicit matmuls (vmap-friendly for per-sample grads)."""
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1])) + mask
    return scores.softmax(dim=-1) @ v


def _block(
    block: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor, prefix_mask: torch.Tensor, suffix_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ResidualAttentionBlock on (prefix (P, d) shared, suffix (C, S, d) per class)."""
    attn: nn.MultiheadAttention = block.attn
    n_head, n_cls = attn.num_heads, suffix.shape[0]
    qp, kp, vp = F.linear(block.ln_1(prefix), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    qs, ks, vs = F.linear(block.ln_1(suffix), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    qp, kp, vp = _heads(qp, n_head), _heads(kp, n_head), _heads(vp, n_head)  # (H, P, hd)
    qs, ks, vs = _heads(qs, n_head), _heads(ks, n_head), _heads(vs, n_head)  # (C, H, S, hd)
    out_p = _attend(qp, kp, vp, prefix_mask)
    keys = torch.cat([kp.unsqueeze(0).expand(n_cls, -1, -1, -1), ks], dim=2)  # (C, H, P+S, hd)
    values = torch.cat([vp.unsqueeze(0).expand(n_cls, -1, -1, -1), vs], dim=2)
    out_s = _attend(qs, keys, values, suffix_mask)
    out_p = F.linear(_merge(out_p), attn.out_proj.weight, attn.out_proj.bias)
    out_s = F.linear(_merge(out_s), attn.out_proj.weight, attn.out_proj.bias)
    prefix = prefix + block.ls_1(out_p)
    suffix = suffix + block.ls_1(out_s)
    prefix = prefix + block.ls_2(block.mlp(block.ln_2(prefix)))
    suffix = suffix + block.ls_2(block.mlp(block.ln_2(suffix)))
    return prefix, suffix


def causal_masks(
    prefix_len: int, suffix_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks: prefix (P, P) causal; suffix (S, P+S): all of the prefix, causal within the suffix."""
    total = prefix_len + suffix_len
    allowed = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(total, total, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    return mask[:prefix_len, :prefix_len], mask[prefix_len:, :]


def run_shared_prefix(
    transformer: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Hidden states of the suffix positions (C, S, d) after the whole transformer; ``prefix`` (P, d) is the
    input shared by every class (positional embedding already added), ``suffix`` (C, S, d) the rest."""
    for block in transformer.resblocks:
        prefix, suffix = _block(block, prefix, suffix, *masks)
    return suffix
