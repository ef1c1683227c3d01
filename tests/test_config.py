"""Configs: YAML + overrides, typed and validated before anything compiles; the README example."""
import re

import pytest

from transformer_jax import sharding
from transformer_jax.config import ConfigError, MeshConfig, load_config


def test_overrides_and_types():
    cfg = load_config("configs/gpt2_small.yaml", ["model.num_layers=2", "train.learning_rate=1e-4",
                                                   "model.heads=[classification]", "data.paths=a.txt,b.txt"])
    assert cfg.model.num_layers == 2 and cfg.train.learning_rate == 1e-4 and cfg.name == "gpt2_small"
    assert cfg.model.heads == ("classification",) and cfg.data.paths == ("a.txt", "b.txt")
    with pytest.raises(AttributeError):
        cfg.model.num_layers = 3  # frozen


@pytest.mark.parametrize("override,names", [
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
])
def test_mistakes_name_the_key(override, names):
    with pytest.raises(ConfigError) as error:
        load_config("configs/gpt2_small.yaml", [override])
    message = str(error.value)
    assert "\n" not in message and re.search(names, message), message


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("configs/nope.yaml")


def test_mesh_must_fit_the_devices():
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="mesh"):
        sharding.mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ConfigError, match="mesh"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)


def test_readme_example_runs_as_written():
    readme = open("README.md").read()
    section = readme.split("## Use it from your code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].logits.shape == (1, 6, 50257)
    assert namespace["y"].shape == (1, 6, 12, 64)
    assert namespace["tokens"].shape == (1, 8) and namespace["best"].shape == (1, 8)
