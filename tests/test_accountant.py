import math

import pytest

from dpfpl.common.privacy import PrivacyAccountant, calibrate_noise_multiplier, epsilon_for


@pytest.mark.parametrize("target", [0.01, 0.05, 0.1, 0.2, 0.4])
def test_calibration_round_trip_over_the_paper_grid(target):
    z = calibrate_noise_multiplier(target, 0.04, 100, 1e-5)
    eps = epsilon_for(z, 0.04, 100, 1e-5)
    assert eps <= target * 1.001
    assert eps >= target * 0.98  # not over-noised
    # slightly less noise must break the target
    assert epsilon_for(z * 0.97, 0.04, 100, 1e-5) > target


@pytest.mark.parametrize("target,expected", [(0.4, 3.68), (0.01, 98.1)])
def test_calibration_agrees_with_independent_pld_numbers(target, expected):
    # dp-accounting's PLD gives z ~ 3.68 / 98.1 for q = 0.04, 100 steps
    assert calibrate_noise_multiplier(target, 0.04, 100, 1e-5) == pytest.approx(expected, rel=0.02)


def test_epsilon_grows_with_steps_and_sample_rate():
    assert epsilon_for(5.0, 0.04, 50, 1e-5) < epsilon_for(5.0, 0.04, 100, 1e-5)
    assert epsilon_for(5.0, 0.04, 100, 1e-5) < epsilon_for(5.0, 0.5, 100, 1e-5)
    assert epsilon_for(0.0, 0.04, 1, 1e-5) == math.inf
    assert epsilon_for(5.0, 0.04, 0, 1e-5) == 0.0


def test_published_prompt_composes_both_mechanisms():
    acc = PrivacyAccountant(1e-5)
    for _ in range(20):
        acc.record_step(4.0, 6.0, 0.05)
    e_l, e_g, e_p = acc.epsilon_local(), acc.epsilon_global(), acc.epsilon_published()
    assert e_p > max(e_l, e_g)
    # the combined multiplier written out here, not through combined_noise_multiplier (checked against
    # dp-accounting's own stacked Gaussian in tests/test_privacy_mechanisms.py)
    assert e_p == pytest.approx(epsilon_for((4.0**-2 + 6.0**-2) ** -0.5, 0.05, 20, 1e-5))
    restored = PrivacyAccountant.from_state_dict(acc.state_dict())
    assert restored.epsilon_published() == pytest.approx(e_p)


@pytest.mark.parametrize(
    "q, rounded", [(16 / 944, 0.017), (0.04, 0.04), (0.0123, 0.013), (0.5, 0.5), (1.0, 1.0), (0.00101, 0.0011)]
)
def test_calibration_rate_is_rounded_up_so_the_true_rate_stays_within_budget(q, rounded):
    from dpfpl.common.privacy.accountant import accounting_sample_rate

    assert accounting_sample_rate(q) == pytest.approx(rounded) and accounting_sample_rate(q) >= q
    z = calibrate_noise_multiplier(0.4, q, 20, 1e-5)
    assert epsilon_for(z, q, 20, 1e-5) <= 0.4 + 1e-9
