"""Members, non-members and shadow data for a membership-inference experiment on the embedded demo data.

Everything is drawn from the demo *train* split: the demo backbone was pretrained on it, so members and
non-members are equally familiar to the frozen backbone and the attack can only detect what the *prompt*
learned. (Drawing non-members from the test split would let the attack detect the backbone's own
membership instead.) The pool of the chosen classes is shuffled once: the target's members and its
non-members come first, the rest is the shadow pool, disjoint from both, from which each shadow draws its
own members and non-members.
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
            raise ValueError(f"the shadow pool has {len(self.shadow_pool)} records; each shadow needs {2 * size} "
                             "(members + non-members): use fewer members or more classes")
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(count):
            perm = rng.permutation(self.shadow_pool)
            out.append((np.sort(perm[:size]), np.sort(perm[size : 2 * size])))
        return out


def membership_split(labels: np.ndarray, is_test: np.ndarray, classes: list[int], members: int,
                     seed: int) -> MembershipSplit:
    pool = np.flatnonzero(np.isin(labels, classes) & ~is_test)
    if 2 * members > len(pool):
        raise ValueError(f"the train split of these classes has {len(pool)} records; {members} members and as many "
                         "non-members need more")
    perm = np.random.default_rng(seed).permutation(pool)
    return MembershipSplit(np.sort(perm[:members]), np.sort(perm[members : 2 * members]), perm[2 * members :])
