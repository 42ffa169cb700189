"""The two membership-inference attacks and their metrics.

Both see only what a user of the published prompt sees: the class probabilities the prompt assigns to a
record's image, and the record's label.

* Shadow-model attack (Shokri et al., S&P 2017): the attacker trains shadow prompts by the same engine on
  data of the same distribution whose membership it knows, labels each shadow record in/out, and fits an
  attack classifier on the shadow prompts' outputs; the classifier is then applied to the target's outputs.
  Shokri et al. fit one attack model per class on the full probability vector; here one model sees the
  label-aware features below plus the label (a one-hot), which is equivalent in power for a handful of
  classes and needs fewer shadow records.
* Loss-threshold attack (Yeom et al., CSF 2018): "member" when the record's loss is below a threshold. The
  threshold is the one that separates the shadow prompts' members and non-members best (the attacker
  cannot tune it on the target's membership); ROC AUC needs no threshold.

Metrics on the target's members and non-members (equally many, so chance is 0.5 for both): attack accuracy,
ROC AUC, TPR at 1% FPR (Carlini et al.: what an attack gets right when it must rarely be wrong), each with a
stratified bootstrap 95% confidence interval over the records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score, roc_curve

SIGNALS = ("log p(label)", "top-1 prob", "top-2 prob", "top-3 prob", "entropy", "correct")


def record_signals(probabilities: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(N, C) probabilities + labels -> (N, 6) features: log p(label), top-3 probabilities, entropy, correct."""
    p = probabilities.double().clamp_min(1e-30)
    log_p_label = p.gather(1, labels.view(-1, 1)).log().squeeze(1)
    top = p.topk(min(3, p.shape[1]), dim=1).values
    if top.shape[1] < 3:
        top = torch.cat([top, top.new_zeros(len(p), 3 - top.shape[1])], dim=1)
    entropy = -(p * p.log()).sum(1)
    correct = (p.argmax(1) == labels).double()
    return torch.cat([log_p_label[:, None], top, entropy[:, None], correct[:, None]], dim=1).numpy()


@dataclass(frozen=True)
class AttackMetrics:
    accuracy: float
    accuracy_ci: tuple[float, float]
    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1pct_fpr: float
    members: int
    non_members: int


def _tpr_at(fpr_target: float, member: np.ndarray, score: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(member, score)
    return float(tpr[fpr <= fpr_target].max(initial=0.0))


def attack_metrics(
    member: np.ndarray, score: np.ndarray, decision: np.ndarray, bootstrap: int = 1000, seed: int = 0
) -> AttackMetrics:
    """``member``: ground truth (1 = in); ``score``: higher = more likely a member; ``decision``: the attack's
    0/1 guesses. Confidence intervals: percentile bootstrap, resampling members and non-members separately."""
    member = np.asarray(member).astype(int)
    ins, outs = np.flatnonzero(member == 1), np.flatnonzero(member == 0)
    rng = np.random.default_rng(seed)
    accs, aucs = [], []
    for _ in range(bootstrap):
        idx = np.concatenate([rng.choice(ins, len(ins)), rng.choice(outs, len(outs))])
        accs.append(float((decision[idx] == member[idx]).mean()))
        aucs.append(float(roc_auc_score(member[idx], score[idx])))
    ci = lambda v: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))  # noqa: E731
    return AttackMetrics(
        float((decision == member).mean()),
        ci(accs),
        float(roc_auc_score(member, score)),
        ci(aucs),
        _tpr_at(0.01, member, score),
        len(ins),
        len(outs),
    )


def _with_labels(signals: np.ndarray, labels: np.ndarray, classes: list[int]) -> np.ndarray:
    onehot = (np.asarray(labels)[:, None] == np.asarray(classes)[None, :]).astype(float)
    return np.concatenate([signals, onehot], axis=1)


def shadow_model_attack(
    shadow_signals: np.ndarray,
    shadow_labels: np.ndarray,
    shadow_member: np.ndarray,
    target_signals: np.ndarray,
    target_labels: np.ndarray,
    classes: list[int],
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit the attack model on the shadows' records, apply it to the target's: (scores, 0/1 decisions)."""
    model = GradientBoostingClassifier(
        n_estimators=100, max_depth=2, learning_rate=0.05, subsample=0.8, random_state=seed
    )
    model.fit(_with_labels(shadow_signals, shadow_labels, classes), shadow_member)
    score = model.predict_proba(_with_labels(target_signals, target_labels, classes))[:, 1]
    return score, (score >= 0.5).astype(int)


def loss_threshold_attack(
    shadow_signals: np.ndarray, shadow_member: np.ndarray, target_signals: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Score = -loss = log p(label); the threshold maximizes accuracy on the shadows. (scores, decisions, thr)."""
    shadow_score, score = shadow_signals[:, 0], target_signals[:, 0]
    candidates = np.unique(shadow_score)
    best, threshold = -1.0, float(candidates[0])
    for t in candidates:
        acc = float(((shadow_score >= t).astype(int) == shadow_member).mean())
        if acc > best:
            best, threshold = acc, float(t)
    return score, (score >= threshold).astype(int), threshold
