"""Publishing a node's personalized prompt (prompt-as-a-service): one safetensors file with a manifest.

The file holds the personalized context the node predicts with (``prompt`` = p_G + local context, n_ctx x
width) and its two parts (``global``, ``local``) where the method has them, plus a JSON manifest (as
safetensors metadata) that says what the prompt is valid for: the OpenCLIP model and a SHA-256 of its
weights, the ordered class list, method, n_ctx and rank, and what the accountant says about the published
prompt. A SHA-256 digest over tensors and manifest detects a damaged or edited file. safetensors carries
no code (no pickle), so loading a prompt from someone else cannot run anything.

Privacy of the published prompt (what the manifest's ``privacy`` says, all from the accountant; ``covers``
says it in words): for the exporting node's own records, p_G + p_L is the composition of the node's local
(LDP) and global (GDP) releases of the same Poisson batches (``epsilon``). p_G alone is bounded by that
same composed epsilon whenever the method's reply reads local state (every method with a local prompt:
the reply is a gradient at p_G + p_L, and p_L is updated from the same records); the GDP mechanism's own
epsilon (``epsilon_gdp_mechanism``) bounds p_G only for PromptFL. For records of any other client, the
file holds p_G, bounded the same way from the server's books (``epsilon_other_clients``); p_L only
post-processes it. Everything else (p_L's factors, optimizer state, data, features) is not in the file.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from .client_app.state import STATE_FILE, NodeState
from .common.atomic import DIGEST_KEY, tensor_digest, write_tensors
from .common.config import MethodName, RunConfig
from .common.method_specs import RANKED_METHODS
from .common.methods import Method, PromptLearner, build_method
from .common.models import LoadedModel, cached_clip
from .common.node_data import run_dataset, run_partition
from .common.privacy.covers import MANIFEST_COVERS
from .common.prompt import PromptTextEncoder
from .common.run_classes import run_class_list
from .common.wire import outside_epsilon
from .server_app.books import privacy_maxima
from .server_app.checkpoint import CHECKPOINT, RUN_CONFIG, RunDirectory, ServerState

FORMAT = "dpfpl-prompt"
FORMAT_VERSION = 1
MANIFEST_KEY = "manifest"


class PublishedPromptError(ValueError):
    """An exported prompt file that cannot be read, fails its digest, or has an invalid manifest."""


class PromptMismatchError(ValueError):
    """A prompt used with a model or a class list other than the ones it was trained for."""


class PrivacyManifest(BaseModel):
    """What the accountant says about the published prompt. ``None`` epsilons: no DP, no guarantee."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dp: bool
    epsilon: float | None = Field(None, ge=0, description="published prompt, the exporting node's records")
    epsilon_local: float | None = Field(None, ge=0, description="the node's LDP release (its local prompt)")
    epsilon_global: float | None = Field(
        None,
        ge=0,
        description="the node's records in p_G (composed where the "
        "reply reads local state; GDP alone only without a local prompt)",
    )
    epsilon_gdp_mechanism: float | None = Field(
        None, ge=0, description="the GDP releases alone (not p_G's bound where the reply reads local state)"
    )
    epsilon_other_clients: float | None = Field(
        None, ge=0, description="worst other client's records in p_G (server books, as epsilon_global)"
    )
    covers: dict[str, str] = Field(default_factory=dict)  # each epsilon above, in words
    # what leaves the node that no epsilon covers (``outside_epsilon``: evaluation replies, reply timing, SecFPP's
    # clustering)
    excludes: list[str] = Field(default_factory=list)
    delta: float = Field(gt=0, lt=1)
    noisy_steps: int = Field(0, ge=0)
    noise_multiplier_local: float | None = None
    noise_multiplier_global: float | None = None
    sample_rate: float | None = None
    accountant: str = "dp-accounting PLD, Poisson-subsampled Gaussian"
    neighbouring_relation: str = "add/remove one record"


class PromptManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dpfpl-prompt"] = FORMAT
    version: int = FORMAT_VERSION
    model_name: str
    pretrained: str  # how the weights were named at training time (tag, file, "demo")
    weights_id: str
    weights_sha256: str  # what predict checks: a renamed file passes, other weights do not
    classnames: list[str] = Field(min_length=1)
    method: MethodName
    n_ctx: int = Field(ge=1)
    rank: int | None = None  # factorized methods only
    width: int = Field(ge=1)
    privacy: PrivacyManifest
    source: dict[str, str | int | float] = Field(default_factory=dict)  # run, node, round: provenance only


@dataclass
class PublishedPrompt:
    manifest: PromptManifest
    prompt: torch.Tensor  # (n_ctx, width): the context the classifier runs with
    parts: dict[str, torch.Tensor]  # "global" and/or "local", (n_ctx, width) each

    def save(self, path: str | Path) -> Path:
        """Write atomically; the digest covers every tensor and the manifest."""
        path = Path(path)
        tensors = {
            k: v.detach().float().cpu().clone().contiguous()  # clone: parts may alias the prompt
            for k, v in {"prompt": self.prompt, **self.parts}.items()
        }
        metadata = {MANIFEST_KEY: self.manifest.model_dump_json()}
        write_tensors(path, tensors, {**metadata, DIGEST_KEY: tensor_digest(tensors, metadata)})
        return path


def load_prompt(path: str | Path) -> PublishedPrompt:
    """Read and check an exported prompt: digest, manifest schema, tensor shapes and values."""
    path = Path(path)
    if not path.is_file():
        raise PublishedPromptError(f"prompt file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure: not a readable safetensors file
        raise PublishedPromptError(f"'{path}' is not a readable prompt file ({type(err).__name__}: {err})") from err
    if MANIFEST_KEY not in metadata:
        raise PublishedPromptError(f"'{path}' has no dpfpl manifest; export prompts with `dpfpl export`")
    if metadata.get(DIGEST_KEY) != tensor_digest(tensors, {k: v for k, v in metadata.items() if k != DIGEST_KEY}):
        raise PublishedPromptError(f"'{path}' does not match its SHA-256 digest: the file is damaged or was edited")
    try:
        manifest = PromptManifest.model_validate_json(metadata[MANIFEST_KEY])
    except ValidationError as err:
        raise PublishedPromptError(f"'{path}': invalid manifest:\n{err}") from None
    prompt = tensors.pop("prompt", None)
    expected = (manifest.n_ctx, manifest.width)
    for name, t in {"prompt": prompt, **tensors}.items():
        if t is None or tuple(t.shape) != expected or not torch.isfinite(t).all():
            raise PublishedPromptError(f"'{path}': tensor '{name}' must be finite with shape {expected}")
    if set(tensors) - {"global", "local"}:
        raise PublishedPromptError(f"'{path}': unexpected tensors {sorted(set(tensors) - {'global', 'local'})}")
    return PublishedPrompt(manifest, prompt, tensors)


@lru_cache(maxsize=8)
def weights_sha256(model: LoadedModel) -> str:
    """SHA-256 over every tensor of the model's state dict (name, dtype, shape, bytes), in name order.

    Why not the weights id: the same file may sit at another path on the user's machine, and a tag names
    weights only as long as nobody re-uploads them; the content is what the prompt was trained against.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_model(manifest: PromptManifest, model: LoadedModel) -> None:
    if model.name != manifest.model_name:
        raise PromptMismatchError(
            f"the prompt was trained for OpenCLIP model '{manifest.model_name}', not '{model.name}'. "
            f"Load '{manifest.model_name}' with the weights '{manifest.pretrained}'."
        )
    if weights_sha256(model) != manifest.weights_sha256:
        raise PromptMismatchError(
            f"the weights '{model.weights_id}' of {model.name} are not the ones the prompt was trained with "
            f"('{manifest.pretrained}', sha256 {manifest.weights_sha256[:16]}...). A prompt only works with the exact "
            "frozen model it was learned on: pass those weights (e.g. --pretrained /path/to/the/same/file)."
        )


def check_classnames(manifest: PromptManifest, classnames: list[str] | None) -> None:
    """A class list given by the user must be the prompt's, in its order (logit i is class i)."""
    if classnames is None or list(classnames) == manifest.classnames:
        return
    missing = [c for c in classnames if c not in manifest.classnames]
    extra = [c for c in manifest.classnames if c not in classnames]
    detail = (
        f"not in the prompt: {missing}; only in the prompt: {extra}"
        if missing or extra
        else "same names, different order"
    )
    raise PromptMismatchError(
        f"class list mismatch ({detail}). The prompt was trained for {len(manifest.classnames)} classes "
        f"{manifest.classnames}; predictions are over exactly that list."
    )


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def build_published_prompt(
    learner,
    model: LoadedModel,
    classnames: list[str],
    p_global: torch.Tensor | None,
    local: dict[str, torch.Tensor],
    privacy: PrivacyManifest,
    rank: int | None,
    source: dict | None = None,
    pretrained: str | None = None,
    local_context: torch.Tensor | None = None,
) -> PublishedPrompt:
    """The published form of a node's prompt, built by the engine's own ``personalized_prompt``.
    ``local_context``: the published local part as a context (the mean of p_L's last iterates); else ``local``."""
    method = learner.method
    if not method.trains:
        raise ValueError(
            f"method '{method.name}' has no learned prompt to export (zero-shot uses hand-crafted prompts)"
        )
    with torch.no_grad():
        prompt = learner.personalized_prompt(p_global, local, local_context).detach().cpu()
        parts = {}
        if method.shares_global and p_global is not None:
            parts["global"] = p_global.detach().cpu()
        if method.local is not None and local_context is not None:
            parts["local"] = local_context.detach().cpu()
        elif method.local is not None and local:
            parts["local"] = method.local.eval_context(local).detach().cpu()
    manifest = PromptManifest(
        model_name=model.name,
        pretrained=pretrained or model.weights_id,
        weights_id=model.weights_id,
        weights_sha256=weights_sha256(model),
        classnames=list(classnames),
        method=method.name,
        n_ctx=int(prompt.shape[0]),
        rank=rank if method.name in RANKED_METHODS else None,
        width=int(prompt.shape[1]),
        privacy=privacy,
        source=source or {},
    )
    return PublishedPrompt(manifest, prompt, parts)


def accountant_privacy(
    accountant,
    dp: bool,
    delta: float,
    z_local: float | None = None,
    z_global: float | None = None,
    epsilon_other_clients: float | None = None,
    excludes: list[str] | None = None,
) -> PrivacyManifest:
    """The manifest's privacy section from a node's ``PrivacyAccountant`` (every number is the accountant's).

    ``z_local`` None or inf: the method has no local prompt, so the reply reads no local state and p_G is
    bounded by the GDP epsilon alone; otherwise p_G's epsilon is the composed one."""
    if not dp:
        return PrivacyManifest(dp=False, delta=delta)
    q = max((h[2] for h in accountant.history), default=None)
    reads_local_state = z_local is not None and not math.isinf(z_local)
    gdp = accountant.epsilon_global()
    return PrivacyManifest(
        dp=True,
        epsilon=_finite(accountant.epsilon_published()),
        epsilon_local=_finite(accountant.epsilon_local()),
        epsilon_global=_finite(accountant.epsilon_published() if reads_local_state else gdp),
        epsilon_gdp_mechanism=_finite(gdp),
        epsilon_other_clients=_finite(epsilon_other_clients),
        delta=delta,
        noisy_steps=len(accountant.history),
        noise_multiplier_local=_finite(z_local),
        noise_multiplier_global=_finite(z_global),
        sample_rate=q,
        covers=MANIFEST_COVERS,
        excludes=list(excludes or []),
    )


def training_classnames(cfg: RunConfig) -> list[str]:
    """The class list the node's prompt was trained over (its logits): the task's classes, or the base classes
    under the base-novel protocol (the prompt still runs on any class list, but this is the one it learned)."""
    if cfg.dataset != "silo" and cfg.partition == "base-novel":
        names = run_dataset(cfg).classnames
        return [names[c] for c in run_partition(cfg).base_classes or []]
    return run_class_list(cfg)


def export_node_prompt(
    run_dir: str | Path, node: int | None = None, state_dir: str | Path | None = None, cache: str | None = None
) -> PublishedPrompt:
    """Build node ``node``'s personalized prompt from a run directory (global prompt, run config) and the
    node's private state (``RUN_DIR/nodes/node-I`` in simulation, ``state_dir`` on a deployed node)."""
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    state_dir = _node_state_dir(run_dir, node, state_dir)
    state, server = _node_and_server_state(run_dir, state_dir)
    model = cached_clip(cfg.model_name, cfg.pretrained, cache)
    classnames = training_classnames(cfg)
    method = build_method(cfg.method, cfg.rank, cfg.contrastive_weight, cfg.contrastive_temperature)
    learner = PromptLearner(
        method,
        PromptTextEncoder(model.model, model.tokenizer, classnames, cfg.n_ctx),
        float(model.model.logit_scale.exp()),
    )
    # SecFPP's nodes are evaluated with their cluster's p_G, which the server sent them, not with a mean
    p_global = (
        (server.published_global if cfg.method != "secfpp" else server.p_global) if method.shares_global else None
    )
    return build_published_prompt(
        learner,
        model,
        classnames,
        p_global,
        state.local,
        _exported_privacy(cfg, method, state, server),
        cfg.rank,
        _provenance(run_dir, state_dir, method, state, server),
        pretrained=cfg.pretrained,
        local_context=state.local_average,
    )


def _run_config(run_dir: Path) -> RunConfig:
    """The run's configuration, from a directory that must hold a finished round's checkpoint."""
    if not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(
            f"'{run_dir}' holds no {CHECKPOINT}: not a dpfpl run directory (or the run has not finished a round)"
        )
    if not (run_dir / RUN_CONFIG).is_file():
        raise FileNotFoundError(
            f"'{run_dir}' has no {RUN_CONFIG} (the run's configuration): runs written before "
            "export existed lack it; re-run, or copy it from the aggregator's run directory"
        )
    return RunConfig.model_validate_json((run_dir / RUN_CONFIG).read_text())


def _node_state_dir(run_dir: Path, node: int | None, state_dir: str | Path | None) -> Path:
    """A deployed node's own state directory, else simulated node ``node``'s under the run directory."""
    if state_dir is None:
        if node is None:
            raise ValueError("name the node: --node I (simulation) or --state-dir DIR (a deployed node's state)")
        state_dir = run_dir / "nodes" / f"node-{node}"
    return Path(state_dir)


def _node_and_server_state(run_dir: Path, state_dir: Path) -> tuple[NodeState, ServerState]:
    """The node's private state and the server's, which must belong to the same run."""
    state = NodeState.load(state_dir)
    if state is None:
        raise FileNotFoundError(f"no node state ({STATE_FILE}) in '{state_dir}'")
    server = RunDirectory(run_dir).load()
    if state.run_key != server.run_token:
        raise ValueError(
            f"the node state in '{state_dir}' belongs to another run (run token {state.run_key!r}, "
            f"the run directory's is {server.run_token!r})"
        )
    return state, server


def _exported_privacy(cfg: RunConfig, method: Method, state: NodeState, server: ServerState) -> PrivacyManifest:
    """The manifest's privacy section: the node's own accountant, and the server's books for the other
    clients' records in p_G."""
    others = None
    if cfg.dp and method.shares_global:
        # the server's books (as in its summary): worst case over all nodes, an upper bound for the others
        others = privacy_maxima(server, cfg.delta, method.local is not None, True)["epsilon-global-max"]
    return accountant_privacy(
        state.accountant,
        cfg.dp,
        cfg.delta,
        state.noise_multiplier_local,
        server.noise_multiplier_global if method.shares_global else None,
        others,
        outside_epsilon(cfg.method, cfg.dp),
    )


def _provenance(run_dir: Path, state_dir: Path, method: Method, state: NodeState, server: ServerState) -> dict:
    """Where the prompt comes from: run, node state, rounds, and the rounds its mean covers."""
    return {
        "run-dir": str(run_dir.resolve()),
        "node-state": str(state_dir.resolve()),
        "server-round": server.server_round,
        "node-round": state.last_round,
        # the published prompt is a mean of released iterates (post-processing: no epsilon of its own)
        "global-averaged-rounds": server.averaged_rounds if method.shares_global else 0,
        "local-averaged-rounds": state.averaged_rounds if method.local is not None else 0,
    }
