"""A seeded non-private run gives the same prompts as the recorded one: a guard for refactors.

Restructuring the round loop, the handlers or the configuration must not change what a run computes. This test
runs the whole app in-process (ServerApp round loop + three ClientApps, non-private DP-FPL, seed 7, two rounds
on the embedded default) and compares a fingerprint of every prompt it saved (the server's p_G and its
published average, each node's p_L and its published average) with the one recorded in
``tests/data/seeded_run_fingerprint.json``.

The fingerprint is each tensor's sum, its norm and 16 fixed entries, compared at a relative tolerance of 1e-4:
tight enough that any change in what is computed (an extra step, another batch, another order of the noise
draws, a different averaging) fails it, loose enough for the last bits of float32 arithmetic, which can differ
between CPUs. A change that is meant to alter training records a new fingerprint:

    DPFPL_RECORD_FINGERPRINT=1 python -m pytest -q tests/test_seeded_regression.py

and says why in its commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FINGERPRINT = Path(__file__).parent / "data" / "seeded_run_fingerprint.json"
SAMPLED = 16  # entries per tensor, at fixed seeded positions
RUN = {
    "method": "dpfpl",
    "num-clients": 3,
    "classes-per-client": 2,
    "min-clients": 3,
    "num-server-rounds": 2,
    "eval-every": 1,
    "eval-last": 1,
    "dp": False,
    "lr-global": 0.05,
    "lr-local": 0.05,
    "batch-size": 32,
    "seed": 7,
    "resume": False,
}


def fingerprint(tensor: torch.Tensor) -> dict:
    flat = tensor.detach().double().flatten()
    positions = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLED]
    return {
        "shape": list(tensor.shape),
        "sum": float(flat.sum()),
        "norm": float(flat.norm()),
        "entries": [float(flat[i]) for i in positions],
    }


def run_fingerprints(run_dir: Path) -> dict:
    """Every prompt the run saved: the server's checkpoint and each node's local state."""
    out = {}
    server = load_file(run_dir / "checkpoint.safetensors")
    for key in ("p_global", "p_global_average"):
        out[f"server/{key}"] = fingerprint(server[key])
    for node_dir in sorted((run_dir / "nodes").iterdir()):
        state = load_file(node_dir / "local_state.safetensors")
        for key in ("local.p_local", "average.local-context"):
            out[f"{node_dir.name}/{key}"] = fingerprint(state[key])
    return out


def test_a_seeded_non_private_run_saves_the_recorded_prompts(tmp_path, cache_dir):
    from dpfpl.inprocess import run_inprocess

    run_dir = tmp_path / "run"
    run_inprocess({**RUN, "run-dir": str(run_dir)}, num_nodes=3)
    got = run_fingerprints(run_dir)
    if os.environ.get("DPFPL_RECORD_FINGERPRINT") == "1":
        FINGERPRINT.parent.mkdir(exist_ok=True)
        FINGERPRINT.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"recorded {FINGERPRINT.name}")
    want = json.loads(FINGERPRINT.read_text())
    assert sorted(got) == sorted(want), "the run saved other prompts than the recorded run"
    for name, expected in want.items():
        actual = got[name]
        assert actual["shape"] == expected["shape"], name
        for field in ("sum", "norm"):
            assert actual[field] == pytest.approx(expected[field], rel=1e-4, abs=1e-6), f"{name} {field}"
        assert actual["entries"] == pytest.approx(expected["entries"], rel=1e-4, abs=1e-6), f"{name} entries"
