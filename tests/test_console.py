"""A newcomer's console shows the project's own output, once: each ServerApp and Flower log line once (OpenCLIP's
root-level logging configures the root logger, which would print them again), no OpenCLIP notice for a model
built without weights on purpose, and no Ray tip about its own future defaults in a simulation."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from dpfpl.common.console import FLOWER_LOGGER, PROJECT_LOGGER, console_logging


@pytest.fixture
def fresh_loggers():
    """The project's, Flower's and the root logger as they were, afterwards (the test changes them)."""
    loggers = [logging.getLogger(n) for n in (PROJECT_LOGGER, FLOWER_LOGGER)]
    root = logging.getLogger()
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    root_handlers = root.handlers[:]
    for lg in loggers[:1]:
        lg.handlers.clear()
    yield
    root.handlers[:] = root_handlers
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_a_server_line_and_a_flower_line_are_printed_once(fresh_loggers, capsys):
    console_logging()
    logging.getLogger().addHandler(logging.StreamHandler())  # what OpenCLIP's first logging.info(...) leaves
    logging.getLogger("dpfpl.server").info("round 1/2 num-replies=2")
    flower = logging.getLogger(FLOWER_LOGGER)
    flower.addHandler(logging.StreamHandler())  # Flower prints with its own handler
    flower.warning("Manually terminating ClientAppActor")
    err = capsys.readouterr().err
    assert err.count("round 1/2 num-replies=2") == 1 and "dpfpl INFO: round 1/2" in err
    assert err.count("Manually terminating ClientAppActor") == 1


def test_a_model_built_without_weights_on_purpose_logs_no_random_init_notice(caplog):
    from dpfpl.common.models import load_clip

    with caplog.at_level(logging.WARNING):
        load_clip("dpfpl-demo-tiny", "none")
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")  # elsewhere: kept
    notices = [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert [r.getMessage() for r in notices] == [
        "No pretrained weights loaded for model 'x'. Model initialized randomly."
    ]


def test_a_simulation_hides_rays_tip_and_no_other_warning():
    from dpfpl.launch import RAY_TIP_FILTER, _quiet_ray_tip

    code = (
        "import warnings\n"
        "for text, category in [('Tip: In future versions of Ray, ...', FutureWarning), ('Other', FutureWarning)]:\n"
        "    warnings.warn_explicit(text, category, 'worker.py', 1, module='ray._private.worker')\n"
        "warnings.warn_explicit('Tip: elsewhere', FutureWarning, 'x.py', 1, module='other')\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": _quiet_ray_tip("")}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert "In future versions of Ray" not in err
    assert "FutureWarning: Other" in err and "FutureWarning: Tip: elsewhere" in err
    assert _quiet_ray_tip("error::DeprecationWarning") == f"error::DeprecationWarning,{RAY_TIP_FILTER}"
