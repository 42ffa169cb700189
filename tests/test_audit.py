"""The privacy audit (dpfpl/audit): the one-run bound against the published numbers, the canary hook leaving a
normal step untouched, and the audit's verdict on the correct mechanism and on broken ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpfpl.audit.bound import best_guesses, ceiling, epsilon_lower_bound, gaussian_mu, p_value
from dpfpl.audit.canaries import GradientCanaries
from dpfpl.common.methods import DpSettings, PromptLearner, SgdSettings, build_method


def test_the_p_value_without_delta_is_the_binomial_tail_of_randomized_response():
    q = math.exp(1.0) / (1 + math.exp(1.0))
    expected = sum(math.comb(20, j) * q**j * (1 - q) ** (20 - j) for j in range(15, 21))
    assert p_value(100, 20, 15, 1.0, 0.0) == pytest.approx(expected, rel=1e-9)
    assert p_value(100, 20, 15, 1.0, 1e-3) > expected  # the delta term only ever adds


def test_all_guesses_right_bounds_epsilon_and_chance_level_bounds_nothing():
    assert epsilon_lower_bound(1000, 100, 100, 1e-5) > 3.0
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    # the bound is the edge of the test: just below it the p-value is under 5%, just above it is not
    eps = epsilon_lower_bound(1000, 200, 150, 1e-5)
    assert p_value(1000, 200, 150, eps - 1e-3, 1e-5) < 0.05 <= p_value(1000, 200, 150, eps + 1e-3, 1e-5)


def test_the_gaussian_mu_is_exactly_epsilon_delta_dp():
    from scipy import stats

    mu = gaussian_mu(2.0, 1e-5)
    delta = stats.norm.cdf(-2.0 / mu + mu / 2) - math.exp(2.0) * stats.norm.cdf(-2.0 / mu - mu / 2)
    assert delta == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "epsilon, m, published",
    [(8, 1000, 2.95), (1, 10000, 0.49), (2, 10000, 1.09), (4, 10000, 2.20), (8, 10000, 3.90)],
)
def test_the_ceiling_reproduces_the_published_one_run_numbers(epsilon, m, published):
    """Steinke et al.'s idealized Gaussian numbers (as tabulated by Mahloujifar et al.), 95% confidence,
    delta 1e-5. At m = 1000 and epsilon <= 4 this computation is lower (docs/audit.md)."""
    assert ceiling(epsilon, m) == pytest.approx(published, abs=0.06)


def test_ideal_gaussian_scores_give_a_bound_below_the_claim_and_near_the_ceiling():
    mu = gaussian_mu(8.0, 1e-5)
    rng = np.random.default_rng(3)
    bounds = []
    for _ in range(5):
        included = rng.random(1000) < 0.5
        bounds.append(best_guesses(rng.normal(size=1000) + mu * included, included, 1e-5).epsilon)
    assert all(0 < b < 8.0 for b in bounds)
    assert 2.0 < float(np.median(bounds)) < 4.0


def _step(encoder, batch, canaries, seed=5, rate=0.6):
    feats, labels = batch
    learner = PromptLearner(build_method("dpfpl", 2), encoder, 10.0, chunk_size=4)
    gen = torch.Generator().manual_seed(0)
    p_global = 0.02 * torch.randn(encoder.n_ctx, encoder.width, generator=gen)
    local = learner.init_local(gen)
    dp = DpSettings(True, 1.5, 0.3, 0.3)
    return learner.train_step(
        p_global,
        local,
        {},
        feats,
        labels,
        4,
        dp,
        SgdSettings(0.1, 0.0, 0.0),
        torch.Generator().manual_seed(seed),
        sample_rate=rate,
        canaries=canaries,
    )


def _canaries(encoder, rate, m=8):
    return GradientCanaries(m, (encoder.n_ctx, encoder.width), rate, 0.3, 0.3, build_method("dpfpl", 2).local, seed=1)


def test_a_step_without_canaries_is_bit_identical_and_unsampled_canaries_change_nothing(encoder, batch):
    plain = _step(encoder, batch, None)
    quiet = _step(encoder, batch, _canaries(encoder, rate=0.0))  # canaries present, none in the batch
    assert torch.equal(plain.global_grad, quiet.global_grad)
    assert all(torch.equal(a, b) for a, b in zip(plain.local_grads, quiet.local_grads))
    assert all(torch.equal(plain.local[k], quiet.local[k]) for k in plain.local)


def test_a_sampled_canary_moves_each_release_by_its_clipped_contribution_over_b(encoder, batch):
    plain = _step(encoder, batch, None)
    hook = _canaries(encoder, rate=1.0)
    with_canaries = _step(encoder, batch, hook)
    sampled = hook.sampled
    assert sampled.any() and not sampled.all()  # only the included ones (coins), every one of them at q = 1
    assert torch.equal(sampled, hook.included)
    expected_global = 0.3 * hook.directions[sampled].sum(0) / 4  # clipped to C_G, divided by B
    assert torch.allclose(with_canaries.global_grad - plain.global_grad, expected_global, atol=1e-6)
    for a, b, d in zip(with_canaries.local_grads, plain.local_grads, hook.local_directions):
        assert torch.allclose(a - b, d[sampled].sum(0) / 4, atol=1e-6)
    norms = torch.sqrt(sum(d.flatten(1).pow(2).sum(1) for d in hook.local_directions))
    assert torch.allclose(norms, torch.full_like(norms, 0.3), atol=1e-5)  # each canary's local part at C_L


AUDIT_RUN = {
    "num-clients": 2,
    "classes-per-client": 2,
    "min-clients": 2,
    "num-server-rounds": 10,
    "batch-size": 8,
    "num-shots": 4,  # 8 records per node, all in every step (q = 1): each canary meets the full mechanism
    "sample-rate": 1.0,
    "n-ctx": 16,  # 16 x 128 coordinates: the 1000 canaries interfere little along each other's directions
    "rank": 8,  # lr-global and lr-local stay at 1e-4: the prompt stays near its start even if clipping breaks
    "pretrained": "none",
    "dp": True,
    "calibrate-for": "published",
}


def _audit(tmp_path, cache_dir, epsilon, seed=0, canaries=1000):
    from dpfpl.audit.run import AuditSettings, run_audit
    from dpfpl.common.config import RunConfig
    from dpfpl.inprocess import full_run_config

    config = {**AUDIT_RUN, "target-epsilon": epsilon, "run-dir": str(tmp_path / "run")}
    return run_audit(
        RunConfig.from_flower(full_run_config(config)), AuditSettings(canaries=canaries, seed=seed), str(cache_dir)
    )


def test_the_audit_flags_no_violation_on_the_correct_code_and_finds_some_leakage(tmp_path, cache_dir):
    """Claimed epsilon 2, m = 1000: the white-box bound is positive (the canaries are seen) and below the claim.
    With the noise quartered or the clipping disabled (scripts/mutation_check.py) the bound passes 2."""
    result = _audit(tmp_path, cache_dir, 2.0)
    assert result.epsilon_claimed == pytest.approx(2.0, rel=1e-3)
    white = next(r for r in result.results if r.threat_model == "white-box")
    assert not result.violation, "\n".join(result.lines())
    assert 0.0 < white.epsilon_lower_bound <= result.epsilon_claimed
    assert white.correct <= white.guesses and white.guessed_in + white.guessed_out == white.guesses


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1.0, 4.0])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_audit_is_sound_across_seeds(tmp_path, cache_dir, epsilon, seed):
    result = _audit(tmp_path, cache_dir, epsilon, seed=seed)
    assert all(r.epsilon_lower_bound <= result.epsilon_claimed for r in result.results), "\n".join(result.lines())


def test_the_audit_command_writes_its_results_under_the_hyphenated_keys(tmp_path, cache_dir, capsys):
    """``dpfpl audit --json``: one entry per claimed epsilon, the keys docs/audit.md shows (hyphenated, as the run
    config's), a lower bound per threat model, and the exit status 0 of an audit without a violation."""
    import json

    from dpfpl.audit.run import THREAT_MODELS, AuditResult
    from dpfpl.cli import main

    out = tmp_path / "audit.json"
    config = [f"{key}={json.dumps(value)}" for key, value in {**AUDIT_RUN, "run-dir": str(tmp_path / "run")}.items()]
    argv = ["audit", *(arg for pair in config for arg in ("-c", pair))]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--canaries", "50", "--epsilons", "2", "--cache-dir", str(cache_dir), "--json", str(out)])
    assert done.value.code == 0
    assert f"results: {out}" in capsys.readouterr().out
    (entry,) = json.loads(out.read_text())
    assert {"epsilon-claimed", "ceiling", "canaries", "confidence", "results", "violation"} <= set(entry)
    assert entry["canaries"] == 50 and entry["confidence"] == 0.95 and entry["violation"] is False
    assert entry["epsilon-claimed"] == pytest.approx(2.0, rel=1e-3)
    assert 0.0 <= entry["ceiling"] < entry["epsilon-claimed"]
    assert [r["threat-model"] for r in entry["results"]] == list(THREAT_MODELS)
    for r in entry["results"]:
        assert set(r) == {"threat-model", "epsilon-lower-bound", "guesses", "correct", "guessed-in", "guessed-out"}
        assert 0.0 <= r["epsilon-lower-bound"] <= entry["epsilon-claimed"]
    keys = [*entry, *(k for r in entry["results"] for k in r)]
    assert not [k for k in keys if "_" in k], "every key is hyphenated"
    assert "scores" not in entry and "included" not in entry  # the secret coins stay out of the file
    # the file reads back into the result it was written from (by its hyphenated names)
    back = AuditResult.model_validate(entry)
    assert back.epsilon_claimed == entry["epsilon-claimed"] and back.results[0].threat_model == THREAT_MODELS[0]
