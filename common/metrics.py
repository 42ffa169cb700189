"""The names of the metrics the nodes report and the server records: one set of constants for both apps and
the tools that read metrics.jsonl and summary.json; and the one reader and appender of metrics.jsonl, which every
tool uses, so that a line torn by a kill mid-append is handled the same way everywhere."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from .atomic import DiskFullError, is_disk_full

log = logging.getLogger("dpfpl.metrics")

LOCAL_ACC = "local-acc"  # accuracy on the node's own test split (its own classes)
NEIGHBOR_ACC = "neighbor-acc"  # on the other nodes' classes
BASE_ACC = "base-acc"  # base-novel protocol: the seen classes
NOVEL_ACC = "novel-acc"  # base-novel protocol: the classes no node trained on
HM = "hm"  # a node's harmonic mean of local, base and novel accuracy
HM_OF_MEANS = "hm-of-means"  # FedPGP's HM: of the three means over clients
LOCAL_LOSS = "local-loss"
GLOBAL_NOISE_STD = "global-noise-std"

# per-client accuracies, averaged over clients (unweighted, as the papers report)
ACCURACY_KEYS: tuple[str, ...] = (LOCAL_ACC, NEIGHBOR_ACC, BASE_ACC, NOVEL_ACC, HM)
# what a node's evaluation reply carries and the server averages
EVALUATION_KEYS: tuple[str, ...] = (*ACCURACY_KEYS, LOCAL_LOSS)
# what a run's summary reports
SUMMARY_ACCURACY_KEYS: tuple[str, ...] = (*ACCURACY_KEYS, HM_OF_MEANS)


# ------------------------------------------------------------------ the run's metrics log (metrics.jsonl)
# One JSON object per line, appended after each round. A process killed mid-append (or a disk that filled up)
# leaves the last line torn; everything before it was written whole. Readers and the next append deal with
# that one case here, so that a torn tail costs its line (the round is run or restored again on resume), never
# the resume itself; a damaged line anywhere else is not a torn append and is refused, named.


class MetricsLogError(ValueError):
    """A line of the metrics log other than the last one is not a JSON object."""


def _parse_line(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8 text
        return None
    return record if isinstance(record, dict) else None


def read_metrics_log(path: str | Path) -> list[dict]:
    """The records of a metrics log, oldest first (none if the file does not exist). A last line that is not a
    whole JSON object is a torn append: dropped with a warning. Any other such line raises
    ``MetricsLogError`` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(numbered):
        record = _parse_line(line)
        if record is not None:
            records.append(record)
        elif i == len(numbered) - 1:
            log.warning("%s: line %d is a torn append (%d bytes, not a whole JSON object): dropped", path, n, len(line))
        else:
            raise MetricsLogError(
                f"{path}, line {n}: not a JSON object ({line[:80]!r}). Only the last line can be torn by an "
                "interrupted append; a damaged line before it means the file was changed or damaged otherwise. "
                "Restore it from a backup, or remove the line to go on without that round's record"
            )
    return records


def append_metrics_record(path: str | Path, record: dict) -> None:
    """Append one record as a line. A torn last line left by an interrupted append is cut off first (logged),
    and a whole last line without its newline gets one, so the new record never lands on another's line."""
    path = Path(path)
    try:
        _append(path, record)
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on device while appending to {path} ({err}): its last line may be left torn, which "
            "the next read and append drop. Free space on its file system and resume the run: the checkpoint "
            "restores the round's line",
            str(path),
        ) from err


def _append(path: Path, record: dict) -> None:
    with open(path, "a+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(max(0, size - 1))
            if fh.read(1) != b"\n":
                fh.seek(0)
                data = fh.read()
                start = data.rfind(b"\n") + 1
                tail = data[start:]
                if _parse_line(tail.decode("utf-8", errors="replace")) is None:
                    log.warning("%s: cutting off a torn last line (%d bytes) before appending", path, len(tail))
                    fh.truncate(start)
                else:
                    fh.write(b"\n")
        fh.write((json.dumps(record) + "\n").encode())
        fh.flush()
