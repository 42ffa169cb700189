"""The run's summary (``summary.json``): what the run published, how well it does, and what its epsilons cover.

Written once, when the run closes (``server_app/runner.py``), from the metrics lines and the server's books;
``dpfpl report`` and the export manifest read it.
"""

from __future__ import annotations

from dpfpl.common.config import RunConfig
from dpfpl.common.evaluation import last_rounds_per_client, worst_client
from dpfpl.common.metrics import LOCAL_ACC, SUMMARY_ACCURACY_KEYS
from dpfpl.common.wire import outside_epsilon

from .books import COVERS, SAMPLE_RATE_NOTE
from .checkpoint import ServerState
from .strategy import PromptStrategy

PROTOCOL_DESCRIPTIONS = {
    "pathological": "pathological (DP-FPL): disjoint classes per client; local = own classes' test images, "
    "neighbor = the other clients' classes; classifier over all classes",
    "dirichlet": "dirichlet (CIFAR): label skew Dir(alpha) on train and test; local = the client's own test "
    "shard; classifier over all classes",
    "base-novel": "base-novel (FedPGP): local = own base classes, base = all base classes (base classifier), "
    "novel = unseen classes (novel classifier); hm = per-client HM(local, base, novel), "
    "hm-of-means = HM of the three means",
    "multi-domain": "multi-domain (SecFPP): client k draws from domain k mod D (contiguous class blocks), label skew "
    "Dir(alpha) within it; local = the client's own test shard; classifier over all classes",
    "silo": "silo: each organization's own test images (local only)",
}


def evaluation_protocol(cfg: RunConfig) -> dict:
    protocol = "silo" if cfg.dataset == "silo" else cfg.partition
    out = {
        "name": protocol,
        "description": PROTOCOL_DESCRIPTIONS[protocol],
        "dataset": cfg.dataset,
        "mean-over": "clients, unweighted",
        "last-rounds": cfg.eval_last,
    }
    if protocol in ("dirichlet", "multi-domain"):
        out["dirichlet-alpha"] = cfg.dirichlet_alpha
    if protocol == "multi-domain":
        out["num-domains"] = cfg.num_domains
    if protocol in ("pathological", "base-novel"):
        out["classes-per-client"] = cfg.classes_per_client or "round(C/N)"
    if cfg.num_shots:
        out["num-shots"] = cfg.num_shots
    if cfg.augment_views:
        out["augment-views"] = cfg.augment_views
    return out


def last_rounds_mean(evals: list[dict], count: int) -> dict:
    """Mean of each accuracy over the evaluations of the last ``count`` rounds (the papers' number)."""
    if not evals or count <= 0:
        return {}
    last_round = evals[-1]["round"]
    window = [m for m in evals if m["round"] > last_round - count]
    out: dict = {"rounds": [window[0]["round"], last_round], "evaluations": len(window)}
    for key in SUMMARY_ACCURACY_KEYS:
        values = [m[key] for m in window if key in m]
        if values:
            out[key] = sum(values) / len(values)
    return out


def summarize(cfg: RunConfig, state: ServerState, metrics: list[dict], strategy: PromptStrategy) -> dict:
    evals = [m for m in metrics if m.get("phase") == "train" and LOCAL_ACC in m]
    if not strategy.method.trains:  # zero-shot: the hand-crafted prompts' evaluation is the result
        evals = [{"round": 0, **state.zeroshot}] if state.zeroshot else []
    last = evals[-1] if evals else {}
    train = [m for m in metrics if m.get("phase") == "train"]
    zeroshot_per_client = next((m.get("per-client", {}) for m in metrics if m.get("phase") == "zeroshot"), {})
    final_per_client = last.get("per-client", {})
    # the published prompt (the mean of the last iterates) is what a user takes away, so it is the result; a
    # method without one (zero-shot) is its final evaluation
    published_record = next((m["published"] for m in reversed(metrics) if "published" in m), None)
    final = {k: last[k] for k in SUMMARY_ACCURACY_KEYS if k in last}
    published = (
        {k: published_record[k] for k in SUMMARY_ACCURACY_KEYS if k in published_record} if published_record else final
    )
    published_per_client = published_record.get("per-client", {}) if published_record else final_per_client
    last_rounds_per = (
        last_rounds_per_client(evals, cfg.eval_last, SUMMARY_ACCURACY_KEYS)
        if cfg.eval_last and strategy.method.trains
        else final_per_client
    )
    return {
        "method": cfg.method,
        "model": f"{cfg.model_name} ({cfg.pretrained})",
        "rounds": state.server_round,
        # rounds that ran and rounds whose replies (at least min-clients valid ones) updated the global prompt
        "rounds-run": len(train),
        "rounds-updated": sum(1 for m in train if m.get("updated") is True),
        "num-clients": cfg.num_clients,
        "evaluation-protocol": evaluation_protocol(cfg),
        "zeroshot": state.zeroshot,
        "published": published,
        "published-per-client": published_per_client,
        "published-prompt": published_prompt_note(cfg, strategy, published_record is not None),
        # the worst client of the published prompt, against its own zero-shot accuracy
        "worst-client": worst_client(zeroshot_per_client, published_per_client),
        "zeroshot-per-client": zeroshot_per_client,
        # diagnostics: the final iterate, and the papers' mean over the last rounds' iterates
        "final": final,
        "final-round": last.get("round"),
        "final-per-client": final_per_client,
        "worst-client-final-round": worst_client(zeroshot_per_client, final_per_client),
        "last-rounds-mean": last_rounds_mean(evals, cfg.eval_last),
        "worst-client-last-rounds": worst_client(zeroshot_per_client, last_rounds_per),
        "privacy": {
            "dp": cfg.dp,
            "delta": cfg.delta,
            "neighbouring-relation": "add/remove one record",
            "accountant": "dp-accounting PLD, Poisson-subsampled Gaussian",
            "target-epsilon": cfg.target_epsilon if cfg.uses_calibration else None,
            "calibrate-for": cfg.calibrate_for,
            "noise-multiplier-global": state.noise_multiplier_global,
            **privacy_block(cfg, strategy),
        },
    }


def published_prompt_note(cfg: RunConfig, strategy: PromptStrategy, evaluated: bool) -> dict:
    """What the published prompt is, in words and rounds (its shared part in the strategy's words)."""
    if not strategy.method.trains:
        return {"what": "the hand-crafted prompts (nothing is learned)"}
    rounds = [max(1, cfg.num_server_rounds - cfg.publish_average + 1), cfg.num_server_rounds]
    return {
        "what": f"{strategy.published_global_note()} plus each node's mean p_L over the rounds it trained in "
        f"{rounds[0]}..{rounds[1]}; a mean of released iterates is post-processing and costs no epsilon",
        "average-of-last": cfg.publish_average,
        "rounds": rounds,
        "evaluated": evaluated,
    }


def privacy_block(cfg: RunConfig, strategy: PromptStrategy) -> dict:
    """Each epsilon (worst case over every node in the server's books), what it covers, and what it does not."""
    if not cfg.dp:
        return {key: None for key in COVERS}
    excludes = outside_epsilon(cfg.method, cfg.dp)  # what leaves the nodes that no epsilon covers
    return {
        **strategy.privacy_maxima(),
        "epsilon-covers": dict(COVERS),
        "sample-rate": SAMPLE_RATE_NOTE,
        "excludes": excludes,
        "secure-noise": cfg.secure_noise,
        **strategy.privacy_notes(),  # e.g. secure aggregation's discrete Gaussian, accounted as the continuous one
    }
