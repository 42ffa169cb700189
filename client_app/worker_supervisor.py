"""Keep a node worker running: start it as a child, restart it whenever it dies, stop it with its parent.

Why a supervisor of our own: ``deploy/start-supernode.sh`` runs a SuperNode and its worker side by side without
systemd (systemd's unit restarts the worker itself, ``deploy/systemd/dpfpl-worker.service``). The standard
library only: the supervisor holds no model and no state, so it stays small for the node's lifetime.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

EXIT_CONFIG = 78  # the worker's exit status for a setup error (EX_CONFIG): restarting would fail the same way
RESTART_DELAY_SECONDS = 0.5  # after a worker that had run a while; doubled for each quick death, up to a minute
QUICK_DEATH_SECONDS = 10.0
log = logging.getLogger("dpfpl.worker")


def supervise(command: list[str], poll: float = 0.2) -> int:
    """Run ``command`` until it exits cleanly (0) or with a setup error (78), restarting it after any other
    exit (a kill, a crash). SIGTERM/SIGINT stop the child and then the supervisor; so does the death of the
    supervisor's parent (the SuperNode's start script), so that no worker outlives its node."""
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
        started = time.monotonic()
        child = subprocess.Popen(command)
        log.info("node worker started (pid %d, start %d)", child.pid, starts)
        while child.poll() is None:
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
