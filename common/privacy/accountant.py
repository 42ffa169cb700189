"""Privacy accounting with Google's dp-accounting PLD (privacy loss distribution) accountant.

Why PLD: the paper's epsilon grid goes down to 0.01. RDP with default orders cannot certify epsilon below
about 0.19 at delta = 1e-5, and Opacus' PRV accountant over-noises 13x at epsilon = 0.01 (a discretisation
artefact); the PLD accountant is tight across the whole grid.

Neighbouring relation: add/remove one record. Every mechanism here is a Poisson-subsampled Gaussian:
each record of a client is in a step's batch with probability q = B / n_i, and the sum of its clipped
contributions is released with Gaussian noise of std ``noise_multiplier * max_grad_norm``.

The published personalized prompt p_G + p_L depends on both the local (LDP) release and the global (GDP)
release of the *same* Poisson batch. Stacking the two releases, scaled by their noise std, gives one
Gaussian mechanism on one subsample whose sensitivity is sqrt(1/z_L^2 + 1/z_G^2); so the pair is exactly
a subsampled Gaussian with the combined noise multiplier ``(z_L^-2 + z_G^-2)^-1/2``.

A method without one of the two releases (PromptFL has no local prompt, CoOp no global one) records that
release with ``z = inf``: it publishes nothing, costs epsilon 0 and drops out of the combination.
"""

from __future__ import annotations

import math
from functools import lru_cache

from dp_accounting.pld import privacy_loss_distribution

# The PLD grid: 1e-3 for epsilon >= 0.5; below that a 1e-4 grid keeps epsilon = 0.01
# within ~1% (measured against the grid 1e-5). Large-noise PLDs are cheap, so the fine grid costs little.
COARSE_DISCRETIZATION = 1e-3
FINE_DISCRETIZATION = 1e-4
NEIGHBOURING_RELATION = "add/remove one record"


@lru_cache(maxsize=1024)
def _step_pld(noise_multiplier: float, sample_rate: float, discretization: float):
    """The privacy loss distribution of one Poisson-subsampled Gaussian step (cached: building it is the
    expensive part; composing it T times is an FFT power)."""
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sampling_prob=min(sample_rate, 1.0),
        value_discretization_interval=discretization,
        use_connect_dots=True,
    )


def _epsilon_of(steps: list[tuple[float, float, int]], delta: float) -> float:
    """epsilon of composing (noise_multiplier, sample_rate, count) groups; fine grid when epsilon is small."""
    epsilon = math.inf
    for discretization in (COARSE_DISCRETIZATION, FINE_DISCRETIZATION):
        total = None
        for z, q, count in steps:
            pld = _step_pld(z, q, discretization).self_compose(count)
            total = pld if total is None else total.compose(pld)
        epsilon = float(total.get_epsilon_for_delta(delta))
        if epsilon >= 0.5:
            break
    return epsilon


@lru_cache(maxsize=4096)
def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon of ``steps`` compositions of a Poisson-subsampled Gaussian (inf if no noise, 0 if no steps)."""
    if steps <= 0 or sample_rate <= 0.0 or math.isinf(noise_multiplier):
        return 0.0
    if noise_multiplier <= 0.0:
        return math.inf
    return _epsilon_of([(noise_multiplier, sample_rate, steps)], delta)


def epsilon_of_groups(groups: list[tuple[float, float, int]], delta: float) -> float:
    """epsilon of composing (noise_multiplier, sample_rate, count) groups at the rounded-up rates; groups with
    no step or no release (z = inf) cost nothing, a group without noise costs inf."""
    merged: dict[tuple[float, float], int] = {}
    for z, q, n in groups:
        if n > 0 and q > 0 and not math.isinf(z):
            key = (z, accounting_sample_rate(q))
            merged[key] = merged.get(key, 0) + n
    if not merged:
        return 0.0
    if any(z <= 0 for z, _ in merged):
        return math.inf
    if len(merged) == 1:
        (((z, q), n),) = merged.items()
        return epsilon_for(z, q, n, delta)
    return _epsilon_of([(z, q, n) for (z, q), n in merged.items()], delta)


def accounting_sample_rate(sample_rate: float) -> float:
    """The sample rate calibration and reporting use: q rounded *up* to two significant digits.

    epsilon grows with q, so noise calibrated for the rounded rate also meets the target at the true rate,
    and the epsilon reported for it is an upper bound on the true one (16/944 = 0.01695 -> 0.017). Nodes of
    similar size then share one PLD computation instead of each paying its own: a PLD calibration and even
    one epsilon evaluation cost about as much as a DP step of the demo model (docs/performance.md).
    """
    if sample_rate >= 1.0:
        return 1.0
    scale = 10.0 ** (math.floor(math.log10(sample_rate)) - 1)
    return min(1.0, math.ceil(sample_rate / scale - 1e-9) * scale)


def accounted_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon as this project reports it: for the sample rate rounded up (``accounting_sample_rate``)."""
    return epsilon_for(noise_multiplier, accounting_sample_rate(sample_rate), steps, delta)


def calibrate_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """Smallest noise multiplier whose ``steps``-fold subsampled Gaussian is (target_epsilon, delta)-DP at the
    sample rate ``accounting_sample_rate(sample_rate)`` (>= the true rate, so the guarantee holds)."""
    if target_epsilon <= 0:
        raise ValueError("target epsilon must be > 0")
    if steps <= 0:
        raise ValueError("steps must be > 0 to calibrate")
    return _calibrate(target_epsilon, accounting_sample_rate(min(sample_rate, 1.0)), steps, delta)


@lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, q: float, steps: int, delta: float) -> float:

    def eps(z: float) -> float:
        return epsilon_for(z, q, steps, delta)

    # Bracket from a guess near the answer (low-noise PLDs are the expensive ones, so start high), then
    # bisect in log space; every evaluation is the library's PLD accountant.
    high = max(1.0, q * math.sqrt(2 * steps * math.log(1.25 / delta)) / target_epsilon / 4)
    while eps(high) > target_epsilon:
        high *= 2
    low = high / 2
    while low > 0.05 and eps(low) <= target_epsilon:
        high, low = low, low / 2
    while high / low > 1 + 1e-4:
        mid = math.sqrt(low * high)
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def combined_noise_multiplier(*noise_multipliers: float) -> float:
    """Noise multiplier of several Gaussian releases of the same subsample, viewed as one mechanism."""
    if any(z <= 0 for z in noise_multipliers):
        return 0.0
    precision = sum(1.0 / z**2 for z in noise_multipliers)  # z = inf: nothing released, adds 0
    return math.inf if precision == 0 else 1.0 / math.sqrt(precision)


class PrivacyAccountant:
    """Tracks one client's mechanisms over the noisy steps that really happened.

    ``record_step`` is called once per step in which noise was actually added to the client's data; the
    epsilons are recomputed from the full history, so a resumed run recomputes the same numbers from the
    recorded steps instead of trusting a cached epsilon.
    """

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.history: list[tuple[float, float, float]] = []  # (z_local, z_global, q) per step

    def record_step(self, z_local: float, z_global: float, sample_rate: float) -> None:
        self.history.append((float(z_local), float(z_global), float(sample_rate)))

    def _epsilon(self, pick) -> float:
        # each step at q rounded up (an upper bound, shared by similar nodes); ``epsilon_of_groups`` merges them
        return epsilon_of_groups([(pick(z_l, z_g), q, 1) for z_l, z_g, q in self.history], self.delta)

    def epsilon_local(self) -> float:
        return self._epsilon(lambda z_l, z_g: z_l)

    def epsilon_global(self) -> float:
        return self._epsilon(lambda z_l, z_g: z_g)

    def epsilon_published(self) -> float:
        return self._epsilon(combined_noise_multiplier)

    def state_dict(self) -> dict:
        return {"delta": self.delta, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> PrivacyAccountant:
        acc = cls(float(state["delta"]))
        acc.history = [tuple(h) for h in state["history"]]
        return acc
