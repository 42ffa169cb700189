"""Node-local state on disk: the method's local tensors (p_L, or FedPGP's U and V), their optimizer state,
the node's RNG and accountant.

In deployment every message may be answered by another process (a fresh ClientApp, or the node's worker,
restarted in between), so the private state lives here and not in memory: the local prompt must survive
restarts and never leave the node. One safetensors file holds the tensors
and (as metadata) the JSON bookkeeping; it is written atomically, so a crash mid-write keeps the previous
state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpfpl.common.atomic import read_state, write_state
from dpfpl.common.privacy import PrivacyAccountant

from .identity import NODE_KEY_FILE, node_key  # noqa: F401  (the node's identity lives next to its state)

STATE_FILE = "local_state.safetensors"


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

    def save(self, directory: Path) -> None:
        tensors = {"rng_state": self.generator.get_state()}
        tensors.update({f"local.{k}": v.contiguous() for k, v in self.local.items()})
        tensors.update({f"momentum.{k}": v.contiguous() for k, v in self.momentum.items()})
        tensors.update({f"reply.{k}": v.contiguous() for k, v in self.last_reply.items()})
        meta = {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier_local": self.noise_multiplier_local,
            "last_round": self.last_round,
            "run_key": self.run_key,
            "extra": self.extra,
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
        )
