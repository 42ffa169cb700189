"""Keep a node worker running: start it as a child, restart it whenever it dies or hangs, stop it with its parent.

Hangs: the worker touches its heartbeat file every second from a thread of its own (``beat``). A worker whose
heartbeat is older than ``HUNG_AFTER_SECONDS`` (frozen with SIGSTOP, deadlocked, stuck in the kernel) is killed
and restarted like one that died, and the supervisor logs it; the message it held fails on the ClientApp's
side (its deadline, ``worker_link.SILENCE_SECONDS``) and the server leaves the node out of that round.

Why a supervisor of our own: ``deploy/start-supernode.sh`` runs a SuperNode and its worker side by side without
systemd (systemd's unit restarts the worker itself, ``deploy/systemd/dpfpl-worker.service``). The standard
library only: the supervisor holds no model and no state, so it stays small for the node's lifetime.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

EXIT_CONFIG = 78  # the worker's exit status for a setup error (EX_CONFIG): restarting would fail the same way
RESTART_DELAY_SECONDS = 0.5  # after a worker that had run a while; doubled for each quick death, up to a minute
QUICK_DEATH_SECONDS = 10.0
HEARTBEAT_FILE = "worker.heartbeat"
BEAT_SECONDS = 1.0
HUNG_AFTER_SECONDS = 15.0  # a worker's heartbeat this old: hung; also the grace a starting worker gets
log = logging.getLogger("dpfpl.worker")


def beat(path: Path, every: float = BEAT_SECONDS, alive: Callable[[], bool] | None = None) -> threading.Thread:
    """Touch ``path`` every ``every`` seconds from a daemon thread, for as long as the process runs freely and
    ``alive()`` (when given) says it is making progress: a process stuck in its own code (a deadlock, a loop) would
    otherwise keep beating from this thread."""

    def run() -> None:
        while True:
            if alive is not None and not alive():
                time.sleep(every)
                continue
            try:
                path.touch()
            except OSError as err:  # a full or read-only disk: the watchdog will see it, and the log says why
                log.warning("cannot touch the heartbeat file %s: %s", path, err)
            time.sleep(every)

    thread = threading.Thread(target=run, name="heartbeat", daemon=True)
    thread.start()
    return thread


def _hung(heartbeat: Path | None, started: float, hung_after: float) -> float | None:
    """Seconds since the child's last sign of life, when that is past ``hung_after`` (else None)."""
    if heartbeat is None:
        return None
    try:
        last = max(heartbeat.stat().st_mtime, started)
    except FileNotFoundError:
        last = started
    silent = time.time() - last
    return silent if silent > hung_after else None


def supervise(
    command: list[str], poll: float = 0.2, heartbeat: Path | None = None, hung_after: float = HUNG_AFTER_SECONDS
) -> int:
    """Run ``command`` until it exits cleanly (0) or with a setup error (78), restarting it after any other
    exit (a kill, a crash) and after its ``heartbeat`` file went still for ``hung_after`` seconds (killed
    first). SIGTERM/SIGINT stop the child and then the supervisor; so does the death of the supervisor's parent
    (the SuperNode's start script), so that no worker outlives its node."""
    parent = os.getppid()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    starts, delay = 0, RESTART_DELAY_SECONDS
    while True:
        starts += 1
        started, started_wall = time.monotonic(), time.time()
        child = subprocess.Popen(command)
        log.info("node worker started (pid %d, start %d)", child.pid, starts)
        while child.poll() is None:
            silent = _hung(heartbeat, started_wall, hung_after)
            if silent is not None:
                log.error(
                    "node worker %d hung: no heartbeat for %.0f s (frozen or stuck); killing and restarting it",
                    child.pid,
                    silent,
                )
                child.kill()
                child.wait()
                started = -QUICK_DEATH_SECONDS  # a hang is not a start-up failure: restart it at once
                break
            if stopping or os.getppid() != parent:
                child.terminate()
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                return 0
            time.sleep(poll)
        code = child.returncode
        if code in (0, EXIT_CONFIG) or stopping:
            return code
        # a worker that dies as it starts (a broken install) is retried ever more slowly, not in a tight loop
        quick = time.monotonic() - started < QUICK_DEATH_SECONDS
        delay = min(60.0, delay * 2) if quick else RESTART_DELAY_SECONDS
        log.warning("node worker %d exited (%s); restarting it in %.1f s", child.pid, _describe(code), delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not stopping and os.getppid() == parent:
            time.sleep(poll)
        if stopping or os.getppid() != parent:
            return 0


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
