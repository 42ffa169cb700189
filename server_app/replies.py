"""The one typed parser of what nodes send: every reply's layout, and each value's type, range and size, checked
before any use. A node may be hostile; whatever it sends, the result is a parsed value or ``InvalidReply`` naming
the field and the reason, never a crash of the round loop.

The fields a reply may carry are the wire inventory's (``dpfpl.common.wire.INVENTORY``: the node sends nothing
else); this module adds what the server needs to trust each value. Sizes come from the server's own state
(the roster, p_G's shape), never from the node's word.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from dpfpl.common.wire import INVENTORY


class InvalidReply(ValueError):
    """A reply the server does not use; the text says which field and why."""


@dataclass(frozen=True)
class Spec:
    """What a metric's value may be: an integer or a real number, its range, and whether inf/nan may occur."""

    integer: bool = False
    low: float = -math.inf
    high: float = math.inf
    allow_inf: bool = False
    allow_nan: bool = False


_COUNT = Spec(integer=True, low=0, high=10**9)
_ACCURACY = Spec(low=0.0, high=1.0)
_SECONDS = Spec(low=0.0, high=10**7)
_EPSILON = Spec(low=0.0, allow_inf=True)
METRIC_SPECS: dict[str, Spec] = {
    "server-round": _COUNT,
    "run-tag": Spec(integer=True, low=0, high=2**62),
    "node-key": Spec(integer=True, low=1, high=2**62 - 1),
    "partition-id": _COUNT,
    "sample-rate": Spec(low=1e-12, high=1.0),
    "noise-multiplier-local": Spec(low=0.0, allow_inf=True),
    "noise-multiplier-global-node": Spec(low=0.0, high=1e6),
    "noisy-steps": _COUNT,
    "epsilon-local": _EPSILON,
    "epsilon-published": _EPSILON,
    "clientapp-age-seconds": _SECONDS,
    "client-seconds": _SECONDS,
    "batch-size": Spec(integer=True, low=0, high=10**9),
    "train-loss": Spec(low=0.0, high=1e6, allow_nan=True),  # NaN: an empty Poisson batch
    "local-acc": _ACCURACY,
    "neighbor-acc": _ACCURACY,
    "base-acc": _ACCURACY,
    "novel-acc": _ACCURACY,
    "hm": _ACCURACY,
    "local-loss": Spec(low=0.0, high=1e6, allow_nan=True),
}
MAX_BYTES = 1 << 16  # one public key, ciphertext or share: far above what the protocols produce


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_value(name: str, value: object) -> float | int:
    """One metric's value (an int stays an int), or InvalidReply."""
    spec = METRIC_SPECS.get(name)
    if spec is None:
        raise InvalidReply(f"metric '{name}' is not one a node sends")
    if not _is_number(value):
        raise InvalidReply(f"metric '{name}' is {type(value).__name__}, not a number")
    if isinstance(value, int):  # exact: a 62-bit key does not survive a float
        if not spec.low <= value <= spec.high:
            raise InvalidReply(f"metric '{name}' = {value} is outside [{spec.low:g}, {spec.high:g}]")
        return value
    x = float(value)
    if math.isnan(x):
        if spec.allow_nan:
            return x
        raise InvalidReply(f"metric '{name}' is NaN")
    if math.isinf(x) and not spec.allow_inf:
        raise InvalidReply(f"metric '{name}' is infinite")
    if spec.integer and math.isfinite(x) and not x.is_integer():
        raise InvalidReply(f"metric '{name}' = {x!r} is not an integer")
    if not spec.low <= x <= spec.high and not (spec.allow_inf and x == math.inf):
        raise InvalidReply(f"metric '{name}' = {x!r} is outside [{spec.low:g}, {spec.high:g}]")
    return x


def _allowed(operation: str, record: str) -> set[str]:
    return {k for (op, r, k) in INVENTORY if op == operation and r == record}


def reply_metrics(msg: Message, operation: str, required: Iterable[str] = ("server-round", "run-tag")) -> dict:
    """The checked metrics of a reply: exactly one MetricRecord 'metrics' (when the operation has metrics), each
    key one the inventory lists for this operation, each value in its range."""
    if msg.has_error():
        raise InvalidReply("the node reported an error")
    content = msg.content
    if "metrics" not in content.metric_records:
        raise InvalidReply("the reply has no 'metrics' record")
    if set(content.metric_records.keys()) != {"metrics"}:
        raise InvalidReply(f"unexpected metric records {sorted(content.metric_records.keys())}")
    allowed = _allowed(operation, "metrics")
    raw = dict(content["metrics"])
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise InvalidReply(f"metrics {unknown} are not ones a {operation} reply carries")
    missing = [k for k in required if k not in raw]
    if missing:
        raise InvalidReply(f"the reply lacks {missing}")
    out = {}
    for key, value in raw.items():
        x = metric_value(key, value)
        out[key] = int(x) if METRIC_SPECS[key].integer and isinstance(x, float) and math.isfinite(x) else x
    return out


def config_fields(msg: Message, record: str, keys: set[str], optional: set[str] = frozenset()) -> dict:
    """The one ConfigRecord ``record`` of a reply, with exactly ``keys`` (and any of ``optional``), and nothing else
    in the reply."""
    if msg.has_error():
        raise InvalidReply("the node reported an error")
    content = msg.content
    if record not in content.config_records:
        raise InvalidReply(f"the reply has no '{record}' record")
    extra = [r for r in content.keys() if r not in (record, "metrics")]
    if extra or len(content.array_records):
        raise InvalidReply(f"the reply carries records it should not: {sorted(content.keys())}")
    values = dict(content[record])
    if not keys <= set(values) <= keys | optional:
        expected = sorted(keys) + ([f"optionally {sorted(optional)}"] if optional else [])
        raise InvalidReply(f"'{record}' holds {sorted(values)}, expected {expected}")
    return values


def blob(value: object, what: str, size: int | None = None) -> bytes:
    """A bytes value (a key, a ciphertext, a share) of bounded size."""
    if not isinstance(value, bytes):
        raise InvalidReply(f"{what} is {type(value).__name__}, not bytes")
    if size is not None and len(value) != size:
        raise InvalidReply(f"{what} is {len(value)} bytes, not {size}")
    if len(value) > MAX_BYTES:
        raise InvalidReply(f"{what} is {len(value)} bytes (> {MAX_BYTES})")
    return value


def blobs(value: object, what: str, max_items: int) -> list[bytes]:
    if not isinstance(value, list) or len(value) > max_items:
        raise InvalidReply(f"{what} is not a list of at most {max_items} items")
    return [blob(v, f"{what}[{i}]") for i, v in enumerate(value)]


def node_ids(value: object, what: str, allowed: set[int]) -> list[int]:
    """A list of distinct node ids (or roster indices), each one of ``allowed``."""
    if not isinstance(value, list) or len(value) > len(allowed):
        raise InvalidReply(f"{what} is not a list of at most {len(allowed)} ids")
    out = []
    for v in value:
        if not _is_number(v) or not float(v).is_integer() or int(v) not in allowed:
            raise InvalidReply(f"{what} holds {v!r}, not one of the expected ids")
        out.append(int(v))
    if len(set(out)) != len(out):
        raise InvalidReply(f"{what} repeats an id")
    return out


def id_to_blob(ids: object, values: object, what: str, allowed: set[int]) -> dict[int, bytes]:
    """Two parallel lists (ids and bytes) as a mapping, both checked."""
    keys = node_ids(ids, f"{what} ids", allowed)
    items = blobs(values, what, len(allowed))
    if len(keys) != len(items):
        raise InvalidReply(f"{what}: {len(keys)} ids for {len(items)} values")
    return dict(zip(keys, items))


def masked_input(msg: Message, size: int) -> np.ndarray:
    """A secure-aggregation masked input: one ArrayRecord 'secagg' with one uint64 field vector 'masked' of ``size``
    (its range, below the field's prime, is the protocol's check)."""
    if msg.has_error():
        raise InvalidReply("the node reported an error")
    content = msg.content
    if set(content.keys()) != {"secagg"} or set(content.array_records.keys()) != {"secagg"}:
        raise InvalidReply(f"the reply holds {sorted(content.keys())}, not one array record 'secagg'")
    if set(content["secagg"].keys()) != {"masked"}:
        raise InvalidReply("'secagg' must hold exactly 'masked'")
    array = content["secagg"]["masked"]
    if array.dtype != "uint64" or tuple(array.shape) != (size,):
        raise InvalidReply(f"masked is {array.dtype}{tuple(array.shape)}, expected uint64({size},)")
    try:
        values = np.asarray(array.numpy())
    except (ValueError, TypeError) as err:
        raise InvalidReply(f"masked does not decode: {err}") from None
    if values.shape != (size,) or values.dtype != np.uint64:
        raise InvalidReply(f"masked decodes to shape {values.shape}, expected ({size},)")
    return values
