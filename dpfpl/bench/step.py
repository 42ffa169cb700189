"""Benchmark of a DP-FPL client step and of whole rounds: prints a table and writes JSON.

    dpfpl bench                                # = python -m dpfpl.bench.step: everything, CPU (an hour or more on
                                               # 2 shared cores: the ViT-B-16 step case alone took 19 min)
    dpfpl bench --quick                        # fewer repeats/rounds, no ViT-B-16 ablation
    python -m dpfpl.bench.step --only step,scaling   # parts: step, scaling, client, flower, deployment
    python -m dpfpl.bench.step --device cuda         # the same on a GPU

Every case runs in a fresh subprocess (``--case``), so its peak resident memory is its own; inside a case,
variants are timed interleaved (ours, plain, naive, ...) in the same process, and peak memory is reset
before each variant (Linux ``/proc/self/clear_refs``; on CUDA ``reset_peak_memory_stats``), so every time
has its own peak next to it. Ratios within a case are what to read when the machine is shared.

Sections:
  step     our DP step vs our non-private step vs the naive reference (``dpfpl/bench/reference.py``), embedded
           default model (C = 20) and ViT-B-16 (random weights) at C = 100, B = 32, n_ctx = 16, rank 8;
           ablation: our DP step without the shared prefix (truncation + batched per-sample grads only).
  scaling  step time over C (10, 100, 1000 at B = 32) and B (8, 32, 128 at C = 100).
  client   seconds per round and peak RSS of one client (PromptNode.train), cold (model, features,
           calibration) and warm rounds: embedded default and ViT-B-16 at C = 100.
  flower   wall time per round of the embedded default in Flower's simulation (10 clients) and in a
           deployment (SuperLink + 2 SuperNodes on loopback), against the summed client compute; also runs
           the deployment section.
  deployment  3 organizations over TLS with node authentication (deploy/'s scripts, as tests/test_deployment.py),
           DP, evaluation only in the last of 4 rounds, plain and secure aggregation, each with Flower's
           send_and_receive and with the ServerApp's own exchange loop: per warm round the exchanges, the
           nodes' handler time, the ClientApps' start-up, the polls on the way and the floor they imply.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpfpl.common.pretrained import DEMO_MODEL

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ measuring
def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


class Peak:
    """Peak memory of a block: resident set (CPU) or allocated (CUDA), reset at entry."""

    def __init__(self, device) -> None:
        self.device = device

    def __enter__(self) -> Peak:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.rss_before = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.cuda_peak_mib = torch.cuda.max_memory_allocated() / 2**20
        self.seconds = time.perf_counter() - self.t0
        self.peak_rss_mib = _status("VmHWM")
        self.delta_mib = self.peak_rss_mib - self.rss_before

    def record(self) -> dict:
        out = {
            "seconds": self.seconds,
            "peak_rss_mib": round(self.peak_rss_mib),
            "peak_delta_mib": round(self.delta_mib),
        }
        if self.device.type == "cuda":
            out["cuda_peak_mib"] = round(self.cuda_peak_mib)
        return out


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = math.nan
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def classnames(count: int) -> list[str]:
    """Real class names (ImageNet's, as OpenCLIP ships them), cycled with a suffix beyond 1000."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    return [names[i % len(names)] + ("" if i < len(names) else f" {i // len(names)}") for i in range(count)]


# ------------------------------------------------------------------------------------------ step case
def case_step(spec: dict) -> dict:
    """One (model, C, B): variants of the DP-FPL client step, interleaved, each with its peak memory."""
    import torch
    import torch.nn.functional as F

    from dpfpl.bench.reference import FullContextEncoder, naive_dpfpl_step
    from dpfpl.common.methods import DpSettings, PromptLearner, SgdSettings, build_method
    from dpfpl.common.methods.engine import memory_chunk_size
    from dpfpl.common.models import load_clip
    from dpfpl.common.prompt import PromptTextEncoder, random_context

    device = torch.device(spec["device"])
    model = load_clip(spec["model"], "none")
    model.model.to(device)
    names, batch, n_ctx = classnames(spec["classes"]), spec["batch"], spec["n_ctx"]
    gen = torch.Generator().manual_seed(0)
    dim = model.model.text_projection.shape[1]
    # Our step reads cached image features (computed once per image, untimed here: the values do not change
    # the compute); the batch is the whole feature set at rate 1, so every variant sees exactly B samples.
    feats = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(device)
    labels = torch.randint(0, len(names), (batch,), generator=gen).to(device)
    width = model.model.token_embedding.weight.shape[1]
    p_global = random_context(n_ctx, width, gen).to(device)
    method = build_method("dpfpl", rank=spec["rank"])
    scale = float(model.model.logit_scale.exp())
    opt = SgdSettings(1e-3)
    dp_on = DpSettings(True, 1.0, 10.0, 10.0)
    dp_off = DpSettings(False, 0.0, 10.0, 10.0)
    encoders = {"shared": PromptTextEncoder(model.model, model.tokenizer, names, n_ctx).to(device)}
    learners = {"shared": PromptLearner(method, encoders["shared"], scale)}
    local = learners["shared"].init_local(gen)
    local = {k: v.to(device) for k, v in local.items()}

    def ours(key: str, dp: DpSettings):
        def run():
            return learners[key].train_step(
                p_global, local, {}, feats, labels, batch, dp, opt, torch.Generator().manual_seed(1)
            )

        return run

    variants = {"ours-dp": ours("shared", dp_on), "ours-plain": ours("shared", dp_off)}
    if spec.get("ablation"):
        encoders["full"] = PromptTextEncoder(model.model, model.tokenizer, names, n_ctx, share_prefix=False).to(device)
        learners["full"] = PromptLearner(method, encoders["full"], scale)
        variants["no-shared-prefix-dp"] = ours("full", dp_on)
        variants["no-shared-prefix-plain"] = ours("full", dp_off)
    naive_info = {}
    if spec.get("naive"):
        size = model.model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        pixels = torch.randn(batch, 3, size, size, generator=gen).to(device)
        full_enc = FullContextEncoder(model.model, model.tokenizer, names, n_ctx).to(device)

        def naive():
            out = naive_dpfpl_step(
                model.model,
                full_enc,
                pixels,
                labels,
                batch,
                p_global,
                local["p_local"],
                spec["rank"],
                1.0,
                10.0,
                10.0,
                1e-3,
                torch.Generator().manual_seed(1),
                scale,
                spec.get("naive_samples"),
            )
            naive_info.update({k: v for k, v in out.items() if isinstance(v, (int, float, bool))})
            return out

        variants["naive-dp"] = naive

    results: dict[str, list[dict]] = {name: [] for name in variants}
    if spec.get("warmup", True):
        for name, fn in variants.items():
            if name != "naive-dp":
                fn()
    for _ in range(spec["repeats"]):
        for name, fn in variants.items():
            with Peak(device) as peak:
                out = fn()
            rec = peak.record()
            if name == "naive-dp":  # the reference reports its own (possibly extrapolated) total
                rec["measured_seconds"] = rec["seconds"]
                rec["seconds"] = out["seconds"]
            results[name].append(rec)
    summary = {}
    for name, recs in results.items():
        summary[name] = {
            "seconds": statistics.median(r["seconds"] for r in recs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in recs),
            "peak_delta_mib": max(r["peak_delta_mib"] for r in recs),
            "runs": recs,
        }
        if device.type == "cuda":
            summary[name]["cuda_peak_mib"] = max(r["cuda_peak_mib"] for r in recs)
    if naive_info:
        summary["naive-dp"].update(naive_info)
    enc = encoders["shared"]
    return {
        "variants": summary,
        "sequence_length": enc.sequence_length,
        "context_length": int(full_tokens(model)),
        "shared_prefix": enc.share_prefix,
        "chunk_size": memory_chunk_size(enc, batch, device),
        "threads": torch.get_num_threads(),
    }


def full_tokens(model) -> int:
    return model.model.context_length if hasattr(model.model, "context_length") else 77


# ------------------------------------------------------------------------------------------ client case
def _write_silo(root: Path, classes: list[str], train: int, test: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def case_client(spec: dict) -> dict:
    """One client's rounds (PromptNode.train, as the ClientApp runs it): cold first round, warm rounds."""
    import torch

    from dpfpl.client_app.node import PromptNode
    from dpfpl.common.config import NodeConfig, RunConfig
    from dpfpl.common.prompt import initial_global_prompt
    from dpfpl.inprocess import full_run_config

    tmp = Path(tempfile.mkdtemp(prefix="dpfpl-bench-"))
    overrides = dict(spec["config"])
    node_cfg = {"partition-id": 0, "cache-dir": str(tmp / "cache")} if spec.get("silo") else {"partition-id": 0}
    if spec.get("silo"):
        names = classnames(spec["classes"])
        _write_silo(tmp / "silo", names[: spec["silo_classes"]], spec["silo_train"], 2, seed=0)
        overrides.update({"dataset": "silo", "classnames": ",".join(names)})
        node_cfg["data-dir"] = str(tmp / "silo")
    cfg = RunConfig.from_flower(full_run_config({**overrides, "run-dir": str(tmp / "run")}))
    device = torch.device(spec["device"])
    node_cfg["device"] = spec["device"]
    rounds = []
    with Peak(device) as cold:
        node = PromptNode(cfg, NodeConfig.from_flower(node_cfg))
        p_global = initial_global_prompt(cfg)
        node.train(p_global, 1, "bench", 5.0)
    for r in range(2, spec["rounds"] + 2):
        with Peak(device) as warm:
            node.train(p_global, r, "bench", 5.0)
        rounds.append(warm.record())
    return {
        "cold_first_round": cold.record(),
        "warm_rounds": rounds,
        "warm_seconds": statistics.median(x["seconds"] for x in rounds),
        "peak_rss_mib": max([cold.peak_rss_mib] + [x["peak_rss_mib"] for x in rounds]),
        "num_train": node.data.num_train,
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------ flower cases
def _round_seconds(run_dir: Path, last_round: int, evaluated: bool = False) -> list[dict]:
    """Per training round without evaluation (the last round also evaluates: left out): the round's wall time
    at the server and the clients' own compute in it (``client-seconds`` each ClientApp reports: building the
    node from its caches + the step), summed and the slowest."""
    from dpfpl.common.metrics import read_metrics_log

    rows = read_metrics_log(run_dir / "metrics.jsonl")
    return [
        {
            "round": r["round"],
            "seconds": r["round-seconds"],
            "client_sum": r.get("client-seconds-sum"),
            "client_max": r.get("client-seconds-max"),
            "clientapp_age_max": r.get("clientapp-age-max"),
            "exchanges": r.get("exchanges"),
            "exchange_seconds": r.get("exchange-seconds"),
            "server_poll_bound": r.get("server-poll-bound-seconds"),
        }
        for r in rows
        if r.get("phase") == "train" and r["round"] < last_round and (evaluated or "local-acc" not in r)
    ]


_ANSWERED = re.compile(r"(\S+) answered in ([0-9.]+) s \(ClientApp ([0-9.]+|-) s old\)")


def _worker_handlers(log: Path) -> list[dict]:
    """The node worker's answers in order (``client_app/worker.py`` logs each): operation, the handler's seconds
    and how old the ClientApp process that forwarded it was (its start-up share)."""
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        m = _ANSWERED.search(line)
        if m:
            out.append({"op": m[1], "seconds": float(m[2]), "age": None if m[3] == "-" else float(m[3])})
    return out


def case_simulation(spec: dict) -> dict:
    from dpfpl.launch import run_simulation

    tmp = Path(tempfile.mkdtemp(prefix="dpfpl-bench-sim-"))
    config = {**spec["config"], "run-dir": str(tmp / "run"), "resume": False}
    started = time.time()
    # num-cpus per client = all cores: Ray runs one ClientApp at a time, so the round's wall time and the
    # summed client compute are comparable (no overlap between clients)
    # on CUDA each ClientApp gets the whole GPU (Ray hides GPUs from actors that ask for none)
    run_simulation(
        config,
        spec["clients"],
        tmp,
        num_cpus_per_client=os.cpu_count() or 1,
        stream=False,
        timeout=3600,
        num_gpus_per_client=1.0 if spec.get("device") == "cuda" else 0.0,
    )
    return {
        "wall_seconds": time.time() - started,
        "round_seconds": _round_seconds(tmp / "run", config["num-server-rounds"]),
    }


def case_deployment(spec: dict) -> dict:
    """SuperLink + N SuperNodes (insecure, loopback) started with deploy/'s scripts; silo data per node; each
    node with its resident worker (``spec["worker"]``, the script's default) or without (every ClientApp
    process then loads torch and the model for its one message)."""

    from dpfpl.launch import free_port, stop_launched, submit_run, wait_for_port

    tmp = Path(tempfile.mkdtemp(prefix="dpfpl-bench-dep-"))
    tag = f"bench-{os.getpid()}-{time.time_ns()}"
    venv_bin = str(Path(sys.executable).parent)
    tls = bool(spec.get("tls"))
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "DPFPL_LAUNCH_TAG": tag,
        "DPFPL_INSECURE": "0" if tls else "1",
        "DPFPL_NODE_WORKER": "1" if spec.get("worker", True) else "0",
        # measured, not tested for liveness: a worker whose start-up a loaded host slows past the supervisor's
        # 15 s would be killed and restarted over and over
        "DPFPL_WORKER_HUNG_AFTER": os.environ.get("DPFPL_WORKER_HUNG_AFTER", "120"),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    if spec.get("exchange") == "flower":  # the ServerApp uses Flower's send_and_receive (server_app/exchange.py)
        env["DPFPL_EXCHANGE"] = "flower"
    else:
        env.pop("DPFPL_EXCHANGE", None)
    certs = tmp / "certs"
    if tls:  # as tests/test_deployment.py: the CA and the SuperLink's certificate, one key per organization
        subprocess.run(
            ["bash", str(ROOT / "deploy" / "gen-certs.sh"), str(certs), "localhost"],
            check=True,
            env=env,
            capture_output=True,
        )
        (tmp / "aggregator").mkdir()
        for name in ("ca.crt", "server.pem", "server.key"):
            shutil.copy2(certs / name, tmp / "aggregator" / name)
        for i in range(spec["clients"]):
            subprocess.run(
                ["bash", str(ROOT / "deploy" / "gen-node-key.sh"), str(tmp / f"org{i}" / "keys"), f"supernode-{i}"],
                check=True,
                env=env,
                capture_output=True,
            )
            shutil.copy2(certs / "ca.crt", tmp / f"org{i}" / "keys" / "ca.crt")
    port = free_port()
    procs = []
    names = spec["classnames"]

    def start(args, log):
        proc = subprocess.Popen(
            args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp
        )
        procs.append(proc)
        return proc

    try:
        link = start(
            [
                "bash",
                str(ROOT / "deploy" / "start-superlink.sh"),
                str(tmp / "aggregator") if tls else "-",
                "127.0.0.1",
                str(port),
                str(tmp / "superlink.db"),
            ],
            tmp / "superlink.log",
        )
        wait_for_port(port, link, tmp / "superlink.log")
        (tmp / "flwr-home").mkdir(exist_ok=True)
        if tls:
            subprocess.run(
                ["bash", str(ROOT / "deploy" / "connect.sh"), "bench", f"127.0.0.1:{port}", str(certs / "ca.crt")]
                + [str(tmp / f"org{i}" / "keys" / f"supernode-{i}.pub") for i in range(spec["clients"])],
                check=True,
                env=env,
                capture_output=True,
                cwd=tmp,
            )
        else:
            (tmp / "flwr-home" / "config.toml").write_text(
                f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
            )
        for i in range(spec["clients"]):
            silo = tmp / f"org{i}" / "data"
            _write_silo(silo, names[2 * i : 2 * i + 2], spec["silo_train"], 2, seed=i)
            start(
                [
                    "bash",
                    str(ROOT / "deploy" / "start-supernode.sh"),
                    f"127.0.0.1:{port}",
                    str(silo),
                    str(tmp / f"org{i}" / "state"),
                    str(tmp / f"org{i}" / "keys") if tls else "-",
                    f"supernode-{i}" if tls else "-",
                    str(free_port()),
                    spec.get("device", "cpu"),
                ],
                tmp / f"supernode-{i}.log",
            )
        config = {**spec["config"], "run-dir": str(tmp / "run"), "resume": False}
        started = time.time()
        submit_run("bench", config, env=env, timeout=3600, stream=False, cwd=tmp)
        loads = [
            json.loads(p.read_text()).get("model-loads") for p in sorted(tmp.glob("org*/state/worker.json"))
        ]  # one per node and run when the workers stayed up
        return {
            "wall_seconds": time.time() - started,
            "round_seconds": _round_seconds(tmp / "run", config["num-server-rounds"], bool(spec.get("evaluated"))),
            "worker_model_loads": loads,
            "handlers": [_worker_handlers(p) for p in sorted(tmp.glob("org*/state/worker.log"))],
        }
    finally:
        stop_launched(procs, tag)


CASES = {"step": case_step, "client": case_client, "simulation": case_simulation, "deployment": case_deployment}


# ------------------------------------------------------------------------------------------ driver
def run_case(kind: str, spec: dict, threads: int) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is the JSON result."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    started = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpfpl.bench.step",
            "--case",
            json.dumps({"kind": kind, **spec}),
            "--threads",
            str(threads),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
            "spec": spec,
        }
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"spec": spec, "case_wall_seconds": round(time.time() - started, 1)})
    return result


def _fmt_s(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def plan(args) -> list[tuple[str, str, dict]]:
    dev, quick = args.device, args.quick
    base = {"device": dev, "n_ctx": 16, "rank": 8}
    vit_naive = None if dev == "cuda" else args.naive_samples
    cases: list[tuple[str, str, dict]] = []
    if "step" in args.only:
        cases.append(
            (
                "step",
                "demo C=20 B=32",
                {
                    **base,
                    "model": DEMO_MODEL,
                    "classes": 20,
                    "batch": 32,
                    "repeats": 3,
                    "naive": True,
                    "ablation": True,
                },
            )
        )
        cases.append(
            (
                "step",
                "ViT-B-16 C=100 B=32",
                {
                    **base,
                    "model": "ViT-B-16",
                    "classes": 100,
                    "batch": 32,
                    "repeats": 1 if quick else 2,
                    "naive": True,
                    "naive_samples": vit_naive,
                    "ablation": not quick,
                    "warmup": False,
                },
            )
        )
    if "scaling" in args.only:
        model = "ViT-B-16" if args.scaling_model == "vit" else DEMO_MODEL
        for c in (10, 100, 1000):
            cases.append(
                (
                    "step",
                    f"scaling {model} C={c} B=32",
                    {**base, "model": model, "classes": c, "batch": 32, "repeats": 2},
                )
            )
        for b in (8, 128):  # B = 32 at C = 100 is the row above
            cases.append(
                (
                    "step",
                    f"scaling {model} C=100 B={b}",
                    {**base, "model": model, "classes": 100, "batch": b, "repeats": 2},
                )
            )
    rounds = 3 if quick else 5
    demo_cfg = {"lr-global": 0.1, "lr-local": 0.1, "num-server-rounds": 100}  # the demo preset's run config
    if "client" in args.only or "flower" in args.only:
        cases.append(
            ("client", "client: demo default (1 of 10)", {"device": dev, "config": demo_cfg, "rounds": rounds})
        )
    if "client" in args.only:
        cases.append(
            (
                "client",
                "client: ViT-B-16 C=100",
                {
                    "device": dev,
                    "rounds": 2,
                    "silo": True,
                    "classes": 100,
                    "silo_classes": 8,
                    "silo_train": 8,
                    "config": {"model-name": "ViT-B-16", "pretrained": "none"},
                },
            )
        )
    if "flower" in args.only:
        sim_rounds = rounds + 1
        cases.append(
            (
                "simulation",
                "flower simulation: demo default, 10 clients",
                {
                    "clients": 10,
                    "device": dev,
                    "config": {**demo_cfg, "num-server-rounds": sim_rounds, "eval-every": 1000, "eval-last": 0},
                },
            )
        )
        dep_names = classnames(4)
        dep_cfg = {
            "dataset": "silo",
            "classnames": ",".join(dep_names),
            "model-name": DEMO_MODEL,
            "pretrained": "none",
            "num-clients": 2,
            "min-clients": 2,
            "num-server-rounds": sim_rounds,
            "eval-every": 1000,
            "eval-last": 0,
            "batch-size": 32,
            "sample-rate": 0.25,  # declared (public): batch-size 32 / the 2 x 64 training images of each silo
        }
        for worker in (False, True):
            cases.append(
                (
                    "deployment",
                    f"deployment: 2 SuperNodes, {'with' if worker else 'no'} worker",
                    {
                        "clients": 2,
                        "device": dev,
                        "classnames": dep_names,
                        "silo_train": 64,
                        "config": dep_cfg,
                        "worker": worker,
                    },
                )
            )
        secure_names = classnames(6)
        secure_cfg = {
            **dep_cfg,
            "classnames": ",".join(secure_names),
            "num-clients": 3,
            "min-clients": 3,
            "num-server-rounds": 4 if quick else 5,
            "secure-aggregation": True,
            "secagg-dropout-tolerance": 1,
            "round-timeout": 300.0,
        }
        for worker in (False, True):
            cases.append(
                (
                    "deployment",
                    f"secure aggregation: 3 SuperNodes, {'with' if worker else 'no'} worker",
                    {
                        "clients": 3,
                        "device": dev,
                        "classnames": secure_names,
                        "silo_train": 64,
                        "config": secure_cfg,
                        "worker": worker,
                    },
                )
            )
    if "flower" in args.only or "deployment" in args.only:
        cases += deployment_cases(dev)
    return cases


def deployment_cases(dev: str) -> list[tuple[str, str, dict]]:
    """The 3-organization TLS deployment of tests/test_deployment.py (DP, evaluation only in the last of 4 rounds), plain
    and under secure aggregation, each with Flower's ``send_and_receive`` ("before") and with the ServerApp's own
    exchange loop (server_app/exchange.py, "after"), in one benchmark run."""
    names = classnames(6)
    cfg = {
        "dataset": "silo",
        "classnames": ",".join(names),
        "model-name": DEMO_MODEL,
        "pretrained": "none",
        "num-clients": 3,
        "min-clients": 3,
        "num-server-rounds": 4,
        "eval-every": 4,  # evaluation only in the last round: a warm round is one train exchange
        "eval-last": 1,
        "batch-size": 8,
        "target-epsilon": 1.0,
        "sample-rate": 0.34,  # declared (public): batch-size 8 / the 2 x 12 training images of each silo
        "round-timeout": 120.0,
    }
    secure = {**cfg, "secure-aggregation": True, "secagg-dropout-tolerance": 1}
    cases = []
    for label, config in (("plain", cfg), ("secure aggregation", secure)):
        for exchange, when in (("flower", "before: Flower's send_and_receive"), ("dpfpl", "after: own exchange")):
            spec = {"clients": 3, "device": dev, "classnames": names, "silo_train": 12, "config": config}
            spec.update({"tls": True, "exchange": exchange})
            cases.append(("deployment", f"TLS 3 orgs, {label}, {when}", spec))
    return cases


# Flower 1.41's polls on a message's way (read from its source), and this project's settings of them
SUPERNODE_IDLE_PULL = 3.0  # flwr.supernode.start_client_internal: time.sleep(3) after a pull finds nothing
SUPEREXEC_POLL = 0.2  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL as deploy/start-supernode.sh sets it (Flower: 1 s)
CLIENTAPP_REPLY_POLL = 0.5  # the SuperNode looks for the ClientApp's reply every 0.5 s before pushing it

FLOOR_NOTE = """\
  per exchange (one message to every node and its reply): handler = the node worker's time for it, app age =
  how old the fresh ClientApp process was when it asked the worker (its start-up), both the slowest node's,
  median over the warm exchanges (node worker logs). polls: the SuperNode pulls again only 3 s after a pull
  that found nothing, and its pull right after pushing a reply always finds nothing (the ServerApp cannot have
  the next message yet), so every exchange waits out that 3 s; then the SuperExec's poll (0.2 s, half on
  average) and the SuperNode's 0.5 s poll for the ClientApp's reply (half on average). The ServerApp's own
  poll (srv poll: the bound per exchange, summed over the round) is hidden inside the node's 3 s unless it
  pushes the next message past the node's next pull. floor = exchanges x (3 + 0.1 + 0.25 + app age +
  handler); x floor = s/round / floor."""


def _per_exchange(handlers: list[list[dict]], key: str) -> float | None:
    """The median over warm exchanges of the slowest node's ``key``: each node's answers after its first train
    (round 1, cold) are lined up by position; nodes that answered a different number fall back to all answers."""
    warm = []
    for answers in handlers:
        ops = [a["op"] for a in answers]
        first = ops.index("train") if "train" in ops else -1
        warm.append([a[key] for a in answers[first + 1 :] if a[key] is not None])
    if not warm or not all(warm):
        return None
    if len({len(w) for w in warm}) == 1:
        return statistics.median(max(col) for col in zip(*warm, strict=True))
    return statistics.median(x for w in warm for x in w)


def floor_report(results: list[dict]) -> list[str]:
    rows = [r for r in results if r["kind"] == "deployment" and r.get("handlers") and r.get("round_seconds")]
    if not rows:
        return []
    lines = [
        "",
        f"{'deployment, warm rounds (train only)':<58}{'s/round':>8}{'exch':>5}{'handler':>8}{'app age':>8}"
        f"{'srv poll':>9}{'floor':>7}{'x floor':>8}",
    ]
    for r in rows:
        warm = [x for x in r["round_seconds"] if x["round"] > 1] or r["round_seconds"]
        mid = sorted(warm, key=lambda x: x["seconds"])[len(warm) // 2]
        handler, age = _per_exchange(r["handlers"], "seconds"), _per_exchange(r["handlers"], "age")
        exchanges = mid.get("exchanges")
        floor = None
        if exchanges and handler is not None and age is not None:
            per = SUPERNODE_IDLE_PULL + SUPEREXEC_POLL / 2 + CLIENTAPP_REPLY_POLL / 2 + age + handler
            floor = exchanges * per
        r["floor"] = {
            "round": mid["round"],
            "seconds_per_round": mid["seconds"],
            "warm_rounds": [x["seconds"] for x in warm],
            "exchanges": exchanges,
            "handler": handler,
            "clientapp_age": age,
            "server_poll_bound": mid.get("server_poll_bound"),
            "floor": floor,
        }
        lines.append(
            f"{r['label']:<58}{mid['seconds']:>8.2f}{exchanges or '-':>5}{_fmt_s(handler):>8}{_fmt_s(age):>8}"
            f"{_fmt_s(mid.get('server_poll_bound')):>9}{_fmt_s(floor):>7}"
            f"{'-' if floor is None else format(mid['seconds'] / floor, '.2f'):>8}"
        )
        lines.append(f"{'':<4}warm rounds: {', '.join(f'{x:.2f}' for x in r['floor']['warm_rounds'])} s")
    lines.append(FLOOR_NOTE)
    return lines


BOUND_NOTE = """\
  bound (1+2B)/3: the non-private step is one forward and one backward of the text tower over the batch;
  counting a backward as 2 forward-equivalents (the usual rule), that is 3. The DP step needs B per-sample
  gradients: one shared forward and B backward passes (one per sample's loss) = 1 + 2B. So a DP step that
  does no worse than B separate backward passes costs at most (1+2B)/3 non-private steps; "of it" is the
  measured ratio over that bound (target <= 1.5). With frozen weights a backward only propagates to the input
  (no weight gradients), closer to 1 forward-equivalent, which would give the tighter (1+B)/2."""


def _round_summary(r: dict) -> dict:
    """The median warm round of a Flower case (by wall time) against the clients' own compute, and the mean and
    range of the warm rounds: in a deployment a round's time steps with the phase of Flower's 3 s polls."""
    # round 1 is cold (every node builds its model, features and noise calibration): left out
    rows = [x for x in r["round_seconds"] if x["round"] > 1] or r["round_seconds"]
    # simulation: one ClientApp at a time (each takes all cores), so the clients' compute adds up;
    # deployment: the SuperNodes train in parallel, so the round cannot be shorter than the slowest
    key = "client_sum" if r["kind"] == "simulation" else "client_max"
    mid = sorted(rows, key=lambda x: x["seconds"])[len(rows) // 2]  # the median round (the upper one of two)
    floor = mid[key]
    seconds = [x["seconds"] for x in rows]
    return {
        "round": mid["round"],
        "seconds_per_round": mid["seconds"],
        "mean_seconds_per_round": sum(seconds) / len(seconds),
        "min_seconds_per_round": min(seconds),
        "max_seconds_per_round": max(seconds),
        "summed_client_compute": mid["client_sum"],
        "slowest_client": mid["client_max"],
        "overhead_seconds": None if floor is None else mid["seconds"] - floor,
        "overhead_share": None if floor is None else 1 - floor / mid["seconds"],
        "clientapp_age_max": mid.get("clientapp_age_max"),
    }


def report(results: list[dict]) -> str:
    lines = []
    steps = [r for r in results if r["kind"] == "step" and "variants" in r]
    if steps:
        lines.append(f"{'case':<30}{'variant':<24}{'s/step':>10}{'peak RSS MiB':>14}{'+MiB':>8}  note")
        for r in steps:
            v, b = r["variants"], r["spec"]["batch"]
            for name, rec in v.items():
                note = ""
                if name == "naive-dp" and rec.get("extrapolated"):
                    note = f"per-sample loop timed on {rec['samples_timed']} of {rec['batch']} samples, x{rec['batch'] / rec['samples_timed']:.0f}"
                lines.append(
                    f"{r['label']:<30}{name:<24}{rec['seconds']:>10.3f}{rec['peak_rss_mib']:>14}"
                    f"{rec['peak_delta_mib']:>8}  {note}"
                )
            dp, plain = v["ours-dp"]["seconds"], v["ours-plain"]["seconds"]
            bound = (1 + 2 * b) / 3
            extra = f"; naive/ours-dp = {v['naive-dp']['seconds'] / dp:.1f}x" if "naive-dp" in v else ""
            if "no-shared-prefix-dp" in v:
                extra += f"; shared prefix speed-up (DP) = {v['no-shared-prefix-dp']['seconds'] / dp:.1f}x"
            lines.append(
                f"{'':<30}=> ours-dp/ours-plain = {dp / plain:.2f} (bound (1+2B)/3 = {bound:.1f}, "
                f"{dp / plain / bound:.2f} of it){extra}; L = {r['sequence_length']} of "
                f"{r['context_length']}, chunk {r['chunk_size']}"
            )
    if steps:
        lines.append(BOUND_NOTE)
    clients = {r["label"]: r for r in results if r["kind"] == "client" and "warm_seconds" in r}
    if clients:
        lines.append("")
        lines.append(f"{'client':<40}{'cold 1st round s':>18}{'warm s/round':>14}{'peak RSS MiB':>14}")
        for label, r in clients.items():
            lines.append(
                f"{label:<40}{r['cold_first_round']['seconds']:>18.2f}{r['warm_seconds']:>14.3f}"
                f"{r['peak_rss_mib']:>14.0f}"
            )
    fl = [
        r
        for r in results
        if r["kind"] in ("simulation", "deployment") and r.get("round_seconds") and not r["spec"].get("evaluated")
    ]
    if fl:
        lines.append("")
        lines.append(
            f"{'flower (median warm round)':<46}{'s/round':>9}{'mean':>7}{'range':>13}{'clients sum':>13}{'slowest':>9}"
            f"{'overhead':>10}{'share':>7}{'app age':>9}"
        )
        for r in fl:
            r["summary"] = _round_summary(r)
            m = r["summary"]
            spread = f"{m['min_seconds_per_round']:.1f}-{m['max_seconds_per_round']:.1f}"
            lines.append(
                f"{r['label']:<46}{m['seconds_per_round']:>9.2f}{m['mean_seconds_per_round']:>7.2f}{spread:>13}"
                f"{_fmt_s(m['summed_client_compute']):>13}"
                f"{_fmt_s(m['slowest_client']):>9}{_fmt_s(m['overhead_seconds']):>10}"
                f"{'-' if m['overhead_share'] is None else format(m['overhead_share'], '.0%'):>7}"
                f"{_fmt_s(m['clientapp_age_max']):>9}"
            )
        lines.append(
            "  overhead = s/round - clients sum (simulation: clients run one after another) or - slowest "
            "(deployment: nodes run in parallel);\n  app age = how old the oldest ClientApp process was when its "
            "handler ran (deployment: a fresh process per message); secure aggregation reports no client "
            "seconds (nothing measured on the data goes to an untrusted server in clear)"
        )
    lines += floor_report(results)
    for r in results:
        if "error" in r:
            lines.append(f"FAILED {r['label']}: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="dpfpl bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--only", default="step,scaling,client,flower", help="comma-separated sections")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per case (default: all cores)")
    ap.add_argument(
        "--naive-samples",
        type=int,
        default=4,
        help="ViT-B-16 on CPU: time the naive per-sample loop on this many samples and extrapolate "
        "linearly to B (0: all B, slow)",
    )
    ap.add_argument("--scaling-model", default="demo", choices=("demo", "vit"))
    ap.add_argument("--quick", action="store_true", help="fewer repeats and rounds")
    ap.add_argument("--out", default=None, help="JSON file (default dpfpl/bench/results/step-<device>.json)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.case:  # child: one case, JSON on the last line
        spec = json.loads(args.case)
        print(json.dumps(CASES[spec.pop("kind")](spec), default=float))
        return
    if args.naive_samples == 0:
        args.naive_samples = None
    args.only = set(args.only.split(","))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch on this machine")
    info = machine()
    info["torch_threads"] = threads
    results = []
    for kind, label, spec in plan(args):
        print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
        r = run_case(kind, spec, threads)
        r.update({"kind": kind, "label": label})
        results.append(r)
    table = report(results)
    print()
    print(
        f"machine: {info['cpu']}, nproc {info['nproc']}, torch {info['torch']} with {threads} threads, "
        f"device {args.device}, load average at start {info['loadavg_at_start']}"
    )
    print(table)
    out = Path(args.out or ROOT / "dpfpl" / "bench" / "results" / f"step-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "command": " ".join(["dpfpl bench"] + (argv or sys.argv[1:])),
                "table": table,
                "results": results,
            },
            indent=1,
            default=float,
        )
    )
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
