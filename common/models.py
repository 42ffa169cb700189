"""OpenCLIP model loading: by model name + pretrained tag, a local weights file, or the demo backbone.

The demo backbone (``dpfpl-demo-tiny``, a ~7M-parameter OpenCLIP CLIP config shipped in
``model_configs/``) is pretrained by this project on the public part of the embedded demo data (never on a
record a client trains or is evaluated on), once, and cached; it exists because no CLIP weights can be
downloaded on the machines this project is built on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .atomic import write_json, write_tensors
from .data.demo import load_demo_dataset
from .pretrained import DEMO_MODEL, names_weights_file


def cache_dir(override: str | None = None) -> Path:
    """Where built backbones and feature caches live: node config, $DPFPL_CACHE, or ~/.cache/dpfpl."""
    path = Path(override or os.environ.get("DPFPL_CACHE") or Path.home() / ".cache" / "dpfpl")
    path.mkdir(parents=True, exist_ok=True)
    return path


log = logging.getLogger(__name__)

DEMO_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a silhouette of a {}.",
    "a drawing of the {}.",
    "an image of a {}.",
    "a small {}.",
]
DEMO_PRETRAIN_STEPS = int(os.environ.get("DPFPL_DEMO_PRETRAIN_STEPS", 600))  # tests use fewer
DEMO_BATCH = 128


class WeightsUnavailableError(RuntimeError):
    """The requested weights are not on this machine and could not be fetched."""


class WeightsMismatchError(ValueError):
    """A weights file that exists but belongs to another architecture."""


def register_model_configs() -> None:
    open_clip.add_model_config(Path(str(resources.files("dpfpl.common") / "model_configs")))


@dataclass(eq=False)  # hashable by identity: one loaded model per process
class LoadedModel:
    model: nn.Module
    tokenizer: object
    preprocess: object
    name: str
    weights_id: str  # identifies the weights (tag, file path or demo fingerprint)


class _RandomInitNotice(logging.Filter):
    """Drops OpenCLIP's "No pretrained weights loaded for model ... Model initialized randomly." warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def _random_init_on_purpose() -> Iterator[None]:
    """Around an OpenCLIP model built without weights on purpose (the demo backbone before its pretraining,
    ``pretrained = "none"``): OpenCLIP warns through the root logger that the model is initialized randomly,
    which here is the intent, not a failed load. Only that message is dropped, only while the model is built."""
    root = logging.getLogger()  # OpenCLIP calls logging.warning(...): the root logger's filters apply
    notice = _RandomInitNotice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.float()


def load_clip(model_name: str, pretrained: str, cache: str | None = None) -> LoadedModel:
    """Load a frozen OpenCLIP model in fp32.

    ``pretrained``: ``"demo"`` (the project's demo backbone, built on first use), an OpenCLIP tag such as
    ``"openai"`` (from the OpenCLIP/HF cache, or downloaded where the network allows), a path to a local
    weights file, or ``"none"`` (random weights: same compute as the real model, for speed/shape tests).

    Weights never depend on a run's seed: like a pretrained tag, the demo backbone is one fixed artifact
    (seed 0), and ``"none"`` draws its random weights from a fixed seed, so every process (and the feature
    cache, keyed by the weights' identity) sees the same model.
    """
    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown OpenCLIP model '{model_name}'; see open_clip.list_models()")
    if pretrained == "demo":
        if model_name != DEMO_MODEL:
            raise ValueError(f"pretrained='demo' is only available for model '{DEMO_MODEL}'")
        path = build_demo_backbone(cache=cache)
        weights: str | None = str(path)
    elif pretrained.lower() in ("none", ""):
        weights = None
    else:
        weights = pretrained
        looks_like_file = names_weights_file(pretrained)
        if looks_like_file and not Path(pretrained).is_file():
            raise WeightsUnavailableError(
                f"weights file '{pretrained}' does not exist. Put the OpenCLIP checkpoint for '{model_name}' "
                "there (e.g. open_clip_pytorch_model.bin from the model's Hugging Face repository) or set "
                "pretrained to an OpenCLIP tag such as 'openai'."
            )
        if not looks_like_file and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
            raise ValueError(
                f"'{pretrained}' is not a pretrained tag of {model_name}; known tags: "
                f"{open_clip.list_pretrained_tags_by_model(model_name)}"
            )
    try:
        quiet = _random_init_on_purpose() if weights is None else nullcontext()  # "none": random on purpose
        with torch.random.fork_rng(devices=[]), quiet:
            torch.manual_seed(0)  # "none": the same random weights in every process
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, cache_dir=cache
            )
    except (OSError, RuntimeError) as err:
        if weights is None:
            raise
        if Path(str(weights)).is_file():
            if "state_dict" not in str(err) and "size mismatch" not in str(err):
                raise
            first_lines = "\n".join(str(err).splitlines()[:4])
            raise WeightsMismatchError(
                f"the weights file '{weights}' does not fit OpenCLIP model '{model_name}' (a checkpoint of another "
                f"architecture?):\n{first_lines}\nSet model-name to the architecture the file was trained for, or "
                "pass the checkpoint of this model."
            ) from None
        raise WeightsUnavailableError(
            f"could not load OpenCLIP weights '{pretrained}' for {model_name}: {err}\n"
            "This machine may be offline. Download them where the network allows (e.g. "
            f"`python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}')\"`) "
            "and copy the Hugging Face cache (~/.cache/huggingface) here, or pass the checkpoint file path as "
            "pretrained."
        ) from err
    weights_id = pretrained if weights is None or pretrained != "demo" else Path(weights).stem
    return LoadedModel(_freeze(model), open_clip.get_tokenizer(model_name), preprocess, model_name, weights_id)


# ----------------------------------------------------------------------------------------------------
# Demo backbone
# ----------------------------------------------------------------------------------------------------


def demo_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32) grayscale -> float (N, 3, 32, 32) normalized as OpenCLIP expects."""
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _demo_backbone_path(seed: int, cache: str | None, steps: int) -> Path:
    fingerprint = load_demo_dataset().fingerprint
    return cache_dir(cache) / "backbones" / f"{DEMO_MODEL}-s{seed}-n{steps}-{fingerprint}.safetensors"


def build_demo_backbone(
    seed: int = 0, cache: str | None = None, progress: bool = True, steps: int = DEMO_PRETRAIN_STEPS
) -> Path:
    """Pretrain the demo backbone on the public part of the demo data only (once; cached, deterministic for a
    seed): the clients' training records and the test records are never seen by it.

    Training: image x caption logits over the 20 class captions (a random template per class per step),
    cross-entropy on the image's class, both towers trained (a class-level CLIP objective: with 20 classes
    an instance-level contrastive batch would be full of same-class false negatives).
    """
    path = _demo_backbone_path(seed, cache, steps)
    if path.is_file():
        return path
    register_model_configs()
    data = load_demo_dataset()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with _random_init_on_purpose():  # pretrained here, from a seeded random init
        model = open_clip.create_model(DEMO_MODEL, pretrained=None)
    model.train()
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    caption_tokens = torch.stack(
        [tokenizer([t.format(c) for c in data.classnames]) for t in DEMO_TEMPLATES]
    )  # (templates, C, L)
    train = data.public_records()
    pixels = demo_pixels(data.images[train])
    labels = torch.from_numpy(data.labels[train])
    # The 49,408-row token embedding stays at its seeded random init: updating it would dominate the step
    # time, and the transformer learns to read the fixed embeddings of the class words just as well.
    model.token_embedding.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    n_cls = len(data.classnames)
    started = time.time()
    bar = tqdm(range(steps), desc="pretraining demo backbone (once)", disable=not progress, unit="step")
    for _ in bar:
        idx = torch.randint(0, len(train), (DEMO_BATCH,), generator=gen)
        x = pixels[idx]
        # light augmentation: random shifts by up to 2 pixels
        dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        template = torch.randint(0, len(DEMO_TEMPLATES), (n_cls,), generator=gen)
        text = caption_tokens[template, torch.arange(n_cls)]
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    write_tensors(path, model.state_dict(), metadata={"seed": str(seed), "steps": str(steps)})
    write_json(
        path.with_suffix(".json"),
        {
            "model": DEMO_MODEL,
            "seed": seed,
            "steps": steps,
            "seconds": round(time.time() - started, 1),
            "data_fingerprint": data.fingerprint,
            "pretrained_on": f"public part of the demo data, {len(train)} images",
        },
    )
    log.info("demo backbone written to %s", path)
    return path


@lru_cache(maxsize=4)
def cached_clip(model_name: str, pretrained: str, cache: str | None = None) -> LoadedModel:
    """One model per process: a ClientApp in simulation reuses it across rounds instead of rebuilding."""
    return load_clip(model_name, pretrained, cache)
