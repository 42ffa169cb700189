"""Run and node configuration: every knob is named once here and validated before any work starts.

Flower hands the run config over as a flat dict with hyphenated keys (``[tool.flwr.app.config]``);
``RunConfig.from_flower`` maps it onto this model so a typo or an out-of-range value fails at start-up
with the key's name, instead of deep inside round 37.

The schema imports nothing above it: what needs a data set or a protocol is checked where it is used, when a
run starts (the run's class list: ``common/run_classes.py``; SecFPP's parameters: ``check_run_config`` in
``common/secfpp/protocol.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .method_specs import METHOD_NAMES
from .pretrained import DEMO_MODEL

if TYPE_CHECKING:
    import torch

DatasetName = Literal[
    "demo",
    "silo",
    "caltech101",
    "oxford_pets",
    "oxford_flowers",
    "food101",
    "dtd",
    "cifar10",
    "cifar100",
    "folder",
    "csv",
]
# the run config's ``method``: a name of common/method_specs.py (``dpfpl.common.methods.build_method`` builds each)
MethodName = Literal[METHOD_NAMES]


class RunConfig(BaseModel):
    # allow_inf_nan=False: an infinite epsilon, learning rate or noise multiplier is refused with its key named
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: MethodName = "dpfpl"
    model_name: str = DEMO_MODEL
    pretrained: str = "demo"
    dataset: DatasetName = "demo"
    data_root: str = ""  # the folder holding the data set (CoOp's $DATA, torchvision's CIFAR root, a folder/CSV)
    classnames: str = ""  # silo mode: the run's class list, comma-separated, identical on every node
    silo_root: str = ""  # silo mode in simulation: node I reads silo-root/I (deployment: node config data-dir)
    partition: Literal["pathological", "dirichlet", "base-novel", "multi-domain"] = "pathological"
    num_domains: int = Field(2, ge=2)  # multi-domain: contiguous class blocks (demo: animals | digits)
    dirichlet_alpha: float = Field(0.3, gt=0)
    min_samples_per_client: int = Field(10, ge=1)  # dirichlet: redraw until every client has this many
    num_shots: int = Field(0, ge=0)  # k > 0: k training records per class of each client (few-shot)
    augment_views: int = Field(0, ge=0)  # > 0: random-resized-crop + flip views per training image, encoded once
    n_ctx: int = Field(16, ge=1, le=64)
    ctx_init: str = ""
    # the random init's std of a full-rank local prompt (CoOp/DP-FPL: 0.02); with ctx-init, a small value makes
    # the personalized prompt p_G + p_L start as the hand-written one
    local_init_std: float = Field(0.02, gt=0)
    rank: int = Field(8, ge=1)
    contrastive_weight: float = Field(0.5, ge=0)
    contrastive_temperature: float = Field(0.5, gt=0)

    # "validation": evaluate on a held-out part of each client's training records (test images unread); for
    # choosing hyperparameters without looking at test data
    evaluation: Literal["test", "validation"] = "test"
    validation_fraction: float = Field(0.2, gt=0, lt=1)

    # 0: as many clients as the federation has SuperNodes, counted by the ServerApp (pyproject's default, for
    # ``flwr run .``); dpfpl's own commands launch the federation themselves, sized by this default
    num_clients: int = Field(10, ge=0)
    classes_per_client: int = Field(2, ge=0)  # pathological / base-novel; 0: round(C/N), remainder to the last
    num_server_rounds: int = Field(100, ge=1)
    min_clients: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_every: int = Field(10, ge=1)
    eval_last: int = Field(10, ge=0)
    # The published prompt: p_G and each node's p_L averaged over their iterates of the last ``publish-average``
    # rounds. A mean of what was already released is post-processing: it costs no epsilon (docs/privacy.md).
    # 1: the final iterates. The summary reports this prompt's accuracy; ``dpfpl export`` writes it.
    publish_average: int = Field(10, ge=1)
    round_timeout: float = Field(3600.0, ge=0)  # seconds to wait for replies; 0: wait for every node
    # the setup phase (first contact: each node loads the model and encodes its whole data set) waits this long
    setup_timeout: float = Field(3600.0, ge=0)

    lr_global: float = Field(1e-4, gt=0)
    lr_local: float = Field(1e-4, gt=0)
    # > 0 (DP only): each node lowers its local step size so that its accumulated LDP noise stays within this
    # multiple of a typical context's norm (common/optim.py noise_bounded_lr); 0: lr-local for every node
    local_noise_radius: float = Field(0.0, ge=0)
    # > 0 (DP only): the server lowers its step on p_G by the same rule, for the global noise z_G C_G / (B n)
    global_noise_radius: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)

    dp: bool = True
    target_epsilon: float = Field(0.4, ge=0)
    # "published" (default): the noise is calibrated so that what a user takes away, the personalized prompt
    # p_G + p_L (and p_G, which reads it), meets target-epsilon; "each": every mechanism on its own meets it
    # (the published prompt then composes to more; the summary prints how much)
    calibrate_for: Literal["each", "published"] = "published"
    noise_multiplier_local: float = Field(0.0, ge=0)
    noise_multiplier_global: float = Field(0.0, ge=0)
    max_grad_norm_local: float = Field(10.0, gt=0)
    max_grad_norm_global: float = Field(10.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    # The Poisson sample rate q, public by declaration (docs/privacy.md): > 0 is every node's rate unless its
    # node config declares its own ``sample-rate``; 0: each node's node config must declare one (deployment),
    # or, in simulation, the simulated operator declares B / (its partition's planned size) at setup. q is never
    # recomputed from the records a node holds, so the add/remove-one guarantee is true for the rate in force.
    sample_rate: float = Field(0.0, ge=0, le=1)
    # false (default): torch's generator, OS-seeded under DP; true: every noise bit from the OS CSPRNG (no seeded
    # stream) and a sum-of-draws float64 Gaussian against floating-point attacks (common/privacy/mechanisms.py,
    # dpfpl/bench/secure_noise.py)
    secure_noise: bool = False
    # secure aggregation with distributed noise (docs/secure-aggregation.md): the server sees only the noised sum
    secure_aggregation: bool = False
    secagg_dropout_tolerance: int = Field(1, ge=0)  # clients that may drop mid-round; threshold t = N - this
    secagg_quantization_bits: int = Field(16, ge=1, le=40)  # one record's contribution = 2^bits integer units

    # SecFPP (docs/secfpp.md): secret-shared adaptive clustering of the clients, one global prompt per cluster
    secfpp_every: int = Field(1, ge=1)  # R: a clustering phase every R rounds
    secfpp_reduced_dim: int = Field(32, ge=1)  # d': public-basis projection of the clustering vector
    secfpp_slices: int = Field(1, ge=1)  # K: LCC data slices per share
    secfpp_privacy: int = Field(1, ge=1)  # T: colluding clients that learn nothing
    secfpp_quantization_bits: int = Field(16, ge=1, le=40)  # q: fixed-point bits of the unit clustering vector
    secfpp_threshold: float = Field(0.7, gt=0, le=4)  # lambda: squared distance (unit vectors) that opens a cluster
    secfpp_max_clusters: int = Field(4, ge=1)
    secfpp_min_cluster_size: int = Field(2, ge=1)  # a smaller cluster is dissolved (its aggregate = one prompt)
    secfpp_max_iter: int = Field(10, ge=1)

    seed: int = 0
    run_dir: str = "runs/latest"
    resume: bool = True

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if (
            self.dp
            and self.target_epsilon == 0
            and (self.noise_multiplier_local == 0 or self.noise_multiplier_global == 0)
        ):
            raise ValueError(
                "dp = true needs either target-epsilon > 0 (calibrate the noise) or both "
                "noise-multiplier-local and noise-multiplier-global > 0"
            )
        if self.dataset == "silo" and len(self.explicit_classnames()) < 2:
            raise ValueError("dataset = 'silo' needs classnames = \"name1,name2,...\" (at least two classes)")
        if self.dataset not in ("demo", "silo") and not self.data_root:
            raise ValueError(f"dataset = '{self.dataset}' needs data-root (the folder that holds it)")
        if self.dataset == "silo" and (self.partition != "pathological" or self.num_shots or self.augment_views):
            raise ValueError(
                "dataset = 'silo' is each organization's own data: partition, num-shots and augment-views do not apply"
            )
        if self.secure_aggregation and self.method in ("zeroshot", "coop"):
            raise ValueError(
                f"secure-aggregation = true, but method '{self.method}' shares no tensor: there is "
                "nothing to aggregate securely (use a method with a global prompt, or turn it off)"
            )
        if self.evaluation == "validation" and (self.dataset == "silo" or self.partition == "base-novel"):
            raise ValueError(
                "evaluation = 'validation' holds out part of the partitioned training split: it "
                "needs a partitioned data set and a partition other than base-novel (whose novel "
                "classes have no training records to hold out)"
            )
        if self.num_clients and self.min_clients > self.num_clients:
            raise ValueError(f"min-clients ({self.min_clients}) > num-clients ({self.num_clients})")
        return self

    @classmethod
    def from_flower(cls, run_config: dict) -> RunConfig:
        return cls(**{k.replace("-", "_"): v for k, v in run_config.items()})

    @classmethod
    def field_default(cls, name: str) -> Any:
        """One key's default (its underscored name): tools that need a default read it here, so that each is
        written once, in its ``Field`` above."""
        return cls.model_fields[name].default

    @classmethod
    def defaults(cls) -> dict:
        """Every key's default, hyphenated as in ``[tool.flwr.app.config]`` (which must repeat them for ``flwr
        run``; a test holds the two equal)."""
        return cls().to_flower()

    def to_flower(self) -> dict:
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

    def evaluates_after(self, server_round: int) -> bool:
        """The evaluation schedule: every ``eval-every`` rounds, the last round, and each of the last ``eval-last``
        rounds (the papers report the mean over the last 10 rounds). The server follows it; a node bounds the
        evaluations it answers by it."""
        return (
            server_round % self.eval_every == 0
            or server_round == self.num_server_rounds
            or server_round > self.num_server_rounds - self.eval_last
        )

    def averages_for_publication(self, server_round: int) -> bool:
        """Whether this round's iterates enter the published prompt's mean (the last ``publish-average`` rounds)."""
        return server_round > self.num_server_rounds - self.publish_average

    @property
    def scheduled_evaluations(self) -> int:
        """How many evaluation messages a run sends each node: the zero-shot setup phase, the schedule, and (for
        a method that trains) the published prompt's evaluation after the last round."""
        rounds, every, last = self.num_server_rounds, self.eval_every, min(self.eval_last, self.num_server_rounds)
        multiples_outside_last = (rounds - last) // every  # counted once, outside the last block
        final_counted = last >= 1 or rounds % every == 0
        published = 0 if self.method == "zeroshot" else 1
        return 1 + multiples_outside_last + last + (0 if final_counted else 1) + published

    def explicit_classnames(self) -> list[str]:
        names = [c.strip() for c in self.classnames.split(",") if c.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"classnames has duplicates: {names}")
        return names

    @property
    def uses_calibration(self) -> bool:
        return self.dp and self.target_epsilon > 0


class NodeConfig(BaseModel):
    """What a SuperNode is told by its operator (``--node-config``) or by the simulation engine."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    partition_id: int | None = Field(None, ge=0)
    num_partitions: int | None = Field(None, ge=1)
    state_dir: str | None = None
    cache_dir: str | None = None
    data_dir: str | None = None  # silo mode: this organization's images
    # the ordered class list this organization agreed to (comma-separated); when set, a run whose class list
    # differs is refused before any work (see common/classlist.py)
    classnames: str | None = None
    device: str = "auto"  # "cpu", "cuda", "cuda:1"; "auto": a GPU when present
    num_threads: int = Field(1, ge=1)  # torch's intra-op threads for this node's work
    # This organization's Poisson sample rate, public by declaration: chosen by its operator without reading
    # the records (e.g. batch-size / a public, approximate size of the silo) and sent to the server at setup.
    # Overrides the run config's ``sample-rate``; under DP, a deployed node needs one of the two.
    sample_rate: float | None = Field(None, gt=0, le=1)
    # The node's own privacy ceiling over every run it ever takes part in, on the same records: each release
    # is composed with all earlier ones (the node's ledger, ``dpfpl ledger``) and a run or a step that would
    # go past it is refused, whatever the server asks. None: only each run's own target is enforced.
    lifetime_epsilon: float | None = Field(None, gt=0)
    lifetime_delta: float = Field(1e-5, gt=0, lt=1)  # the delta the ledger's composed epsilon is stated at
    # Privilege separation (docs/deployment.md): the SuperNode's node config names only the worker's socket, and
    # its ClientApps forward every message there and never answer themselves (they cannot read the data).
    worker_socket: str | None = None
    # Who adds the global noise to the shared gradient before it leaves: "aggregator" (the central mode: the
    # node trusts the server to add z_G to the sum) or "node" (the node adds N(0, (z_G C_G)^2) itself, so what
    # leaves is within the node's own epsilon whoever receives it; a separated node's worker requires it).
    global_noise: Literal["aggregator", "node"] = "aggregator"
    # Evaluation replies (accuracy and loss on this node's records) are outside epsilon: at most this many in any
    # 24 hours, counted in the node's ledger, and never more per run than the run's schedule (None: no limit).
    evaluations_per_day: int | None = Field(None, ge=0)
    # Where the weights files this node's operator approved live: a run's ``pretrained`` path outside it is
    # refused by a separated worker (a path to any other file would be read by the user that can read the data).
    weights_dir: str | None = None
    allow_secfpp: bool = False
    """Whether a separated worker answers SecFPP (``method = "secfpp"`` and its ``train.secfpp_*`` clustering
    messages). Opting in releases what is outside epsilon there: SecFPP's clustering vector, computed from the
    training features without noise, leaves as secret shares encrypted to public keys the caller names, so
    whoever can submit a run can ask for every share under keys of its own and rebuild the vector, and no budget
    or quota counts those replies (docs/threat-model.md). Opt in only where every party that can submit a run is
    trusted with that vector. False (default): a separated worker refuses SecFPP; a single-user node or a
    simulation (no policy) is not affected."""

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"node config device='{self.device}' but this machine has no usable CUDA GPU; "
                    'use device="cpu" or "auto"'
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"node config device='{self.device}' but only {torch.cuda.device_count()} GPU(s)")
        return device

    @classmethod
    def from_flower(cls, node_config: dict) -> NodeConfig:
        return cls(**{k.replace("-", "_"): v for k, v in node_config.items()})

    def resolved_state_dir(self, run_dir: str) -> Path:
        """Node-local state directory: from node config, else under the run directory (simulation)."""
        if self.state_dir:
            return Path(self.state_dir)
        if self.partition_id is None:
            raise ValueError("node config needs 'state-dir' (or 'partition-id' in simulation)")
        return Path(run_dir) / "nodes" / f"node-{self.partition_id}"
