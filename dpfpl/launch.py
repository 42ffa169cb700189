"""Run the app in Flower's simulation engine through a private, managed SuperLink.

``flwr run .`` on the default connection would leave a managed SuperLink running. Here every launch gets
its own FLWR_HOME, free loopback ports and a SuperLink started in simulation mode, and stops what it
started by pid, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import tomli_w

from .common.config import RunConfig
from .common.outcome import RunFailed

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the repository, for a checkout or an editable install
LAUNCH_TAG = "DPFPL_LAUNCH_TAG"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"'{name}' not found: install the project (pip install -e .) in this environment")
    return found


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def run_simulation(
    run_config: dict,
    num_supernodes: int,
    work_dir: Path,
    num_cpus_per_client: int = 1,
    timeout: float = 3600,
    stream: bool = True,
    num_gpus_per_client: float = 0.0,
    tag: str | None = None,
) -> None:
    """Start a SuperLink (simulation mode), submit the app, wait for it, stop the SuperLink. Every process
    started carries ``tag`` (default: a fresh one) in ``DPFPL_LAUNCH_TAG``, so a caller can find them
    (dpfpl/bench/soak.py samples their memory)."""
    work_dir = Path(work_dir).resolve()
    flwr_home = work_dir / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    # flwr 1.41 serves the Runtime, Control and Fleet APIs on one HTTP port.
    port = free_port()
    config = {
        "superlink": {
            "default": "dpfpl-sim",
            "dpfpl-sim": {
                "address": f"127.0.0.1:{port}",
                "insecure": True,
                "options": {
                    "num-supernodes": num_supernodes,
                    "backend": {
                        "client-resources": {"num-cpus": num_cpus_per_client, "num-gpus": float(num_gpus_per_client)}
                    },
                },
            },
        }
    }
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))
    tag = tag or uuid.uuid4().hex
    env = {**launch_env(flwr_home, tag), "PYTHONWARNINGS": _quiet_ray_tip(os.environ.get("PYTHONWARNINGS", ""))}
    superlink = None
    try:
        superlink = start_superlink(port, work_dir / "superlink.db", env, work_dir / "superlink.log", simulation=True)
        submit_run("dpfpl-sim", run_config, env=env, timeout=timeout, stream=stream, cwd=work_dir)
    finally:
        if superlink is not None:
            _stop(superlink)
        stop_tagged_processes(tag)


# Ray's simulation engine (started by the SuperLink, in Flower's simulation process) warns on every start that a
# future Ray will stop hiding GPUs from actors that ask for none: a FutureWarning about Ray's own defaults, with
# nothing for a dpfpl user to do (the launch sets each client's GPU share). Only that warning, by its category,
# its start ("Tip"; a warnings filter cannot hold the ":" that follows) and the module that raises it, is
# ignored; every other warning stays visible.
RAY_TIP_FILTER = "ignore:Tip:FutureWarning:ray._private.worker"


def _quiet_ray_tip(user_filters: str) -> str:
    """The launched processes' PYTHONWARNINGS: the user's own filters, then Ray's tip ignored."""
    return ",".join(f for f in (user_filters, RAY_TIP_FILTER) if f)


def launch_env(flwr_home: Path, tag: str) -> dict:
    """The environment of every process a launch starts: its own FLWR_HOME, no telemetry, this
    environment's Flower programs first on PATH, and the launch's tag (``tagged_processes``)."""
    return {
        **os.environ,
        LAUNCH_TAG: tag,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def start_superlink(port: int, database: Path, env: dict, log_file: Path, simulation: bool = False) -> subprocess.Popen:
    """An insecure SuperLink on 127.0.0.1:``port`` (one port for nodes, CLI and apps) whose state lives in
    ``database``: a SuperLink restarted on the same database knows its SuperNodes and runs. ``simulation``:
    Flower's simulation engine runs the nodes. Insecure: loopback and local simulation only
    (deploy/start-superlink.sh starts the TLS one). A SuperLink that never opens its port is stopped."""
    proc = subprocess.Popen(
        [
            _bin("flower-superlink"),
            "--insecure",
            *(["--simulation"] if simulation else []),
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
            "--database",
            str(database),
        ],
        env=env,
        stdout=open(log_file, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc, log_file)
    except BaseException:
        _stop(proc)
        raise
    return proc


def start_node_worker(state_dir: Path, env: dict, log_file: Path) -> subprocess.Popen:
    """A node's resident worker (``dpfpl worker --supervise``) on its state directory: restarted when it dies,
    stopped with the launch (its processes carry the launch's tag)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dpfpl.client_app.worker", "--supervise", "--state-dir", str(state_dir)],
        env=env,
        stdout=open(log_file, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_supernode(
    superlink_port: int, node_config: dict, env: dict, log_file: Path, worker: bool = True
) -> subprocess.Popen:
    """An insecure SuperNode on loopback that retries its SuperLink for as long as it takes (a restarted
    SuperLink finds it again), with its resident worker beside it (``worker``; it needs ``state-dir``)."""
    config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
    if worker:
        state_dir = Path(node_config["state-dir"])
        state_dir.mkdir(parents=True, exist_ok=True)
        start_node_worker(state_dir, env, state_dir / "worker.log")
    return subprocess.Popen(
        [
            _bin("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{superlink_port}",
            "--port",
            str(free_port()),
            "--node-config",
            config,
        ],
        env=env,
        stdout=open(log_file, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_tagged_processes(tag: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of a launch at once: a crash, not a shutdown (nothing gets to clean up). Returns
    once they are gone (their ports are free again), so a restart does not find the dead one's port open."""
    pids = tagged_processes(tag)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    return pids


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed child of this process stays a zombie until reaped, its sockets closed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for_port(port: int, proc: subprocess.Popen, log_file: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited early; see {log_file}:\n{log_file.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not open port {port} within {timeout}s; see {log_file}")


def _parse_run_id(stdout: str) -> int:
    start = stdout.find("{")
    data = json.loads(stdout[start:])
    if not data.get("success", True) or "run-id" not in data:
        raise RuntimeError(f"flwr run did not start a run: {stdout}")
    return int(data["run-id"])


def _status(run_id: int, env: dict, cwd: Path, connection: str = "dpfpl-sim") -> str:
    out = subprocess.run(
        [_bin("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    start = out.stdout.find("{")
    if start < 0:
        return "unknown"
    runs = json.loads(out.stdout[start:]).get("runs", [])
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def _follow(run_id: int, env: dict, cwd: Path, timeout: float, stream: bool, connection: str = "dpfpl-sim") -> None:
    """Stream the run's logs (if asked) and wait until it finishes; fail unless it completed successfully
    (``flwr run --stream`` itself exits 0 even when the ServerApp fails)."""
    logs = None
    if stream:
        logs = subprocess.Popen(
            [_bin("flwr"), "log", str(run_id), connection, "--stream"], env=env, cwd=cwd, start_new_session=True
        )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            status = _status(run_id, env, cwd, connection)
            if status.startswith("finished"):
                if status != "finished:completed":
                    raise RunFailed(f"run {run_id} ended with status '{status}'; the ServerApp's log says why")
                return
            time.sleep(2)
        raise TimeoutError(f"run {run_id} did not finish within {timeout}s")
    finally:
        if logs is not None:
            time.sleep(1)
            _stop(logs)


def tagged_processes(tag: str) -> list[int]:
    """Pids of the processes that inherited this launch's tag (the SuperLink, its app processes, Ray's)."""
    needle = f"{LAUNCH_TAG}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_launched(procs: list[subprocess.Popen], tag: str, grace: float = 20.0) -> None:
    """Stop what a deployment launched: each started process's group (SIGTERM, then SIGKILL after ``grace``
    seconds), then every process that inherited the launch's tag."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
    stop_tagged_processes(tag)


def stop_tagged_processes(tag: str, grace: float = 10.0) -> int:
    """Stop every process that inherited this launch's tag: the simulation process and its Ray workers
    are not all in the SuperLink's process group (Ray daemonizes some), but all inherit its environment."""

    def tagged() -> list[int]:
        return tagged_processes(tag)

    found = tagged()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tagged():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and tagged():
            time.sleep(0.3)
    return len(found)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def app_dir() -> Path:
    """The folder ``flwr run`` bundles as the app: the repository (a checkout or an editable install), else, for
    an installed wheel, a generated folder whose pyproject.toml names the installed components and the run
    config's defaults (the code then comes from the installed package)."""
    if (PROJECT_ROOT / "pyproject.toml").is_file():
        return PROJECT_ROOT
    from .common.models import cache_dir  # lazy: torch; submit and --help import this module

    folder = cache_dir() / "app" / version("dpfpl")
    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "dpfpl", "version": version("dpfpl")},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "dpfpl",
                    "components": {"serverapp": "dpfpl.server_app.app:app", "clientapp": "dpfpl.client_app.app:app"},
                    "config": RunConfig.defaults(),
                }
            }
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def start_run(
    connection: str, run_config: dict, env: dict | None = None, cwd: Path | None = None, app: Path | None = None
) -> int:
    """Submit this app (or the app folder ``app``) to an existing SuperLink connection (``$FLWR_HOME/config.toml``)
    and return its run id without waiting for it."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})}
    overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    cmd = [_bin("flwr"), "run", str(app or app_dir()), connection, "--format", "json"]
    if overrides:
        cmd += ["--run-config", overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"flwr run failed:\n{out.stdout}\n{out.stderr}")
    return _parse_run_id(out.stdout)


def wait_run(
    run_id: int,
    connection: str,
    env: dict | None = None,
    timeout: float = 3600,
    stream: bool = True,
    cwd: Path | None = None,
) -> None:
    """Follow a submitted run until it finishes; fail unless it completed."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})}
    _follow(run_id, env, Path(cwd or "."), timeout, stream, connection)


def submit_run(
    connection: str,
    run_config: dict,
    env: dict | None = None,
    timeout: float = 3600,
    stream: bool = True,
    cwd: Path | None = None,
    app: Path | None = None,
) -> int:
    """Submit this app (or ``app``) to an existing SuperLink connection, follow it, and fail unless it completed.
    Returns the run id."""
    run_id = start_run(connection, run_config, env, cwd, app)
    wait_run(run_id, connection, env, timeout, stream, cwd)
    return run_id
