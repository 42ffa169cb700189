"""A node's privacy ledger: every noisy release it ever made from its records, across every run.

Why a ledger beside each run's accountant: every run trains on the same records, so their charges compose.
A run's own accountant (in its node state) says what that run spent; only the ledger says what the records
have spent in all, and only the ledger can refuse a run that would go past the node's ``lifetime-epsilon``.

It is written *ahead* of each release (``charge`` before the step's reply is built): a crash between the
charge and the reply over-counts by one step, never under-counts. The file is JSON, written atomically
(temporary file, fsync, rename, directory fsync), with the previous version kept as ``ledger.json.prev`` and
a SHA-256 digest over its content. A damaged current file falls back to the previous one, charged one
extra step of its most recent mechanism (the step whose entry may have been lost): a damaged ledger can
cost budget, never hide a release. A ledger that neither copy can read stops the node with a clear error:
starting from zero would forget what was released.

It also counts the evaluation replies the node answered (their time, per run): an evaluation is outside
epsilon (accuracy and loss on the node's records), so a node can bound how many it answers per run and per day
(node config ``evaluations-per-day``), and the count survives restarts like the charges do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..atomic import CorruptStateError, previous_path, write_json
from .accountant import combined_noise_multiplier, epsilon_of_groups

LEDGER_FILE = "ledger.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunEntry:
    """One run's releases: (z_L, z_G, q) -> how many steps used that mechanism."""

    first: str
    last: str
    steps: dict[tuple[float, float, float], int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.steps.values())

    def to_json(self) -> dict:
        return {
            "first": self.first,
            "last": self.last,
            "steps": [[z_l, z_g, q, n] for (z_l, z_g, q), n in sorted(self.steps.items())],
        }

    @classmethod
    def from_json(cls, obj: dict) -> RunEntry:
        steps = {(float(z_l), float(z_g), float(q)): int(n) for z_l, z_g, q, n in obj["steps"]}
        return cls(str(obj["first"]), str(obj["last"]), steps)


def composed_epsilon(groups: dict[tuple[float, float, float], int], delta: float) -> float:
    """epsilon of every release in ``groups`` on the same records, each step one Poisson-subsampled Gaussian with
    the combined multiplier of its two releases (the published-prompt mechanism, which bounds both)."""
    return epsilon_of_groups(
        [(combined_noise_multiplier(z_l, z_g), q, n) for (z_l, z_g, q), n in groups.items()], delta
    )


class PrivacyLedger:
    """The node's ledger in ``STATE/ledger.json``. Load it, ``charge`` a step, ``save`` -- in that order, before
    the release."""

    def __init__(
        self, path: Path, runs: dict[str, RunEntry] | None = None, evaluations: dict[str, list[str]] | None = None
    ) -> None:
        self.path = Path(path)
        self.runs: dict[str, RunEntry] = runs or {}
        self.evaluations: dict[str, list[str]] = evaluations or {}  # run -> UTC times of the answered evaluations

    @classmethod
    def of(cls, state_dir: Path) -> PrivacyLedger:
        return cls.load(Path(state_dir) / LEDGER_FILE)

    # ------------------------------------------------------------------ disk
    @staticmethod
    def _digest(runs: dict, evaluations: dict) -> str:
        # a ledger without evaluations keeps the digest of the format before they were counted
        content = {"runs": runs, "evaluations": evaluations} if evaluations else runs
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @classmethod
    def _read(cls, path: Path) -> tuple[dict[str, RunEntry], dict[str, list[str]]]:
        obj = json.loads(path.read_text())
        evaluations = obj.get("evaluations", {})
        if obj.get("sha256") != cls._digest(obj["runs"], evaluations):
            raise ValueError("digest mismatch")
        runs = {key: RunEntry.from_json(entry) for key, entry in obj["runs"].items()}
        return runs, {str(key): [str(t) for t in times] for key, times in evaluations.items()}

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        path = Path(path)
        prev = previous_path(path)
        if not path.exists() and not prev.exists():
            return cls(path)
        try:
            return cls(path, *cls._read(path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            try:
                runs, evaluations = cls._read(prev)
            except (OSError, ValueError, KeyError, TypeError):
                raise CorruptStateError(
                    f"the privacy ledger {path} is damaged ({err}) and so is its previous copy {prev.name}; the "
                    "node refuses to train rather than forget what it released. Restore the file from a backup "
                    "(or, knowingly, move it away to start a new ledger)"
                ) from err
            ledger = cls(path, runs, evaluations)
            last = max(runs.values(), key=lambda r: r.last, default=None)
            if last is not None and last.steps:
                # the lost write may have charged one more step: charge it again, conservatively
                mechanism = max(last.steps, key=lambda m: last.steps[m])
                last.steps[mechanism] += 1
            if evaluations:  # ... or counted one more evaluation: count it again, in the run that had the last one
                latest = max(evaluations, key=lambda key: max(evaluations[key], default=""))
                evaluations[latest].append(_now())
            return ledger

    def save(self) -> None:
        runs = {key: entry.to_json() for key, entry in self.runs.items()}
        content = {"runs": runs, "sha256": self._digest(runs, self.evaluations)}
        if self.evaluations:
            content["evaluations"] = self.evaluations
        if self.path.exists():
            os.replace(self.path, previous_path(self.path))
        write_json(self.path, content)

    # ------------------------------------------------------------------ evaluations
    def record_evaluation(self, run_key: str) -> None:
        self.evaluations.setdefault(run_key, []).append(_now())

    def evaluations_of(self, run_key: str) -> int:
        return len(self.evaluations.get(run_key, []))

    def evaluations_since(self, hours: float = 24.0) -> int:
        """Evaluations answered in the last ``hours``, every run together."""
        cutoff = (datetime.now(timezone.utc) - timedelta(hours=hours)).isoformat(timespec="seconds")
        return sum(t >= cutoff for times in self.evaluations.values() for t in times)

    # ------------------------------------------------------------------ books
    def charge(self, run_key: str, z_local: float, z_global: float, sample_rate: float, count: int = 1) -> None:
        now = _now()
        entry = self.runs.setdefault(run_key, RunEntry(now, now))
        mechanism = (float(z_local), float(z_global), float(sample_rate))
        entry.steps[mechanism] = entry.steps.get(mechanism, 0) + count
        entry.last = now

    def move(self, run_key: str, old: tuple[float, float, float], new: tuple[float, float, float]) -> None:
        """Re-book one step of ``run_key`` from mechanism ``old`` to ``new`` (a second release of its batch made it
        a stronger mechanism); a step the ledger does not hold is charged as ``new``."""
        entry = self.runs.setdefault(run_key, RunEntry(_now(), _now()))
        old = tuple(float(x) for x in old)
        if entry.steps.get(old, 0) > 0:
            entry.steps[old] -= 1
            if not entry.steps[old]:
                del entry.steps[old]
        self.charge(run_key, *new)

    def epsilon(self, delta: float, run_key: str | None = None) -> float:
        """The composed epsilon of one run (``run_key``) or of every run."""
        return self.epsilon_with(delta, {}, run_key)

    def epsilon_with(
        self, delta: float, extra: dict[tuple[float, float, float], int], run_key: str | None = None
    ) -> float:
        """The composed epsilon if ``extra`` steps were added (to ``run_key`` or to the whole ledger)."""
        groups = dict(extra)
        for key, entry in self.runs.items():
            if run_key is None or key == run_key:
                for mechanism, n in entry.steps.items():
                    groups[mechanism] = groups.get(mechanism, 0) + n
        return composed_epsilon(groups, delta)

    def rows(self, delta: float) -> list[dict]:
        """One row per run, oldest first: what ``dpfpl ledger`` prints."""
        out = []
        for key, entry in sorted(self.runs.items(), key=lambda kv: kv[1].first):
            out.append(
                {
                    "run": key,
                    "first": entry.first,
                    "last": entry.last,
                    "steps": entry.count,
                    "epsilon": self.epsilon(delta, key),
                }
            )
        return out

    def describe(self, delta: float, limit: float | None = None) -> str:
        lines = [f"{'run':<18} {'steps':>6} {'epsilon':>9}  first / last release (UTC)"]
        for row in self.rows(delta):
            lines.append(f"{row['run']:<18} {row['steps']:>6} {row['epsilon']:>9.4f}  {row['first']} / {row['last']}")
        total = self.epsilon(delta)
        lines.append(f"{'composed, all runs':<18} {sum(r.count for r in self.runs.values()):>6} {total:>9.4f}")
        if limit is not None:
            lines.append(f"lifetime-epsilon {limit:g} (delta {delta:g})")
        if self.evaluations:
            answered = sum(len(times) for times in self.evaluations.values())
            lines.append(
                f"evaluation replies (outside epsilon): {answered} in all, {self.evaluations_since()} in the last 24 h"
            )
        return "\n".join(lines)
