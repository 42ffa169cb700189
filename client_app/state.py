"""Node-local state on disk: the method's local tensors (p_L, or FedPGP's U and V), their optimizer state,
the node's RNG and accountant.

In deployment every message starts a fresh ClientApp process, so nothing may live in module globals;
the local prompt must survive restarts and never leave the node. One safetensors file holds the tensors
and (as metadata) the JSON bookkeeping; it is written atomically, so a crash mid-write keeps the previous
state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.atomic import read_tensors, write_tensors
from common.privacy import PrivacyAccountant

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
        write_tensors(Path(directory) / STATE_FILE, tensors, metadata={"state": json.dumps(meta)})

    @classmethod
    def load(cls, directory: Path) -> "NodeState | None":
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["state"])
        tensors = read_tensors(path)
        gen = torch.Generator()
        gen.set_state(tensors["rng_state"])
        return cls(
            local={k[len("local."):]: v for k, v in tensors.items() if k.startswith("local.")},
            generator=gen,
            accountant=PrivacyAccountant.from_state_dict(meta["accountant"]),
            momentum={k[len("momentum."):]: v for k, v in tensors.items() if k.startswith("momentum.")},
            last_reply={k[len("reply."):]: v for k, v in tensors.items() if k.startswith("reply.")},
            noise_multiplier_local=float(meta["noise_multiplier_local"]),
            last_round=int(meta["last_round"]),
            run_key=meta["run_key"],
            extra=meta.get("extra", {}),
        )
