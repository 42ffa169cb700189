"""Node-local state on disk: the method's local tensors (p_L, or FedPGP's U and V), their optimizer state,
the node's RNG and accountant.

In deployment every message may be answered by another process (a fresh ClientApp, or the node's worker,
restarted in between), so the private state lives here and not in memory: the local prompt must survive
restarts and never leave the node. One safetensors file holds the tensors
and (as metadata) the JSON bookkeeping; it is written atomically, so a crash mid-write keeps the previous
state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpfpl.common.atomic import fsync_directory, previous_path, read_state, write_state
from dpfpl.common.optim import fold_into_mean
from dpfpl.common.privacy import PrivacyAccountant

from .identity import NODE_KEY_FILE, node_key  # noqa: F401  (the node's identity lives next to its state)

STATE_FILE = "local_state.safetensors"
RUNS_DIR = "runs"  # every other run's state, kept: a run that comes back resumes where it left off
log = logging.getLogger("dpfpl.client")


@dataclass
class NodeState:
    local: dict[str, torch.Tensor]
    generator: torch.Generator
    accountant: PrivacyAccountant
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    last_reply: dict[str, torch.Tensor] = field(default_factory=dict)  # what was sent for last_round
    noise_multiplier_local: float = 0.0
    last_round: int = 0
    run_key: str = ""
    extra: dict = field(default_factory=dict)
    # the published p_L: the running mean of its context over the rounds that enter publication (publish-average)
    local_average: torch.Tensor | None = None
    averaged_rounds: int = 0
    from_previous: bool = False  # loaded from the previous copy (the current file was damaged); not saved

    def average_for_publication(self, context: torch.Tensor) -> None:
        """Fold this round's local context into the published mean (saved with the step, in one write)."""
        self.local_average, self.averaged_rounds = fold_into_mean(self.local_average, self.averaged_rounds, context)

    def save(self, directory: Path) -> None:
        tensors = {"rng_state": self.generator.get_state()}
        tensors.update({f"local.{k}": v.contiguous() for k, v in self.local.items()})
        tensors.update({f"momentum.{k}": v.contiguous() for k, v in self.momentum.items()})
        tensors.update({f"reply.{k}": v.contiguous() for k, v in self.last_reply.items()})
        if self.local_average is not None:
            tensors["average.local-context"] = self.local_average.contiguous()
        meta = {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier_local": self.noise_multiplier_local,
            "last_round": self.last_round,
            "run_key": self.run_key,
            "extra": self.extra,
            "averaged_rounds": self.averaged_rounds,
        }
        write_state(Path(directory) / STATE_FILE, tensors, {"state": json.dumps(meta)})

    @classmethod
    def load(cls, directory: Path) -> NodeState | None:
        loaded = read_state(Path(directory) / STATE_FILE)  # falls back to the previous file if damaged
        if loaded is None:
            return None
        tensors, meta = loaded.tensors, json.loads(loaded.metadata["state"])
        accountant = PrivacyAccountant.from_state_dict(meta["accountant"])
        if loaded.from_previous and accountant.history:
            # The damaged state may belong to a step whose reply already left the node: charge that step
            # again (same mechanism) so a lost file can never make the node under-count its releases.
            accountant.history.append(accountant.history[-1])
        gen = torch.Generator()
        gen.set_state(tensors["rng_state"])
        return cls(
            local={k[len("local.") :]: v for k, v in tensors.items() if k.startswith("local.")},
            generator=gen,
            accountant=accountant,
            momentum={k[len("momentum.") :]: v for k, v in tensors.items() if k.startswith("momentum.")},
            last_reply={k[len("reply.") :]: v for k, v in tensors.items() if k.startswith("reply.")},
            noise_multiplier_local=float(meta["noise_multiplier_local"]),
            last_round=int(meta["last_round"]),
            run_key=meta["run_key"],
            extra=meta.get("extra", {}),
            local_average=tensors.get("average.local-context"),
            averaged_rounds=int(meta.get("averaged_rounds", 0)),
            from_previous=loaded.from_previous,
        )


def archive_dir(state_dir: Path, run_key: str) -> Path:
    """Where a run's state waits while another run is active (named by a digest: run keys are the server's)."""
    return Path(state_dir) / RUNS_DIR / hashlib.sha256(run_key.encode()).hexdigest()[:16]


def _move_state(src_dir: Path, dst_dir: Path) -> None:
    """Move a state file and its previous copy (the previous first: a crash in between leaves the current file
    where it was, and the next message retries)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    src, dst = src_dir / STATE_FILE, dst_dir / STATE_FILE
    if previous_path(src).exists():
        os.replace(previous_path(src), previous_path(dst))
    if src.exists():
        os.replace(src, dst)
    fsync_directory(dst_dir)
    fsync_directory(src_dir)


def activate_run(state_dir: Path, run_key: str) -> NodeState | None:
    """The state of ``run_key``, made the active one: the active state of another run is kept under
    ``runs/`` (never overwritten), and a run that was kept there comes back with its p_L, optimizer state and
    books (A -> B -> A resumes A). None: this run has no state on this node yet."""
    state_dir = Path(state_dir)
    active = NodeState.load(state_dir)
    if active is not None and active.run_key == run_key:
        return active
    if active is not None:
        _move_state(state_dir, archive_dir(state_dir, active.run_key or "old"))
        log.info("state of run %s kept under %s", active.run_key, RUNS_DIR)
    kept = archive_dir(state_dir, run_key)
    if (kept / STATE_FILE).exists() or previous_path(kept / STATE_FILE).exists():
        _move_state(kept, state_dir)
        log.info("run %s comes back: its state restored", run_key)
        return NodeState.load(state_dir)
    return None


def load_run_state(state_dir: Path, run_key: str) -> NodeState | None:
    """Read-only: the state of ``run_key``, whether it is the active run or one kept under ``runs/``."""
    active = NodeState.load(Path(state_dir))
    if active is not None and active.run_key == run_key:
        return active
    kept = archive_dir(state_dir, run_key)
    return NodeState.load(kept) if kept.is_dir() else None
