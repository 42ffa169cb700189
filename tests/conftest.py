import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Tests never need the 600-step demo backbone: a short pretraining gives a usable, deterministic backbone.
os.environ.setdefault("DPFPL_DEMO_PRETRAIN_STEPS", "60")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpfpl-cache")
    os.environ["DPFPL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model():
    """The demo architecture with random weights: no pretraining, no download."""
    from dpfpl.common.models import load_clip

    torch.manual_seed(0)
    return load_clip("dpfpl-demo-tiny", "none")


@pytest.fixture(scope="session")
def encoder(tiny_model):
    from dpfpl.common.prompt import PromptTextEncoder

    names = [f"class {i}" for i in range(6)]
    return PromptTextEncoder(tiny_model.model, tiny_model.tokenizer, names, n_ctx=8)


@pytest.fixture()
def batch(encoder, tiny_model):
    gen = torch.Generator().manual_seed(1)
    d = tiny_model.model.text_projection.shape[1]
    feats = torch.nn.functional.normalize(torch.randn(12, d, generator=gen), dim=-1)
    labels = torch.randint(0, 6, (12,), generator=gen)
    return feats, labels


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages built outside a running ServerApp need the run/task identity Flower sets there."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    yield
