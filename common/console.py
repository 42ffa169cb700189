"""An app process's console: each log line once.

OpenCLIP logs through the root logger (``logging.info(...)``, ``logging.warning(...)``), and the first such call
gives the root logger a handler of its own (``logging.basicConfig``). From then on every record that reaches the
root is printed a second time, in the root's format: each ServerApp line (``dpfpl INFO: ...`` and again
``INFO:dpfpl.server: ...``) and each of Flower's (``INFO : ...`` and again ``INFO:flwr: ...``). A logger that
prints with a handler of its own therefore does not propagate to the root.
"""

from __future__ import annotations

import logging

PROJECT_LOGGER = "dpfpl"
FLOWER_LOGGER = "flwr"  # Flower's own, printed by its own console handler
PROJECT_FORMAT = "dpfpl %(levelname)s: %(message)s"


def flower_lines_once() -> None:
    """Flower's lines through Flower's handler only (what Flower itself does where it sees them twice)."""
    logging.getLogger(FLOWER_LOGGER).propagate = False


def console_logging(level: int = logging.INFO) -> None:
    """The project's lines on stderr as ``dpfpl LEVEL: message``, next to Flower's, each once: the ServerApp's
    console, where the per-round metrics are read."""
    logger = logging.getLogger(PROJECT_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(PROJECT_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(level)
    logger.propagate = False
    flower_lines_once()
