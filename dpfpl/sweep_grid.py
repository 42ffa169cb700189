"""A sweep's grid: the spec (methods x epsilons x seeds x ranks), its runs and where each one lives. Shared by
the sweep that runs them (``dpfpl.sweep``) and the report that reads what they wrote (``dpfpl.sweep_report``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .common.config import MethodName, RunConfig
from .common.method_specs import RANKED_METHODS
from .common.metrics import ACCURACY_KEYS

__all__ = [
    "ACCURACY_KEYS",
    "ACCURACY_TITLES",
    "ERROR_FILE",
    "NO_DP",
    "RUN_LABEL",
    "SWEEP_KEYS",
    "SweepRun",
    "SweepSpec",
    "expand",
    "run_dir_of",
]

# Methods whose local part is factorized: only they are run once per rank.
# Run-config keys the sweep sets for each run; the base overrides may not set them.
SWEEP_KEYS = ("method", "dp", "target-epsilon", "seed", "rank", "run-dir")
ACCURACY_TITLES = {
    "local-acc": "Local accuracy",
    "neighbor-acc": "Neighbor accuracy",
    "base-acc": "Base accuracy",
    "novel-acc": "Novel accuracy",
    "hm": "HM (local, base, novel)",
}
RUN_LABEL = "sweep-run.json"
ERROR_FILE = "error.txt"
NO_DP = "none"

Epsilon = float | Literal["none"]


class SweepSpec(BaseModel):
    """What to run. ``base`` holds run-config overrides (hyphenated keys) shared by every run."""

    model_config = ConfigDict(extra="forbid")

    methods: list[MethodName] = Field(min_length=1)
    epsilons: list[Epsilon] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    ranks: list[int] = Field(default_factory=lambda: [RunConfig.field_default("rank")], min_length=1)
    base: dict[str, Any] = Field(default_factory=dict)
    out: str = "runs/sweep"
    runtime: Literal["inprocess", "flower"] = "inprocess"
    num_nodes: int | None = Field(None, ge=1)  # default: num-clients of the run config
    node_config: dict[str, Any] = Field(default_factory=dict)  # in-process: added to every node's config
    workers: int = Field(1, ge=1)  # runs at a time, each in its own process with cores/workers threads
    command: str = ""  # how the sweep was started, for the table's header

    @field_validator("epsilons", mode="before")
    @classmethod
    def _none_spellings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [NO_DP if v is None or (isinstance(v, str) and v.strip().lower() == NO_DP) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        for name in ("methods", "epsilons", "seeds", "ranks"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
        if any(e != NO_DP and not (0 < e < math.inf) for e in self.epsilons):
            raise ValueError(f"epsilons must be '{NO_DP}' or positive finite numbers: {self.epsilons}")
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be >= 1: {self.ranks}")
        taken = sorted(set(self.base) & set(SWEEP_KEYS))
        if taken:
            raise ValueError(f"the sweep sets {taken} for each run; remove them from the base overrides")
        if self.base.get("resume", True) is not True:
            raise ValueError("a sweep resumes its runs (resume = true); remove resume = false from the overrides")
        return self


@dataclass(frozen=True)
class SweepRun:
    """One cell of the grid: a method at one epsilon (None: no DP), rank (None: no factors) and seed."""

    method: str
    epsilon: float | None
    rank: int | None
    seed: int

    @property
    def epsilon_label(self) -> str:
        return NO_DP if self.epsilon is None else f"{self.epsilon:g}"

    @property
    def name(self) -> str:
        rank = "na" if self.rank is None else str(self.rank)
        return f"{self.method}_eps-{self.epsilon_label}_rank-{rank}_seed-{self.seed}"

    def overrides(self, spec: SweepSpec, run_dir: Path) -> dict:
        """The run's config overrides: the spec's base plus this cell's coordinates."""
        config = {
            **spec.base,
            "method": self.method,
            "dp": self.epsilon is not None,
            "seed": self.seed,
            "run-dir": str(run_dir.resolve()),
            "resume": True,
        }
        if self.epsilon is not None:
            config["target-epsilon"] = self.epsilon
        if self.rank is not None:
            config["rank"] = self.rank
        if self.method == "zeroshot":
            # its numbers are round 0's (the hand-crafted prompt); one round keeps the run valid and cheap
            config["num-server-rounds"] = 1
        return config

    def label(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "epsilon": self.epsilon_label,
            "rank": self.rank,
            "seed": self.seed,
        }


def expand(spec: SweepSpec) -> list[SweepRun]:
    """The runs of a sweep, seed-major. ``zeroshot`` is one run per seed (it neither trains nor spends
    privacy budget, so epsilon and rank do not apply); rank multiplies only the factorized methods."""
    runs = []
    for seed in spec.seeds:
        for method in spec.methods:
            if method == "zeroshot":
                runs.append(SweepRun(method, None, None, seed))
                continue
            ranks = spec.ranks if method in RANKED_METHODS else [None]
            for eps in spec.epsilons:
                for rank in ranks:
                    runs.append(SweepRun(method, None if eps == NO_DP else float(eps), rank, seed))
    return runs


def run_dir_of(out: Path, run: SweepRun) -> Path:
    return Path(out) / "runs" / run.name
