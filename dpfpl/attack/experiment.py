"""The membership-inference experiment: for each method and epsilon, train a target prompt on a small member
set, export it, attack the exported file with both attacks, and report the attacks next to the accuracy the
prompt achieves. ``dpfpl attack`` runs it; results go to ``OUT/results.json``, ``table.md`` and
``attack_vs_epsilon.png``.

Why a small member set and many steps: membership inference measures what a prompt memorizes about its
training records. A node's prompt trained for 50 rounds of one Poisson batch on thousands of records sees
each record about once and memorizes almost nothing, with or without DP; a few records per class seen hundreds
of times is the setting where a non-private prompt overfits and the attack has something to find, so it is
the setting that shows what epsilon buys.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from ..common.atomic import write_bytes, write_json
from ..common.config import MethodName, RunConfig
from ..common.data.registry import demo_image_dataset
from ..common.evaluation import accuracy
from ..common.features import demo_features
from ..common.methods import PromptLearner, build_method
from ..common.models import DEMO_MODEL, LoadedModel, cached_clip
from ..common.prompt import PromptTextEncoder
from ..publish import PublishedPrompt, load_prompt
from .data import MembershipSplit, membership_split
from .mia import AttackMetrics, attack_metrics, loss_threshold_attack, record_signals, shadow_model_attack
from .train import train_prompt

NO_DP = "none"


class AttackSpec(BaseModel):
    """What to run. Training knobs have the run config's names and meaning (one engine, one config)."""

    model_config = ConfigDict(extra="forbid")

    methods: list[MethodName] = Field(default_factory=lambda: ["dpfpl", "coop"], min_length=1)
    epsilons: list[float | Literal["none"]] = Field(default_factory=lambda: [NO_DP, 8.0, 1.0, 0.1], min_length=1)
    # ten animal classes, three records each, seen hundreds of times at a large learning rate: the regime where
    # a non-private prompt memorizes (members classified perfectly, held-out records of the same classes not)
    classes: list[str] = Field(
        default_factory=lambda: ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"],
        min_length=2,
    )
    members: int = Field(30, ge=8)
    shadows: int = Field(3, ge=1)
    steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(4.0, gt=0)
    n_ctx: int = Field(16, ge=1)
    rank: int = Field(2, ge=1)
    max_grad_norm: float = Field(10.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    seed: int = 0
    bootstrap: int = Field(1000, ge=10)
    model_name: str = DEMO_MODEL
    pretrained: str = "demo"
    out: str = "runs/attack"

    def run_config(self, method: str, epsilon: float | str, seed: int) -> RunConfig:
        dp = epsilon != NO_DP
        return RunConfig(
            method=method,
            model_name=self.model_name,
            pretrained=self.pretrained,
            n_ctx=self.n_ctx,
            rank=self.rank,
            num_clients=1,
            min_clients=1,
            num_server_rounds=self.steps,
            batch_size=self.batch_size,
            lr_global=self.lr,
            lr_local=self.lr,
            dp=dp,
            **({"target_epsilon": float(epsilon)} if dp else {}),  # without DP: the run config's default
            calibrate_for="published",
            max_grad_norm_local=self.max_grad_norm,
            max_grad_norm_global=self.max_grad_norm,
            delta=self.delta,
            seed=seed,
        )


@dataclass
class Setting:
    """What every cell of the grid shares: the frozen model, image features, labels and the membership split."""

    model: LoadedModel
    encoder: PromptTextEncoder
    features: torch.Tensor
    labels: torch.Tensor
    is_test: np.ndarray
    classes: list[int]
    split: MembershipSplit

    @classmethod
    def demo(cls, spec: AttackSpec, cache: str | None = None) -> Setting:
        data = demo_image_dataset()  # the clients' records: never seen by the backbone
        unknown = [c for c in spec.classes if c not in data.classnames]
        if unknown:
            raise ValueError(f"classes {unknown} are not demo classes; choose from {data.classnames}")
        model = cached_clip(spec.model_name, spec.pretrained, cache)
        # The target node's task is the chosen classes: its prompt predicts over exactly these (label i is
        # spec.classes[i]; records of other classes get -1 and are never used).
        task = np.full(len(data.classnames), -1)
        task[[data.classnames.index(c) for c in spec.classes]] = np.arange(len(spec.classes))
        labels = task[data.labels]
        classes = list(range(len(spec.classes)))
        encoder = PromptTextEncoder(model.model, model.tokenizer, list(spec.classes), spec.n_ctx)
        return cls(
            model,
            encoder,
            demo_features(model, cache, progress=True),
            torch.from_numpy(labels),
            data.is_test,
            classes,
            membership_split(labels, data.is_test, classes, spec.members, spec.seed),
        )


def _probabilities(setting: Setting, published: PublishedPrompt, idx) -> torch.Tensor:
    """What the attacker observes: the exported prompt's class probabilities for the records' images."""
    with torch.no_grad():
        text = setting.encoder(published.prompt)
        return (float(setting.model.model.logit_scale.exp()) * setting.features[idx] @ text.t()).softmax(-1)


def _accuracy(setting: Setting, published: PublishedPrompt | None, idx) -> float:
    with torch.no_grad():
        text = setting.encoder.handcrafted_features() if published is None else setting.encoder(published.prompt)
    return accuracy(text, setting.features[idx], setting.labels[idx])


def _metrics_dict(m: AttackMetrics) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(m).items()}


def run_cell(spec: AttackSpec, setting: Setting, method: str, epsilon: float | str, progress=None) -> dict:
    """Target + shadows for one (method, epsilon); the target is attacked through its exported file."""
    started = time.time()
    learner = PromptLearner(
        build_method(method, spec.rank), setting.encoder, float(setting.model.model.logit_scale.exp())
    )
    labels = setting.labels

    def train(idx: np.ndarray, seed: int) -> PublishedPrompt:
        idx_t = torch.from_numpy(idx)
        return train_prompt(
            spec.run_config(method, epsilon, seed),
            learner,
            setting.model,
            setting.features[idx_t],
            labels[idx_t],
            progress,
        )

    name = f"{method}_eps-{epsilon}"
    path = Path(spec.out) / "prompts" / f"{name}.safetensors"
    train(setting.split.target_in, spec.seed).save(path)
    target = load_prompt(path)  # the attacker gets the published file, nothing else
    shadow_rows = []
    for s, (s_in, s_out) in enumerate(setting.split.shadow_sets(spec.shadows, spec.members, spec.seed + 1)):
        shadow = train(s_in, spec.seed + 1000 * (s + 1))
        for idx, member in ((s_in, 1), (s_out, 0)):
            shadow_rows.append(
                (
                    record_signals(_probabilities(setting, shadow, idx), labels[idx]),
                    labels[idx].numpy(),
                    np.full(len(idx), member),
                )
            )
    sh_signals, sh_labels, sh_member = (np.concatenate(parts) for parts in zip(*shadow_rows))
    t_idx = np.concatenate([setting.split.target_in, setting.split.target_out])
    t_member = np.concatenate(
        [np.ones(len(setting.split.target_in), int), np.zeros(len(setting.split.target_out), int)]
    )
    t_signals = record_signals(_probabilities(setting, target, t_idx), labels[t_idx])
    score, decision = shadow_model_attack(
        sh_signals, sh_labels, sh_member, t_signals, labels[t_idx].numpy(), setting.classes, spec.seed
    )
    shadow_attack = attack_metrics(t_member, score, decision, spec.bootstrap, spec.seed)
    l_score, l_decision, threshold = loss_threshold_attack(sh_signals, sh_member, t_signals)
    loss_attack = attack_metrics(t_member, l_score, l_decision, spec.bootstrap, spec.seed)
    test_idx = np.flatnonzero(np.isin(labels.numpy(), setting.classes) & setting.is_test)
    privacy = target.manifest.privacy
    return {
        "method": method,
        "target-epsilon": epsilon,
        "prompt": str(path),
        "epsilon-published": privacy.epsilon,
        "delta": privacy.delta,
        "noise-multiplier-local": privacy.noise_multiplier_local,
        "noise-multiplier-global": privacy.noise_multiplier_global,
        "sample-rate": privacy.sample_rate,
        "members-acc": _accuracy(setting, target, setting.split.target_in),
        "non-members-acc": _accuracy(setting, target, setting.split.target_out),
        "test-acc": _accuracy(setting, target, test_idx),
        "zeroshot-test-acc": _accuracy(setting, None, test_idx),
        "shadow-attack": _metrics_dict(shadow_attack),
        "loss-attack": _metrics_dict(loss_attack),
        "loss-threshold": threshold,
        "seconds": round(time.time() - started, 1),
    }


def run_attack_experiment(spec: AttackSpec, cache: str | None = None, show_progress: bool = True) -> dict:
    """Every (method, epsilon) cell; writes results.json, table.md and the plot under ``spec.out``."""
    setting = Setting.demo(spec, cache)
    cells = [(m, e) for m in spec.methods for e in spec.epsilons]
    bar = tqdm(
        total=len(cells) * (1 + spec.shadows) * spec.steps,
        desc="training target + shadow prompts",
        unit="step",
        disable=not show_progress,
    )
    rows = []
    for method, epsilon in cells:
        bar.set_postfix(method=method, epsilon=epsilon)
        rows.append(run_cell(spec, setting, method, epsilon, lambda: bar.update(1)))
    bar.close()
    result = {"spec": spec.model_dump(), "rows": rows}
    out = Path(spec.out)
    write_json(out / "results.json", result)
    write_bytes(out / "table.md", table(result).encode())
    plot(result, out / "attack_vs_epsilon.png")
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _eps(row: dict) -> str:
    return "none (no DP)" if row["target-epsilon"] == NO_DP else f"{row['epsilon-published']:.3g}"


def table(result: dict) -> str:
    """Markdown: per method and epsilon, the prompt's accuracy and both attacks (AUC with its 95% CI)."""
    spec = result["spec"]
    lines = [
        f"Target: {spec['members']} member records of {', '.join(spec['classes'])} (non-members: as many held-out "
        f"records of the same classes), {spec['steps']} steps of B = {spec['batch_size']}, lr {spec['lr']}, "
        f"n_ctx {spec['n_ctx']}, rank {spec['rank']}, C = {spec['max_grad_norm']}; {spec['shadows']} shadow prompts. "
        f"epsilon: of the published prompt (accountant, delta = {spec['delta']:g}).",
        "",
        "| method | ε (published) | test acc % | zero-shot % | members / non-members acc % | shadow attack acc % "
        "| shadow AUC [95% CI] | loss attack acc % | loss AUC [95% CI] | TPR@1%FPR (shadow / loss) % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        sa, la = r["shadow-attack"], r["loss-attack"]
        lines.append(
            f"| {r['method']} | {_eps(r)} | {_pct(r['test-acc'])} | {_pct(r['zeroshot-test-acc'])} | "
            f"{_pct(r['members-acc'])} / {_pct(r['non-members-acc'])} | {_pct(sa['accuracy'])} | "
            f"{sa['auc']:.3f} [{sa['auc_ci'][0]:.3f}, {sa['auc_ci'][1]:.3f}] | {_pct(la['accuracy'])} | "
            f"{la['auc']:.3f} [{la['auc_ci'][0]:.3f}, {la['auc_ci'][1]:.3f}] | "
            f"{_pct(sa['tpr_at_1pct_fpr'])} / {_pct(la['tpr_at_1pct_fpr'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """AUC (with CI) and attack accuracy against epsilon, per method, next to the prompt's test accuracy.
    No DP is drawn at the right end of the epsilon axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    finite = [r["epsilon-published"] for r in rows if r["target-epsilon"] != NO_DP and r["epsilon-published"]]
    no_dp_x = max(finite) * 10 if finite else 1.0
    xs = lambda rs: [no_dp_x if r["target-epsilon"] == NO_DP else r["epsilon-published"] for r in rs]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = sorted([r for r in rows if r["method"] == method], key=lambda r: xs([r])[0])
        x = xs(rs)
        for ax, key, style in ((axes[0], "shadow-attack", "-o"), (axes[0], "loss-attack", "--s")):
            auc = [r[key]["auc"] for r in rs]
            lo = [r[key]["auc"] - r[key]["auc_ci"][0] for r in rs]
            hi = [r[key]["auc_ci"][1] - r[key]["auc"] for r in rs]
            ax.errorbar(
                x,
                auc,
                yerr=[lo, hi],
                fmt=style,
                capsize=3,
                label=f"{method}, {'shadow' if key == 'shadow-attack' else 'loss'}",
            )
            axes[1].plot(
                x,
                [r[key]["accuracy"] for r in rs],
                style,
                label=f"{method}, {'shadow' if key == 'shadow-attack' else 'loss'}",
            )
        axes[2].plot(x, [r["test-acc"] for r in rs], "-o", label=f"{method}: test")
        axes[2].plot(x, [r["members-acc"] for r in rs], ":^", label=f"{method}: members")
    if rows:
        axes[2].axhline(rows[0]["zeroshot-test-acc"], color="gray", ls="--", label="zero-shot: test")
    for ax, title, ylabel in (
        (axes[0], "attack ROC AUC (95% bootstrap CI)", "AUC"),
        (axes[1], "attack accuracy (balanced)", "accuracy"),
        (axes[2], "accuracy of the published prompt", "accuracy"),
    ):
        ax.set_xscale("log")
        ax.set(title=title, xlabel="ε of the published prompt (rightmost: no DP)", ylabel=ylabel)
        ax.legend(fontsize=7)
    for ax in axes[:2]:
        ax.axhline(0.5, color="gray", lw=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
