"""Under tensor parallelism the token logits stay split over the vocabulary (layers.TOKEN_LOGIT_AXES,
pinned where every token head's logits pass, `mask_padded_vocab`) and the loss reduces over the split
(`losses.cross_entropy`: logsumexp and the target's logit as sums, no gather): no device ever holds
the whole [B, T, V], in the forward or the backward."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import pytest

import transformer_jax as tj
from transformer_jax import layers, losses
from transformer_jax import sharding as sh
from transformer_jax.config import MeshConfig, ModelConfig

B, T, V = 8, 64, 4096
CFG = ModelConfig(family="decoder", vocab_size=V, model_dim=32, num_heads=4, mlp_dim=64, num_layers=1, max_len=T)
FULL_LOGITS_BYTES = B * T * V * 4  # float32


def compiled(cfg: ModelConfig, mesh_cfg: MeshConfig, devices: int):
    """The loss and gradients of a train step (label smoothing and z-loss on), compiled on `devices`."""
    model, params = tj.abstract_build(cfg)
    mesh = sh.make_mesh(mesh_cfg, jax.devices()[:devices])

    def loss(p, ids):
        logits_btv = model.apply(p, input_ids=ids).logits
        return losses.cross_entropy(logits_btv, ids, label_smoothing=0.1, z_loss=1e-4)[0]

    shardings = sh.tree_shardings(model.logical_axes, params, mesh)
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, sh.batch_sharding(mesh)))
    return sh.with_mesh(step.lower, mesh)(params, jax.ShapeDtypeStruct((B, T), jnp.int32)).compile()


def whole_logits(text: str) -> list[str]:
    """Every instruction of the compiled text whose result holds as many elements as the whole
    [B, T, V] (any layout: [B*T, V] too), with the collectives (all-gather, all-to-all) among them."""
    shapes = re.findall(r"= \w+\[([\d,]+)\]\S* ([\w-]+)\(", text)
    return [f"{op}[{dims}]" for dims, op in shapes if math.prod(int(d) for d in dims.split(",")) >= B * T * V]


def temp_bytes(executable) -> int:
    return executable.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_tensor_parallel_logits_stay_split_over_the_vocabulary(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    split = compiled(cfg, MeshConfig(data=1, tensor=8), 8)
    assert whole_logits(split.as_text()) == []
    one_device = temp_bytes(compiled(cfg, MeshConfig(data=1), 1))
    # one device's temporaries: a few [B, T, V / 8] float32 buffers (the logits, their softmax, its
    # gradient), under one whole [B, T, V] and about an eighth of the single device's
    assert temp_bytes(split) < FULL_LOGITS_BYTES and 4 * temp_bytes(split) < one_device, (temp_bytes(split), one_device)


@pytest.mark.slow
def test_the_checks_catch_logits_gathered_over_the_vocabulary(monkeypatch):
    """The same step with the logits pinned whole over the vocabulary fails both checks above: the
    test above could fail."""
    monkeypatch.setattr(layers, "TOKEN_LOGIT_AXES", ("batch", "length", None))
    whole = compiled(CFG, MeshConfig(data=1, tensor=8), 8)
    assert whole_logits(whole.as_text()) != []
    assert temp_bytes(whole) > FULL_LOGITS_BYTES
