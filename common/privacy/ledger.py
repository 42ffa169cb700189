"""A node's privacy ledger: every noisy release it ever made from its records, across every run.

Why a ledger beside each run's accountant: every run trains on the same records, so their charges compose.
A run's own accountant (in its node state) says what that run spent; only the ledger says what the records
have spent in all, and only the ledger can refuse a run that would go past the node's ``lifetime-epsilon``.

It is written *ahead* of each release (``charge`` before the step's reply is built): a crash between the
charge and the reply over-counts by one step, never under-counts. Each charge is marked pending under its round
until the step's reply is built and stored with the node's state (``settle``). A charge still pending belongs to
an attempt that released nothing (a crash or a full disk came first): when the same round comes again, the retry
takes that charge over instead of adding a second one (``reuse_pending``). The file is JSON, written atomically
(temporary file, fsync, rename, directory fsync), with the previous version kept as ``ledger.json.prev`` and a
SHA-256 digest over its content; a write that fails (a full disk) leaves both as they were. A damaged current
file falls back to the previous one, charged one extra step of its most recent mechanism (the step whose entry
may have been lost): a damaged ledger can cost budget, never hide a release. A ledger that neither copy can read
stops the node with a clear error: starting from zero would forget what was released.

It also counts the evaluation replies the node answered (their time, per run): an evaluation is outside
epsilon (accuracy and loss on the node's records), so a node can bound how many it answers per run and per day
(node config ``evaluations-per-day``), and the count survives restarts like the charges do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..atomic import CorruptStateError, previous_path, write_json
from .accountant import combined_noise_multiplier, epsilon_of_groups

LEDGER_FILE = "ledger.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunEntry:
    """One run's releases: (z_L, z_G, q) -> how many steps used that mechanism."""

    first: str
    last: str
    steps: dict[tuple[float, float, float], int] = field(default_factory=dict)
    # the round and mechanism of a charge whose reply is not yet built and stored (PrivacyLedger.settle clears it):
    # what a retry of that round takes over, since the attempt it was charged for released nothing
    pending: tuple[int, tuple[float, float, float]] | None = None

    @property
    def count(self) -> int:
        return sum(self.steps.values())

    def to_json(self) -> dict:
        out = {
            "first": self.first,
            "last": self.last,
            "steps": [[z_l, z_g, q, n] for (z_l, z_g, q), n in sorted(self.steps.items())],
        }
        if self.pending is not None:
            out["pending"] = [self.pending[0], *self.pending[1]]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> RunEntry:
        steps = {(float(z_l), float(z_g), float(q)): int(n) for z_l, z_g, q, n in obj["steps"]}
        pending = None
        if obj.get("pending") is not None:
            server_round, z_l, z_g, q = obj["pending"]
            pending = (int(server_round), (float(z_l), float(z_g), float(q)))
        return cls(str(obj["first"]), str(obj["last"]), steps, pending)


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
            for entry in runs.values():  # an older copy's pending charge may be for a step that was released
                entry.pending = None
            last = max(runs.values(), key=lambda r: r.last, default=None)
            if last is not None and last.steps:
                # the lost write may have charged one more step: charge it again, conservatively (it may as well
                # have only settled a charge the previous copy holds: then this over-counts by one, never under)
                mechanism = max(last.steps, key=lambda m: last.steps[m])
                last.steps[mechanism] += 1
            if evaluations:  # ... or counted one more evaluation: count it again, in the run that had the last one
                latest = max(evaluations, key=lambda key: max(evaluations[key], default=""))
                evaluations[latest].append(_now())
            return ledger

    def save(self) -> None:
        """Write the ledger, the current file becoming ``ledger.json.prev``. A failed write (``DiskFullError``
        on a full disk) leaves both files as they were: the charge it carried is not on disk, and the step it
        was for is refused with it."""
        runs = {key: entry.to_json() for key, entry in self.runs.items()}
        content = {"runs": runs, "sha256": self._digest(runs, self.evaluations)}
        if self.evaluations:
            content["evaluations"] = self.evaluations
        write_json(self.path, content, keep_previous=True)

    # ------------------------------------------------------------------ evaluations
    def record_evaluation(self, run_key: str) -> None:
        self.evaluations.setdefault(run_key, []).append(_now())

    def evaluations_of(self, run_key: str) -> int:
        return len(self.evaluations.get(run_key, []))

    def evaluations_since(self, hours: float = 24.0) -> int:
        """Evaluations answered in the last ``hours``, every run together."""
        cutoff = (datetime.now(UTC) - timedelta(hours=hours)).isoformat(timespec="seconds")
        return sum(t >= cutoff for times in self.evaluations.values() for t in times)

    # ------------------------------------------------------------------ books
    def charge(
        self,
        run_key: str,
        z_local: float,
        z_global: float,
        sample_rate: float,
        count: int = 1,
        server_round: int | None = None,
    ) -> None:
        """Book ``count`` steps of one mechanism; ``server_round``: the step of that round, pending until its
        reply is built and stored (``settle``; a retry of the round meanwhile takes it over, ``reuse_pending``)."""
        now = _now()
        entry = self.runs.setdefault(run_key, RunEntry(now, now))
        mechanism = (float(z_local), float(z_global), float(sample_rate))
        entry.steps[mechanism] = entry.steps.get(mechanism, 0) + count
        entry.last = now
        entry.pending = None if server_round is None else (int(server_round), mechanism)

    def reuse_pending(
        self, run_key: str, server_round: int, z_local: float, z_global: float, sample_rate: float
    ) -> bool:
        """Take over the charge of an earlier attempt at ``server_round`` that is still pending: that attempt's
        reply was never built and stored (``settle`` was not reached), so nothing of it was released. The charge
        moves to this attempt's mechanism if the server changed it. False: there is no such charge."""
        entry = self.runs.get(run_key)
        if entry is None or entry.pending is None or entry.pending[0] != int(server_round):
            return False
        if entry.steps.get(entry.pending[1], 0) <= 0:  # not in the books (cannot happen unless edited): charge anew
            return False
        mechanism = (float(z_local), float(z_global), float(sample_rate))
        if entry.pending[1] != mechanism:
            self.move(run_key, entry.pending[1], mechanism)
        entry.pending = (int(server_round), mechanism)
        return True

    def settle(self, run_key: str, server_round: int) -> bool:
        """The step of ``server_round`` has its reply built and stored with the node's state: its charge is no
        longer pending (from now on a release may have left). True: there was a pending charge to settle."""
        entry = self.runs.get(run_key)
        if entry is None or entry.pending is None or entry.pending[0] != int(server_round):
            return False
        entry.pending = None
        return True

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
