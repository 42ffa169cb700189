"""Mutation check of the privacy-critical code: every listed mutation must make the privacy tests fail.

Why: a test suite that still passes with clipping disabled guarantees nothing about clipping. Each mutation
below is one plausible way to break the DP mechanism or its accounting; the script applies it to a
temporary copy of the tree (never to the working files), runs the few fast privacy tests chosen for it, and
reports whether they caught it. It exits non-zero if any mutation survives, or if the chosen tests fail on
the unmutated copy (then a "caught" would mean nothing).

Run: python scripts/mutation_check.py [--list] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEP_REFERENCE = (
    "tests/test_privacy_mechanisms.py::test_dp_step_equals_a_per_sample_loop_clipped_and_divided_by_the_expected_batch"
)
LOCAL_NOISE = "tests/test_dpfpl.py::test_local_noise_std_is_z_times_clip_bound"
SERVER_NOISE = "tests/test_privacy_mechanisms.py::test_server_noise_std_is_z_times_clip_over_b_times_n"
GENERATORS = (
    "tests/test_privacy_mechanisms.py::test_dp_generators_are_seeded_from_the_os_and_follow_the_seed_only_without_dp"
)
NODE_BOOKS = "tests/test_client.py::test_local_state_persists_across_invocations_and_is_separate_per_node"
SERVER_BOOKS = (
    "tests/test_fault_tolerance.py::test_a_node_that_missed_the_setup_phase_is_booked_with_its_own_sample_rate"
)
RGP = "tests/test_dpfpl.py::test_rgp_equals_projection_formula_of_autograd_gradient"
COMPOSITION = (
    "tests/test_privacy_mechanisms.py::test_published_prompt_epsilon_matches_the_stacked_gaussian_in_dp_accounting"
)
P_GLOBAL = "tests/test_privacy_books.py::test_p_global_epsilon_composes_both_releases_where_the_reply_reads_local_state"
WORKER_PEER = "tests/test_worker.py::test_a_worker_turns_away_a_peer_of_another_user"
WORKER_OPERATIONS = "tests/test_worker.py::test_the_link_answers_only_the_clientapps_message_types"
INVARIANTS = "tests/test_privacy_invariants.py::"
POISSON = INVARIANTS + "test_poisson_batch_size_is_binomial_and_every_record_is_included_with_probability_q"
Z_G_FOR_Q_MAX = INVARIANTS + "test_the_server_calibrates_z_g_for_the_largest_declared_sample_rate"
ROUNDING = INVARIANTS + "test_the_accounting_rate_is_q_rounded_up_to_two_significant_digits"
CALIBRATION = INVARIANTS + "test_the_calibrated_noise_is_the_smallest_that_meets_the_target_in_dp_accounting"
NODE_RECORDS = INVARIANTS + "test_the_node_books_its_step_with_the_noise_it_added_and_reports_the_stacked_gaussian"
DP_REPLY = INVARIANTS + "test_a_dp_train_reply_carries_nothing_outside_the_epsilon"
SECURE_REPLAY = INVARIANTS + "test_secure_noise_is_the_scaled_sum_of_four_float64_draws_from_the_os_csprng"
SECURE_SEEDS = INVARIANTS + "test_secure_noise_is_standard_normal_and_never_repeats"
NODE_FALLBACK = "tests/test_state_integrity.py::test_a_damaged_local_state_falls_back_to_the_previous_round[flip]"
SERVER_FALLBACK = "tests/test_privacy_books.py::test_falling_back_to_the_previous_checkpoint_charges_the_lost_round"


BOUNDARY = "tests/test_node_boundary.py::"
HALF_Z = BOUNDARY + "test_a_node_refuses_half_the_global_noise_and_loses_nothing"
EXTRA_ROUND = BOUNDARY + "test_a_node_refuses_one_round_more_than_calibrated"
DECLARED_Q = BOUNDARY + "test_the_sample_rate_is_declared_never_computed_from_the_records"
NO_SIZE_ON_WIRE = BOUNDARY + "test_train_and_evaluate_replies_carry_the_declared_rate_and_not_the_training_set_size"
LEDGER = BOUNDARY + "test_the_ledger_composes_every_run_on_the_same_records"
LIFETIME = BOUNDARY + "test_a_run_past_the_lifetime_epsilon_is_refused_at_setup_with_the_ledger"
ABA = BOUNDARY + "test_a_to_b_to_a_resumes_a_with_its_prompt_optimizer_and_books"
RESEED = BOUNDARY + "test_a_fallback_to_the_previous_state_draws_a_fresh_secret_seed"
WIRE_CHECK = BOUNDARY + "test_the_clientapp_refuses_to_send_a_field_the_inventory_does_not_classify"
RESENT = "tests/test_client.py::test_a_re_sent_round_gets_the_same_reply_without_a_new_step"
EVALUATION_QUOTA = "tests/test_worker_policy.py::test_evaluations_are_bounded_by_the_run_schedule_and_the_day_and_counted_in_the_ledger"
INVALID_REPLIES = "tests/test_server.py::test_invalid_replies_are_rejected_and_never_aggregated"
WRONG_TYPE = "tests/test_server.py::test_a_metric_of_the_wrong_type_or_range_is_a_rejection_not_a_crash[value0]"
DUPLICATE_KEYS = "tests/test_fault_tolerance.py::test_two_replies_under_one_node_key_are_both_rejected"
LEDGER_FALLBACK = BOUNDARY + "test_a_damaged_ledger_falls_back_and_charges_one_more_step"
CALIBRATED_ROUNDS = "tests/test_server.py::test_resuming_with_more_rounds_than_the_noise_was_calibrated_for_is_refused"
OWN_NODE_CONFIG = "tests/test_worker_policy.py::test_a_separated_worker_uses_its_own_node_config_and_policy"
NODE_GLOBAL_NOISE = (
    "tests/test_privacy_mechanisms.py::test_a_node_that_trusts_no_aggregator_adds_the_global_noise_to_its_own_reply"
)
REBOOKED = "tests/test_privacy_books.py::test_a_rereleased_round_is_booked_as_one_release_at_the_combined_multiplier"
AUDIT = "tests/test_audit.py::test_the_audit_flags_no_violation_on_the_correct_code_and_finds_some_leakage"
TAKEN_OVER = "tests/test_durable_state.py::test_a_step_whose_reply_was_stored_is_never_taken_over_by_a_retry"
REBOOKED_ACROSS = "tests/test_privacy_books.py::test_a_rerelease_stays_booked_across_the_next_checkpoint_and_a_restart"
KEYED_AHEAD = "tests/test_secagg.py::test_keys_announced_a_round_ahead_sum_exactly_and_serve_that_round_only"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "a re-released round forgotten by the next checkpoint",
        "server_app/checkpoint.py",
        '                "rereleased",\n',
        "",
        (REBOOKED_ACROSS,),
    ),
    Mutation(
        "secure aggregation: keys drawn ahead serve any round",
        "common/secagg/protocol.py",
        'if self.stage != "advertised" or not context.startswith(self.context + "/g"):',
        "if False:",
        (KEYED_AHEAD,),
    ),
    Mutation(
        "audit: every Gaussian noise quartered",
        "common/privacy/mechanisms.py",
        "    return tensor + std * noise.to(tensor.device)\n",
        "    return tensor + std / 4 * noise.to(tensor.device)\n",
        (AUDIT,),
    ),
    Mutation(
        "audit: clipping disabled",
        "common/privacy/mechanisms.py",
        "    return (max_norm / (norms + 1e-6)).clamp(max=1.0)\n",
        "    return torch.ones_like(norms)\n",
        (AUDIT,),
    ),
    Mutation(
        "local clip disabled (C_L = 1e12)",
        "common/methods/engine.py",
        "clip_per_sample_jointly(per_sample, dp.max_grad_norm_local)",
        "clip_per_sample_jointly(per_sample, 1e12)",
        (STEP_REFERENCE,),
    ),
    Mutation(
        "global clip disabled (C_G = 1e12)",
        "common/methods/engine.py",
        "clip_per_sample(g + extra_global, dp.max_grad_norm_global)",
        "clip_per_sample(g + extra_global, 1e12)",
        (STEP_REFERENCE,),
    ),
    Mutation(
        "clip on the mean instead of per sample",
        "common/privacy/mechanisms.py",
        "    norms = grads.flatten(1).norm(dim=1)\n",
        "    norms = grads.mean(0, keepdim=True).flatten(1).norm(dim=1)\n",
        (STEP_REFERENCE,),
    ),
    Mutation(
        "local noise scale halved",
        "common/methods/engine.py",
        "noise_std = dp.noise_multiplier_local * dp.max_grad_norm_local",
        "noise_std = 0.5 * dp.noise_multiplier_local * dp.max_grad_norm_local",
        (LOCAL_NOISE,),
    ),
    Mutation(
        "global noise scale halved",
        "server_app/strategy.py",
        "noisy = add_gaussian_noise(mean, std, generator",
        "noisy = add_gaussian_noise(mean, std / 2, generator",
        (SERVER_NOISE,),
    ),
    Mutation(
        "divide by the realized instead of the expected batch",
        "common/methods/engine.py",
        "(global_sum / expected_batch)",
        "(global_sum / max(b, 1))",
        (STEP_REFERENCE,),
    ),
    Mutation(
        "divide the local sums by the realized batch",
        "common/methods/engine.py",
        "[s / expected_batch for s in local_sums]",
        "[s / max(b, 1) for s in local_sums]",
        (STEP_REFERENCE,),
    ),
    Mutation(
        "seeded generator instead of OS-seeded under DP",
        "common/privacy/mechanisms.py",
        "manual_seed(secrets.randbits(63) if dp else seed)",
        "manual_seed(seed)",
        (GENERATORS,),
    ),
    Mutation(
        "a node's step not charged",
        "client_app/node.py",
        "state.accountant.record_step(state.noise_multiplier_local, z_global, self.sample_rate)",
        "pass",
        (NODE_BOOKS,),
    ),
    Mutation(
        "a round not charged in the server's books",
        "server_app/strategy.py",
        "books.participation[key] = books.participation.get(key, 0) + 1",
        "books.participation[key] = books.participation.get(key, 0)",
        (SERVER_BOOKS,),
    ),
    Mutation(
        "RGP minus sign flipped",
        "common/methods/dpfpl.py",
        "return grad_u @ v + u @ grad_v - u @ (u.t() @ grad_u) @ v",
        "return grad_u @ v + u @ grad_v + u @ (u.t() @ grad_u) @ v",
        (RGP,),
    ),
    Mutation(
        "published prompt composed as the weaker release only",
        "common/privacy/accountant.py",
        "return math.inf if precision == 0 else 1.0 / math.sqrt(precision)",
        "return math.inf if precision == 0 else min(noise_multipliers)",
        (COMPOSITION,),
    ),
    Mutation(
        "p_G reported with the GDP epsilon alone",
        "server_app/books.py",
        'out["epsilon-published-max"] if has_local else',
        'out["epsilon-gdp-mechanism-max"] if has_local else',
        (P_GLOBAL,),
    ),
    Mutation(
        "the node worker answers any local user",
        "client_app/worker.py",
        "if uid != self.peer_uid:",
        "if False:",
        (WORKER_PEER,),
    ),
    Mutation(
        "the node worker takes calls beyond the ClientApp's message types",
        "client_app/worker.py",
        'if header.get("op") != "call" or header.get("operation") not in OPERATIONS:',
        'if header.get("op") != "call":',
        (WORKER_OPERATIONS,),
    ),
    Mutation(
        "fixed-size instead of Poisson sampling",
        "common/privacy/mechanisms.py",
        "    mask = torch.rand(num_examples, generator=generator) < sample_rate\n    return mask.nonzero().flatten()\n",
        "    return torch.randperm(num_examples, generator=generator)[: round(sample_rate * num_examples)]\n",
        (POISSON, STEP_REFERENCE),
    ),
    Mutation(
        "z_G calibrated for the smallest declared sample rate",
        "server_app/runner.py",
        "q_max = max(state.node_sample_rates.values())",
        "q_max = min(state.node_sample_rates.values())",
        (Z_G_FOR_Q_MAX,),
    ),
    Mutation(
        "server noise divided by B n^2 instead of B n",
        "server_app/strategy.py",
        "cfg.max_grad_norm_global / (cfg.batch_size * n) if cfg.dp",
        "cfg.max_grad_norm_global / (cfg.batch_size * n * n) if cfg.dp",
        (SERVER_NOISE,),
    ),
    Mutation(
        "global clip applied to the sum instead of per sample",
        "common/methods/engine.py",
        "clip_per_sample(g + extra_global, dp.max_grad_norm_global).sum(0)",
        "clip_per_sample((g + extra_global).sum(0, keepdim=True), dp.max_grad_norm_global)[0]",
        (STEP_REFERENCE,),
    ),
    Mutation(
        "local clip applied to the sums instead of per sample",
        "common/methods/engine.py",
        "for c in clip_per_sample_jointly(per_sample, dp.max_grad_norm_local)",
        "for c in clip_per_sample_jointly([p.sum(0, keepdim=True) for p in per_sample], dp.max_grad_norm_local)",
        (STEP_REFERENCE,),
    ),
    Mutation(
        "the node's accountant books twice the z_G the server adds",
        "client_app/node.py",
        "state.accountant.record_step(state.noise_multiplier_local, z_global, self.sample_rate)",
        "state.accountant.record_step(state.noise_multiplier_local, 2 * z_global, self.sample_rate)",
        (NODE_RECORDS,),
    ),
    Mutation(
        "the step's PLD built with twice the noise multiplier",
        "common/privacy/accountant.py",
        "standard_deviation=noise_multiplier,",
        "standard_deviation=2 * noise_multiplier,",
        (COMPOSITION,),
    ),
    Mutation(
        "accounting sample rate rounded down instead of up",
        "common/privacy/accountant.py",
        "math.ceil(sample_rate / scale - 1e-9)",
        "math.floor(sample_rate / scale + 1e-9)",
        (ROUNDING,),
    ),
    Mutation(
        "calibration returns the low end of the bracket",
        "common/privacy/accountant.py",
        "            high = mid\n    return high\n",
        "            high = mid\n    return low\n",
        (CALIBRATION,),
    ),
    Mutation(
        "a damaged node state's lost step not charged again",
        "client_app/state.py",
        "            accountant.history.append(accountant.history[-1])\n",
        "            pass\n",
        (NODE_FALLBACK,),
    ),
    Mutation(
        "a damaged server checkpoint's lost round not charged",
        "server_app/checkpoint.py",
        "            charge_lost_round(state)\n",
        "            pass\n",
        (SERVER_FALLBACK,),
    ),
    Mutation(
        "clear-only train metrics leave a DP node",
        "client_app/prompt_handlers.py",
        "        metrics = {k: v for k, v in metrics.items() if k not in OUTSIDE_EPSILON_TRAIN_METRICS}\n",
        "        pass\n",
        (DP_REPLY,),
    ),
    Mutation(
        "secure noise from one draw instead of the sum of four",
        "common/privacy/mechanisms.py",
        "SECURE_DRAWS = 4  #",
        "SECURE_DRAWS = 1  #",
        (SECURE_REPLAY,),
    ),
    Mutation(
        "secure noise from a generator seeded with 16 bits instead of the OS CSPRNG",
        "common/privacy/mechanisms.py",
        "np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64)",
        "np.frombuffer(np.random.default_rng(secrets.randbits(16)).bytes(16 * pairs), dtype=np.uint64)",
        (SECURE_SEEDS, SECURE_REPLAY),
    ),
    Mutation(
        "the node accepts a smaller z_G (checks its release against twice what the server adds)",
        "client_app/node.py",
        "step = (state.noise_multiplier_local, z_global, self.sample_rate)",
        "step = (state.noise_multiplier_local, 2 * z_global, self.sample_rate)",
        (HALF_Z,),
    ),
    Mutation(
        "the node's budget stop disabled",
        "client_app/node.py",
        "            if not calibration.within(spent, limit):",
        "            if False:",
        (EXTRA_ROUND, HALF_Z),
    ),
    Mutation(
        "n_i back on the wire (train reply)",
        "client_app/node.py",
        '            "sample-rate": self.sample_rate,\n            "noise-multiplier-local"',
        '            "sample-rate": self.sample_rate,\n            "num-examples": float(self.data.num_train),\n'
        '            "noise-multiplier-local"',
        (NO_SIZE_ON_WIRE,),
    ),
    Mutation(
        "a deployed node's sample rate computed from its records",
        "client_app/node.py",
        "    if node.partition_id is not None or not cfg.dp:",
        "    if True:",
        (DECLARED_Q,),
    ),
    Mutation(
        "the ledger does not compose a new release with earlier runs",
        "common/privacy/ledger.py",
        "        groups = dict(extra)\n        for key, entry in self.runs.items():",
        "        groups = dict(extra)\n        for key, entry in list(self.runs.items())[:0]:",
        (LIFETIME,),
    ),
    Mutation(
        "the ledger's total is one run's",
        "common/privacy/ledger.py",
        "            if run_key is None or key == run_key:",
        "            if key == run_key or (run_key is None and key == next(iter(self.runs))):",
        (LEDGER,),
    ),
    Mutation(
        "a run switch starts over instead of restoring the run's kept state",
        "client_app/state.py",
        "    if (kept / STATE_FILE).exists() or previous_path(kept / STATE_FILE).exists():",
        "    if False:",
        (ABA,),
    ),
    Mutation(
        "no fresh seed after a fallback to the previous state",
        "client_app/node.py",
        "                state.generator = dp_generator(True, 0)",
        "                pass",
        (RESEED,),
    ),
    Mutation(
        "the ClientApp's wire check removed",
        "client_app/app.py",
        "    check_reply(request.operation, fields)",
        "    pass",
        (WIRE_CHECK,),
    ),
    Mutation(
        "a re-sent reply's second release not charged on the node",
        "client_app/node.py",
        "            self._charge_rerelease(run_token, state, z_global)",
        "            pass",
        (RESENT,),
    ),
    Mutation(
        "the server books a re-released round as an independent step",
        "server_app/books.py",
        "    z_twice = combined_noise_multiplier(z_global, z_global)",
        "    z_twice = z_global",
        (REBOOKED,),
    ),
    Mutation(
        "the steps a node reports in its evaluation reply not booked",
        "server_app/strategy.py",
        "            for key, m in rows:\n                self.book_steps(key, m)",
        "            for key, m in rows:\n                pass",
        (BOUNDARY + "test_steps_whose_replies_never_reached_the_books_are_booked_from_the_evaluation_reply",),
    ),
    Mutation(
        "the replay guard removed: a re-sent round steps (and charges) again",
        "client_app/node.py",
        "            state.last_round == server_round\n",
        "            False\n",
        (RESENT,),
    ),
    Mutation(
        "the evaluation quota refuses past its limit only (>= changed to >)",
        "client_app/policy.py",
        "if ledger.evaluations_of(run_key) >= cfg.scheduled_evaluations:",
        "if ledger.evaluations_of(run_key) > cfg.scheduled_evaluations:",
        (EVALUATION_QUOTA,),
    ),
    Mutation(
        "the server's finiteness check on a reply removed",
        "server_app/strategy.py",
        "        if not torch.isfinite(grad).all():",
        "        if False:",
        ("tests/test_server.py::test_a_non_finite_reply_is_rejected_without_dp_too",),
    ),
    Mutation(
        "the server's norm check on a reply removed",
        "server_app/strategy.py",
        "            if not grad.norm() <= bound * (1 + 1e-4) + 1e-6:",
        "            if False:",
        (INVALID_REPLIES + "[<lambda>3]",),
    ),
    Mutation(
        "the duplicate-key filter lets a key through twice",
        "server_app/strategy.py",
        "shared = sorted(k for k, c in count.items() if c > 1)",
        "shared = sorted(k for k, c in count.items() if c > 2)",
        (DUPLICATE_KEYS,),
    ),
    Mutation(
        "a damaged ledger's possibly lost step not charged again",
        "common/privacy/ledger.py",
        "                last.steps[mechanism] += 1",
        "                last.steps[mechanism] += 0",
        (LEDGER_FALLBACK,),
    ),
    Mutation(
        "the calibrated-rounds guard on resume removed",
        "server_app/runner.py",
        "        and cfg.num_server_rounds > state.calibrated_rounds",
        "        and False",
        (CALIBRATED_ROUNDS,),
    ),
    Mutation(
        "the typed parser accepts a list where a number belongs",
        "server_app/replies.py",
        "    return isinstance(value, (int, float)) and not isinstance(value, bool)",
        "    return isinstance(value, (int, float, list)) and not isinstance(value, bool)",
        (WRONG_TYPE,),
    ),
    Mutation(
        "a separated worker takes the request's node config (a bigger lifetime budget, another data-dir)",
        "client_app/worker.py",
        "            request = dataclasses.replace(request, node_config=dict(self.node_config))",
        "            pass",
        (OWN_NODE_CONFIG,),
    ),
    Mutation(
        "the node's own global noise not added",
        "common/methods/engine.py",
        "global_sum = add_gaussian_noise(global_sum, global_std, generator, dp.secure_noise)",
        "global_sum = global_sum",
        (NODE_GLOBAL_NOISE,),
    ),
    Mutation(
        "a step's ledger charge left pending once its reply is stored (a retry may take it over)",
        "client_app/node.py",
        "            self._settle(run_token, server_round)\n",
        "            pass\n",
        (TAKEN_OVER + "[restored-from-backup]",),
    ),
    Mutation(
        "a pending ledger charge taken over after a fallback to the previous state",
        "client_app/node.py",
        "            not state.from_previous\n            and state.last_round < server_round\n",
        "            state.last_round < server_round\n",
        (TAKEN_OVER + "[damaged-while-its-charge-is-pending]",),
    ),
)


def tracked_files() -> list[str]:
    """The tree as git sees it: tracked files and untracked ones git does not ignore (no venv, no runs)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def copy_tree(destination: Path) -> None:
    for rel in tracked_files():
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """True if the tests pass in ``tree``; the copy's modules shadow any installed ones (PYTHONPATH, cwd)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "FLWR_TELEMETRY_ENABLED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def check_imports_from(tree: Path) -> None:
    """Guard against testing the working tree instead of the copy (e.g. an editable install winning)."""
    code = "import dpfpl.common, dpfpl.server_app, dpfpl.client_app; print(dpfpl.common.__file__, dpfpl.server_app.__file__, dpfpl.client_app.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if any(not Path(p).resolve().is_relative_to(tree.resolve()) for p in out.split()):
        raise SystemExit(f"the copy's modules are not the ones imported: {out}")


def apply(tree: Path, mutation: Mutation) -> str:
    """Apply ``mutation`` to the copy; return the original text (to restore)."""
    path = tree / mutation.path
    text = path.read_text()
    if text.count(mutation.old) != 1:
        raise SystemExit(
            f"mutation '{mutation.name}': the text to mutate occurs {text.count(mutation.old)} times "
            f"in {mutation.path} (expected once); update the mutation with the code"
        )
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--only", nargs="*", help="run only mutations whose name contains one of these")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.path} -> {', '.join(m.tests)}")
        return 0
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dpfpl-mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        check_imports_from(tree)
        baseline = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        ok, output = run_tests(tree, baseline)
        if not ok:
            print(f"the privacy tests fail on the unmutated copy:\n{output}")
            return 2
        print(f"baseline: {len(baseline)} privacy tests pass on the unmutated copy ({time.time() - started:.0f} s)")
        survivors = []
        for mutation in mutations:
            t0 = time.time()
            original = apply(tree, mutation)
            try:
                passed, _ = run_tests(tree, mutation.tests)
            finally:
                (tree / mutation.path).write_text(original)
            print(f"{'SURVIVED' if passed else 'caught  '}  {mutation.name}  ({time.time() - t0:.0f} s)", flush=True)
            if passed:
                survivors.append(mutation.name)
    print(f"{len(mutations) - len(survivors)}/{len(mutations)} mutations caught in {time.time() - started:.0f} s")
    if survivors:
        print("not caught: " + "; ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
