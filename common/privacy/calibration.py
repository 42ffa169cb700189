"""How a target epsilon becomes noise: the one home of the rule that splits a run's budget between the local
(LDP, z_L) and the global (GDP, z_G) releases, and of the limit a node enforces on itself.

Both apps call these functions: the server to choose z_G for the largest declared sample rate, each node to
choose its z_L for its own rate and to check, before every release, that what it has released stays within
what the run promised (``run_epsilon_limit``).

The split, for ``calibrate-for = "published"``: the two releases of one Poisson batch are one subsampled
Gaussian with z_eff = (z_L^-2 + z_G^-2)^-1/2 (``combined_noise_multiplier``), so the published prompt meets
the target when z_eff is the accountant's calibration for (target, q, T). The server takes z_G = z_eff(q_max)·√2
(half the precision budget, for the largest rate of any node); each node then takes the rest of its own
precision budget, 1/z_L^2 = 1/z_eff(q_i)^2 − 1/z_G^2. With ``"each"`` every mechanism alone is calibrated to
the target (the paper's reading; the published prompt then composes to more).
"""

from __future__ import annotations

import math

from .accountant import accounting_sample_rate, calibrate_noise_multiplier, combined_noise_multiplier, epsilon_for

# A node refuses a release whose epsilon exceeds its limit by more than this relative margin: the limit and the
# calibration come from the same accountant, and the margin only absorbs its floating-point resolution
# (z_L is derived from z_eff and z_G by a subtraction in double precision).
LIMIT_TOLERANCE = 1e-6


def global_noise_multiplier(
    target_epsilon: float,
    max_sample_rate: float,
    steps: int,
    delta: float,
    calibrate_for: str,
    has_local: bool,
) -> float:
    """z_G for the largest sample rate among the nodes."""
    z = calibrate_noise_multiplier(target_epsilon, max_sample_rate, steps, delta)
    if calibrate_for == "each" or not has_local:
        return z
    return z * math.sqrt(2.0)  # "published": half of the combined mechanism's precision budget


def local_noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    calibrate_for: str,
    z_global: float,
) -> float:
    """z_L for a node with this sample rate, given the z_G it was told (``inf``: nothing global is released)."""
    z_eff = calibrate_noise_multiplier(target_epsilon, sample_rate, steps, delta)
    if calibrate_for == "each":
        return z_eff
    rest = 1.0 / z_eff**2 - (1.0 / z_global**2 if 0 < z_global else 0.0)
    if rest <= 0:
        raise ValueError(
            f"the global noise multiplier {z_global:.4g} alone already spends the published-prompt budget "
            f"(epsilon {target_epsilon} at q = {sample_rate:.4g} needs z_eff >= {z_eff:.4g}); a node does not "
            "train on it"
        )
    # a hair more noise than the subtraction gives, so that rounding never puts z_eff below the calibration
    return 1.0 / math.sqrt(rest) * (1 + 1e-9)


def run_epsilon_limit(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    calibrate_for: str,
    has_local: bool,
    shares_global: bool,
) -> float:
    """The most a node lets one run spend of its records' privacy, as the composed (published-prompt) epsilon.

    "published": the target itself. "each": what the node's own calibration promises: T steps of both
    releases, each calibrated to the target at the node's own rate (the server's z_G, calibrated for the largest
    rate, is at least that). A method with one release only is limited to the target."""
    if calibrate_for != "each" or not (has_local and shares_global):
        return target_epsilon
    z = calibrate_noise_multiplier(target_epsilon, sample_rate, steps, delta)
    return epsilon_for(combined_noise_multiplier(z, z), accounting_sample_rate(sample_rate), steps, delta)


def within(epsilon: float, limit: float) -> bool:
    """Whether an epsilon is within a limit, up to the accountant's resolution (``LIMIT_TOLERANCE``)."""
    return epsilon <= limit * (1 + LIMIT_TOLERANCE)
