"""Members, non-members and shadow data for a membership-inference experiment on the embedded demo data.

Everything is drawn from the demo *train* split: the demo backbone was pretrained on it, so members and
non-members are equally familiar to the frozen backbone and the attack can only detect what the *prompt*
learned. (Drawing non-members from the test split would let the attack detect the backbone's own
membership instead.) The pool of the chosen classes is shuffled once: the target's members and its
non-members come first, the rest is the shadow pool, disjoint from both, from which each shadow draws its
own members and non-members.

Every split is *stratified by class*: members and non-members hold the same number of records of each class
(as even as the count allows). Otherwise a prompt that is better on some classes than others would score
members and non-members differently from the class mix alone, and the attack would "detect" that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MembershipSplit:
    target_in: np.ndarray  # indices of the records the target trains on
    target_out: np.ndarray  # held-out records of the same classes, never trained on
    shadow_pool: np.ndarray  # disjoint from both: the attacker's data from the same distribution

    def shadow_sets(self, count: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``count`` (members, non-members) pairs of ``size`` each from the shadow pool (pairs may overlap
        across shadows, as in Shokri et al.; within a pair they are disjoint)."""
        if 2 * size > len(self.shadow_pool):
            raise ValueError(
                f"the shadow pool has {len(self.shadow_pool)} records; each shadow needs {2 * size} "
                "(members + non-members): use fewer members or more classes"
            )
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(count):
            ins, outs, _ = _stratified_pair(self.shadow_pool, self.labels, size, rng, "the shadow pool")
            out.append((ins, outs))
        return out

    labels: np.ndarray | None = None  # labels of all records (indexed by the arrays above): for stratification


def _per_class_counts(available: dict[int, int], total: int) -> dict[int, int]:
    """``total`` records spread over the classes as evenly as their sizes allow (a class short of its share
    gives the rest to the others)."""
    counts = {c: 0 for c in available}
    left = total
    while left > 0:
        open_classes = [c for c in sorted(available) if counts[c] < available[c]]
        if not open_classes:
            break
        share = max(1, left // len(open_classes))
        for c in open_classes:
            take = min(share, available[c] - counts[c], left)
            counts[c] += take
            left -= take
            if left == 0:
                break
    return counts


def _stratified_pair(
    pool: np.ndarray, labels: np.ndarray | None, size: int, rng: np.random.Generator, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two disjoint sets of ``size`` from ``pool`` with equal per-class counts, and the rest of the pool."""
    if labels is None:  # no labels known: a plain random split
        perm = rng.permutation(pool)
        return np.sort(perm[:size]), np.sort(perm[size : 2 * size]), perm[2 * size :]
    by_class = {int(c): rng.permutation(pool[labels[pool] == c]) for c in np.unique(labels[pool])}
    counts = _per_class_counts({c: len(idx) // 2 for c, idx in by_class.items()}, size)
    if sum(counts.values()) < size:
        raise ValueError(
            f"{what} has {len(pool)} records; {size} members and as many non-members with the same "
            "records per class need more: use fewer members or more classes"
        )
    ins = np.concatenate([idx[: counts[c]] for c, idx in by_class.items()])
    outs = np.concatenate([idx[counts[c] : 2 * counts[c]] for c, idx in by_class.items()])
    rest = np.concatenate([idx[2 * counts[c] :] for c, idx in by_class.items()])
    return np.sort(ins), np.sort(outs), rng.permutation(rest)


def membership_split(
    labels: np.ndarray, is_test: np.ndarray, classes: list[int], members: int, seed: int
) -> MembershipSplit:
    pool = np.flatnonzero(np.isin(labels, classes) & ~is_test)
    if 2 * members > len(pool):
        raise ValueError(
            f"the train split of these classes has {len(pool)} records; {members} members and as many "
            "non-members need more"
        )
    ins, outs, rest = _stratified_pair(pool, labels, members, np.random.default_rng(seed), "the train split")
    return MembershipSplit(ins, outs, rest, labels)
