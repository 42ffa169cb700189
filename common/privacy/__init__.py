"""Differential privacy in one place: per-sample gradients, clipping and Gaussian noise (pure functions,
``mechanisms``), and the privacy accountant with calibration and reporting (``accountant``)."""

from .accountant import (
    PrivacyAccountant,
    accounted_epsilon,
    accounting_sample_rate,
    calibrate_noise_multiplier,
    combined_noise_multiplier,
    epsilon_for,
)
from .mechanisms import (
    add_gaussian_noise,
    clip_per_sample,
    clip_per_sample_jointly,
    dp_generator,
    per_sample_grads,
    poisson_sample,
)

__all__ = [
    "PrivacyAccountant",
    "add_gaussian_noise",
    "accounted_epsilon",
    "accounting_sample_rate",
    "calibrate_noise_multiplier",
    "clip_per_sample",
    "clip_per_sample_jointly",
    "combined_noise_multiplier",
    "dp_generator",
    "epsilon_for",
    "per_sample_grads",
    "poisson_sample",
]
