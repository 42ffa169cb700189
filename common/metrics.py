"""The names of the metrics the nodes report and the server records: one set of constants for both apps and
the tools that read metrics.jsonl and summary.json."""

from __future__ import annotations

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
