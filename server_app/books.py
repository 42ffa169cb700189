"""The server's privacy books and the worst case over every node in them.

Why p_G is not bounded by the GDP mechanism alone: in every method with a local prompt (FedOTP, FedPGP,
DP-FPL, SecFPP) a node's reply is a gradient taken at p_G + p_L, and p_L is hidden state updated from the
same records through the LDP releases. The transcript of global releases is then not a composition of
z_G-Gaussians in the records, and the GDP-only epsilon does not bound p_G. What does bound everything the
server publishes, for one client's records, is the composition of both releases of each step (the
published-prompt mechanism: one subsampled Gaussian with z = (z_L^-2 + z_G^-2)^-1/2). Only where the reply
reads no local state (PromptFL) is the GDP-only epsilon p_G's guarantee.

The books hold, per node key: the sample rate q_i the node declares (public by declaration), the rounds
whose p_G contains the node's reply (``participation``), the node's z_L and the number
of noisy steps it says it took (a step whose reply the server never aggregated still moved p_L). Every
epsilon is the PLD accountant's for those books; maxima run over every node ever booked, so a node absent
from the last round, or a last round that failed, cannot lower them.
"""

from __future__ import annotations

import math

from dpfpl.common.privacy import accounted_epsilon, combined_noise_multiplier
from dpfpl.common.privacy.accountant import epsilon_of_groups
from dpfpl.common.privacy.covers import SERVER_COVERS

from .checkpoint import ServerState

COVERS = SERVER_COVERS  # what each printed epsilon covers (dpfpl.common.privacy.covers)
SAMPLE_RATE_NOTE = (
    "q_i is public by declaration (the node's or the run's sample-rate; in simulation B / the partition's planned "
    "size), never computed from the records a node holds and never its training-set size, so the add/remove-one "
    "guarantee holds for the rate in force; epsilon is computed at q rounded up to two significant digits (an "
    "upper bound)"
)


DISCRETE_GAUSSIAN_NOTE = (
    "secure aggregation: the nodes' distributed discrete-Gaussian noise is accounted as the continuous Gaussian of "
    "the same variance (an approximation: the discrete Gaussian has the continuous one's zCDP/Renyi guarantee, and "
    "the sum of the shares is within Kairouz-Liu-Steinke's tau of one discrete Gaussian, but the subsampled PLD "
    "of the discrete mechanism is not computed; docs/secure-aggregation.md)"
)


def node_epsilons(
    z_local: float,
    z_global: float,
    sample_rate: float,
    local_steps: int,
    global_rounds: int,
    delta: float,
    rereleased: int = 0,
) -> dict[str, float]:
    """One node's epsilons from its books. The composed mechanism is charged for every step the node took
    (its reply may have been dropped, but the step still moved p_L), the GDP one for the rounds aggregated.
    ``rereleased`` of those rounds went out twice with fresh noise on the same reply: they are booked as one
    release at the combined multiplier z_G / sqrt(2) (``checkpoint.charge_lost_round``)."""
    steps = max(local_steps, global_rounds)
    again = min(rereleased, max(global_rounds, 1))
    z_twice = combined_noise_multiplier(z_global, z_global)

    def eps(pairs: list[tuple[float, int]]) -> float:
        return epsilon_of_groups([(z, sample_rate, n) for z, n in pairs], delta)

    return {
        "epsilon-local-max": accounted_epsilon(z_local, sample_rate, steps, delta),
        "epsilon-gdp-mechanism-max": eps([(z_global, max(global_rounds - again, 0)), (z_twice, again)]),
        "epsilon-published-max": eps(
            [
                (combined_noise_multiplier(z_local, z_global), max(steps - again, 0)),
                (combined_noise_multiplier(z_local, z_twice), again),
            ]
        ),
    }


def worst(*epsilons: float) -> float:
    """The largest epsilon, with NaN as +inf: ``max`` keeps whichever argument comes first when a NaN is compared,
    so an epsilon the accountant could not compute would silently drop out of a maximum and lower it; no guarantee
    is the conservative reading."""
    return max(math.inf if math.isnan(e) else e for e in epsilons)


def privacy_maxima(state: ServerState, delta: float, has_local: bool, shares_global: bool) -> dict[str, float]:
    """Worst case over every booked node of each epsilon in ``COVERS`` (0 before any noisy step)."""
    z_global = state.noise_multiplier_global if shares_global else math.inf
    out = {key: 0.0 for key in COVERS}
    for key in set(state.participation) | set(state.node_steps):
        z_local = state.node_noise_local.get(key, 0.0) if has_local else math.inf  # unknown: no guarantee
        eps = node_epsilons(
            z_local,
            z_global,
            state.node_sample_rates.get(key, 1.0),
            state.node_steps.get(key, 0),
            state.participation.get(key, 0),
            delta,
            state.rereleased.get(key, 0),
        )
        for name, value in eps.items():
            out[name] = worst(out[name], value)
    # p_G's guarantee: the composed epsilon whenever the reply reads local state
    out["epsilon-global-max"] = out["epsilon-published-max"] if has_local else out["epsilon-gdp-mechanism-max"]
    if not shares_global:
        out["epsilon-global-max"] = 0.0  # nothing global is released
    return out
