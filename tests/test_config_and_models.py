import pytest
import torch
from pydantic import ValidationError

from dpfpl.common.config import RunConfig
from dpfpl.common.models import WeightsUnavailableError, load_clip


def test_run_config_round_trips_flower_keys():
    cfg = RunConfig.from_flower({"num-server-rounds": 7, "target-epsilon": 0.1, "max-grad-norm-local": 5.0})
    assert cfg.num_server_rounds == 7 and cfg.to_flower()["max-grad-norm-local"] == 5.0


@pytest.mark.parametrize(
    "bad",
    [
        {"num-server-roundz": 3},  # typo
        {"batch-size": 0},
        {"dp": True, "target-epsilon": 0.0},  # no way to set the noise
        {"min-clients": 11, "num-clients": 10},
        {"calibrate-for": "nobody"},
    ],
)
def test_bad_run_config_fails_with_the_key_name(bad):
    with pytest.raises(ValidationError):
        RunConfig.from_flower(bad)


def test_missing_weights_file_says_where_to_put_it(tmp_path):
    missing = tmp_path / "weights" / "open_clip_pytorch_model.bin"
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_clip("ViT-B-16", str(missing))


def test_unknown_model_and_tag_are_rejected():
    with pytest.raises(ValueError, match="unknown OpenCLIP model"):
        load_clip("ViT-Q-99", "none")
    with pytest.raises(ValueError, match="not a pretrained tag"):
        load_clip("ViT-B-16", "no-such-tag")


def test_cli_overrides_are_toml_values_and_bare_words_are_strings():
    from dpfpl.overrides import parse_overrides

    got = parse_overrides(["method=fedpgp", "rank=4", "dp=false", 'ctx-init="a photo of a"', "lr-local=1e-3"])
    assert got == {"method": "fedpgp", "rank": 4, "dp": False, "ctx-init": "a photo of a", "lr-local": 0.001}
    with pytest.raises(SystemExit, match="key=value"):
        parse_overrides(["rank"])


def test_cli_refuses_two_different_run_directories_before_running(tmp_path):
    from dpfpl.cli import main

    with pytest.raises(SystemExit, match="disagree"):
        main(["simulate", "--run-dir", str(tmp_path / "a"), "-c", f'run-dir="{tmp_path / "b"}"'])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_weights_file_of_another_architecture_is_named_and_explained(tmp_path, tiny_model):
    from safetensors.torch import save_file

    from dpfpl.common.models import WeightsMismatchError, load_clip

    state = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    state["text_projection"] = torch.zeros(state["text_projection"].shape[0], 32)  # another embedding width
    del state["ln_final.weight"]
    path = tmp_path / "other-model.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsMismatchError) as err:
        load_clip("dpfpl-demo-tiny", str(path))
    assert str(path) in str(err.value) and "model-name" in str(err.value) and "text_projection" in str(err.value)
