"""Cost of the secure noise mode (``secure-noise = true``) against the default, per noise release.

Why measure it: secure mode takes every bit of its noise from the OS CSPRNG (``os.urandom``, no seeded stream) and
sums four float64 Box-Muller draws (the floating-point defence of ``dpfpl.common.privacy.mechanisms.standard_normal``),
so a release costs four draws made in numpy from OS bytes instead of one from torch's generator. The releases of
this project are small (a node's factor gradients, the server's p_G noise), so what matters is that cost next to a
DP step (~0.45 s for the demo model, B = 32).

Run: python dpfpl/bench/secure_noise.py [--repeats N]
"""

from __future__ import annotations

import argparse
import time

import torch

from dpfpl.common.privacy import add_gaussian_noise, dp_generator

# (name, shape): DP-FPL's releases at the paper's sizes, n_ctx 16, rank 8, ViT-B-16 text width 512
RELEASES = (
    ("local factor gU (16 x 8)", (16, 8)),
    ("local factor gv (8 x 512)", (8, 512)),
    ("p_G / full-rank p_L (16 x 512)", (16, 512)),
    ("large (1000 x 512)", (1000, 512)),
)


def seconds_per_release(shape: tuple[int, ...], secure: bool, repeats: int) -> float:
    generator = dp_generator(True, 0)
    tensor = torch.zeros(shape)
    add_gaussian_noise(tensor, 1.0, generator, secure)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        add_gaussian_noise(tensor, 1.0, generator, secure)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.repeats} releases each")
    print(f"{'release':<34}{'default (us)':>14}{'secure (us)':>14}{'ratio':>8}")
    for name, shape in RELEASES:
        plain = seconds_per_release(shape, False, args.repeats)
        secure = seconds_per_release(shape, True, args.repeats)
        print(f"{name:<34}{plain * 1e6:>14.1f}{secure * 1e6:>14.1f}{secure / plain:>8.1f}")


if __name__ == "__main__":
    main()
