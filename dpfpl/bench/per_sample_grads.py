"""Benchmark: how to compute per-sample gradients of the prompt through the text tower.

Prints, for one model / C / B, seconds per call of
  plain     one non-private forward + backward (the batch's mean gradient),
  batched   dpfpl's choice: one forward, B cotangents in one vectorized backward (is_grads_batched),
  copies    an explicit per-sample copy of the context through one (B*C)-sequence forward/backward,
  loop      B separate forward/backward passes (the naive reference),
and the (1 + 2B)/3 bound: B backward passes (~2 forward-equivalents each) plus one forward, over the
3 forward-equivalents of the plain step.

    python dpfpl/bench/per_sample_grads.py --model dpfpl-demo-tiny --classes 20 --batch 32
    python dpfpl/bench/per_sample_grads.py --model ViT-B-16 --classes 20 --batch 8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dpfpl.common.models import DEMO_MODEL, load_clip
from dpfpl.common.privacy import per_sample_grads
from dpfpl.common.prompt import PromptTextEncoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_clip(args.model, "none")
    enc = PromptTextEncoder(model.model, model.tokenizer, [f"class {i}" for i in range(args.classes)], 16)
    dim = model.model.text_projection.shape[1]
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(args.batch, dim, generator=gen), dim=-1)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    ctx = enc.init_context("", gen)

    def losses(p):
        return F.cross_entropy(50 * feats @ enc(p).t(), labels, reduction="none")

    def plain():
        p = ctx.clone().requires_grad_(True)
        return torch.autograd.grad(losses(p).mean(), p)[0]

    def batched():
        return per_sample_grads(losses, ctx)[0]

    def copies():
        n, b = args.classes, args.batch
        cb = ctx.unsqueeze(0).repeat(b, 1, 1).requires_grad_(True)
        x = torch.cat(
            [
                enc.prefix.unsqueeze(0).expand(b, -1, -1, -1),
                cb.unsqueeze(1).expand(-1, n, -1, -1),
                enc.suffix.unsqueeze(0).expand(b, -1, -1, -1),
            ],
            2,
        ).reshape(b * n, -1, enc.width)
        text = F.normalize(enc.tower.encode_embeddings(x, enc.eot_index.repeat(b)), dim=-1).reshape(b, n, -1)
        F.cross_entropy(50 * torch.einsum("bd,bcd->bc", feats, text), labels, reduction="sum").backward()
        return cb.grad

    def loop():
        out = []
        for j in range(args.batch):
            p = ctx.clone().requires_grad_(True)
            out.append(torch.autograd.grad(losses(p)[j], p)[0])
        return torch.stack(out)

    print(
        f"model {args.model}, C={args.classes}, B={args.batch}, threads={args.threads}, "
        f"sequence length {enc.sequence_length} (of {model.model.context_length})"
    )
    times = {}
    for fn in (plain, batched, copies, loop):
        fn()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        times[fn.__name__] = (time.perf_counter() - start) / args.repeats
    bound = (1 + 2 * args.batch) / 3
    for name, t in times.items():
        print(f"{name:>8}: {t:8.4f} s   x{t / times['plain']:6.1f} of plain")
    print(f"   bound: x{bound:6.1f} of plain  ((1 + 2B)/3)")
    assert torch.allclose(batched(), loop(), atol=1e-4, rtol=1e-3), "batched per-sample grads differ from loop"


if __name__ == "__main__":
    main()
