"""``dpfpl export``, ``dpfpl predict`` and ``dpfpl attack``: what a node publishes, what a user of the
published prompt does with it, and what an attacker who obtains it learns about the node's records.

Kept out of ``cli.py``, which defines these commands' options and imports this module only when one of them
runs: they load torch and the backbone, ``dpfpl --help`` does not. Each function takes the parsed arguments and
prints what a user reads.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from pydantic import ValidationError

from .attack.experiment import NO_DP, AttackSpec, run_attack_experiment, table
from .common.atomic import write_bytes
from .predict import PromptClassifier, image_paths, load_model_for
from .publish import PromptMismatchError, PublishedPrompt, PublishedPromptError, export_node_prompt, load_prompt


def export(args: argparse.Namespace) -> None:
    try:
        published = export_node_prompt(args.run_dir, args.node, args.state_dir)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"dpfpl export: {err}") from None
    path = published.save(args.out)
    m = published.manifest
    print(
        f"wrote {path}: {m.method} prompt, n_ctx {m.n_ctx}"
        + (f", rank {m.rank}" if m.rank else "")
        + f", {len(m.classnames)} classes, model {m.model_name} ({m.pretrained}, sha256 {m.weights_sha256[:12]}...)"
    )
    print(
        f"parts: {', '.join(['prompt', *published.parts])} (the local prompt's factors, optimizer state and "
        "data are not in the file)"
    )
    print(privacy_line(published))


def privacy_line(published: PublishedPrompt) -> str:
    pr = published.manifest.privacy
    if not pr.dp:
        return "privacy: trained WITHOUT differential privacy: the prompt carries no guarantee for its records"
    fmt = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
    line = (
        f"privacy ({pr.accountant}; {pr.neighbouring_relation}; delta = {pr.delta:g}): epsilon of the published "
        f"prompt {fmt(pr.epsilon)} for this node's records (LDP mechanism alone {fmt(pr.epsilon_local)}; p_G "
        f"{fmt(pr.epsilon_global)}, GDP mechanism alone {fmt(pr.epsilon_gdp_mechanism)}), p_G "
        f"{fmt(pr.epsilon_other_clients)} for other clients' records; {pr.noisy_steps} noisy steps"
    )
    return line + "".join(f"\n  not covered: {text}" for text in pr.excludes)


def predict(args: argparse.Namespace) -> None:
    try:
        published = load_prompt(args.prompt)
        if args.model and args.model != published.manifest.model_name:
            raise PromptMismatchError(
                f"you asked for model '{args.model}', but the prompt was trained for "
                f"'{published.manifest.model_name}': a prompt only works with its own model"
            )
        classnames = [c.strip() for c in args.classnames.split(",") if c.strip()] if args.classnames else None
        paths = image_paths(args.images)
        classifier = PromptClassifier(published, load_model_for(published, args.pretrained), classnames)
        predictions = classifier.predict_files(paths, args.top_k, args.batch_size)
    except (PublishedPromptError, PromptMismatchError, FileNotFoundError) as err:
        raise SystemExit(f"dpfpl predict: {err}") from None
    rows = [
        {"image": p.source, "rank": r + 1, "label": label, "probability": prob}
        for p in predictions
        for r, (label, prob) in enumerate(zip(p.labels, p.probabilities))
    ]
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() == ".json":
            data = json.dumps(
                [{"image": p.source, "labels": p.labels, "probabilities": p.probabilities} for p in predictions],
                indent=2,
            ).encode()
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["image", "rank", "label", "probability"])
            writer.writeheader()
            writer.writerows(rows)
            data = buf.getvalue().encode()
        write_bytes(out, data)
        print(f"{len(predictions)} images classified; predictions written to {out}")
        return
    width = max(len(p.source) for p in predictions)
    for p in predictions:
        print(
            f"{p.source:<{width}}  "
            + "  ".join(f"{label} {prob:.3f}" for label, prob in zip(p.labels, p.probabilities))
        )


def attack(args: argparse.Namespace) -> None:
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    fields = {"out": args.out}  # an option not given: AttackSpec's default
    if args.methods is not None:
        fields["methods"] = split(args.methods)
    if args.classes:
        fields["classes"] = split(args.classes)
    for key in ("members", "shadows", "steps", "lr", "batch_size", "n_ctx", "rank", "seed", "bootstrap"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    try:
        if args.epsilons is not None:
            fields["epsilons"] = [NO_DP if e.lower() == NO_DP else float(e) for e in split(args.epsilons)]
        spec = AttackSpec(**fields)
        result = run_attack_experiment(spec)
    except ValidationError as err:
        raise SystemExit(f"dpfpl attack: invalid arguments:\n{err}") from None
    except ValueError as err:
        raise SystemExit(f"dpfpl attack: {err}") from None
    print(table(result))
    out = Path(spec.out)
    print(f"results: {out / 'results.json'}, {out / 'table.md'}, plot: {out / 'attack_vs_epsilon.png'}")
