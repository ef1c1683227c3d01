"""Configs: YAML + overrides, typed and validated before anything compiles; the README example."""

import re

import pytest

from transformer_jax import sharding
from transformer_jax.config import ConfigError, MeshConfig, load_config

from helpers import run_program


def test_overrides_and_types():
    cfg = load_config(
        "configs/gpt2_small.yaml",
        ["model.num_layers=2", "train.learning_rate=1e-4", "model.heads=[classification]", "data.paths=a.txt,b.txt"],
    )
    assert cfg.model.num_layers == 2 and cfg.train.learning_rate == 1e-4 and cfg.name == "gpt2_small"
    assert cfg.model.heads == ("classification",) and cfg.data.paths == ("a.txt", "b.txt")
    with pytest.raises(AttributeError):
        cfg.model.num_layers = 3  # frozen


@pytest.mark.parametrize(
    "override,names",
    [
        ("model.num_head=3", r"model\.num_head: unknown key \(did you mean model\.num_heads\?\)"),
        ("modle.num_heads=3", r"modle: unknown key \(did you mean model\?\)"),
        ("model.num_heads=seven", r"model\.num_heads: expected an integer"),
        ("model.num_heads=5", r"model\.num_heads: 5 heads do not divide model\.model_dim=768"),
        ("model.num_kv_heads=5", r"model\.num_kv_heads"),
        ("model.norm=batchnorm", r"model\.norm: 'batchnorm' is not one of"),
        ("train.objective=mlm", r"train\.objective: mlm needs model\.family=encoder"),
        ("data.seq_len=4096", r"data\.seq_len: 4096 exceeds model\.max_len=1024"),
        ("train.grad_accum=3", r"train\.grad_accum"),
        ("model.dropout_rate=1.5", r"model\.dropout_rate"),
        ("data.mask_rate=1.5", r"data\.mask_rate: must be in \(0, 1\), got 1\.5"),
        ("data.whole_word_masking=maybe", r"data\.whole_word_masking: expected"),
        ("data.mean_noise_span_length=0.5", r"data\.mean_noise_span_length: must be at least 1"),
        ("novalue", r"novalue: an override is key=value"),
        ("train.log_every=0", r"^train\.log_every: must be positive, got 0$"),
        ("train.checkpoint_every=0", r"^train\.checkpoint_every: must be positive, got 0$"),
        ("train.keep_checkpoints=0", r"^train\.keep_checkpoints: must be positive, got 0$"),
        ("train.grad_clip=-1", r"^train\.grad_clip: must be >= 0, got -1\.0$"),
        ("train.eval_every=-5", r"^train\.eval_every: must be >= 0, got -5$"),
        ("train.stop_check_every=0", r"^train\.stop_check_every: must be positive"),
        ("train.spike_window=1", r"^train\.spike_window: must be at least 2"),
        ("train.resume=maybe", r"^train\.resume: 'maybe' is not one of"),
        ("data.shuffle_window=-1", r"^data\.shuffle_window: must be >= 0"),
    ],
)
def test_mistakes_name_the_key(override, names):
    with pytest.raises(ConfigError) as error:
        load_config("configs/gpt2_small.yaml", [override])
    message = str(error.value)
    assert "\n" not in message and re.search(names, message), message


@pytest.mark.slow
def test_a_bad_number_is_one_line_from_the_program():
    result = run_program("train.pretrain", ["--set", "train.checkpoint_every=0"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.checkpoint_every: must be positive, got 0", result.stderr[-2000:]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("configs/nope.yaml")


def test_mesh_must_fit_the_devices():
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == {
        "data": 2,
        "fsdp": 2,
        "sequence": 1,
        "tensor": 2,
    }
    with pytest.raises(ConfigError, match="mesh"):
        sharding.mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ConfigError, match="mesh"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)


@pytest.mark.slow
def test_readme_example_runs_as_written():
    readme = open("README.md").read()
    section = readme.split("## Use it from your code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].logits.shape == (1, 6, 50304)  # GPT-2's 50257 padded to a multiple of 128
    assert namespace["y"].shape == (1, 6, 12, 64)
    assert namespace["tokens"].shape == (1, 8) and namespace["best"].shape == (1, 8)
