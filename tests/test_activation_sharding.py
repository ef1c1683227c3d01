"""Activations are pinned at block boundaries by their logical axes, through the one rules table:
under data x FSDP x sequence x tensor meshes the residual stream stays split over the batch axes (and
over its length under sequence parallelism)."""

import jax
import jax.numpy as jnp
import pytest

import transformer_jax as tj
from transformer_jax import sharding as sh
from transformer_jax.config import MeshConfig, ModelConfig

CFG = ModelConfig(family="decoder", vocab_size=128, model_dim=32, num_heads=4, mlp_dim=64, num_layers=2, max_len=16)


def lowered(mesh):
    model, params = tj.abstract_build(CFG)
    fn = jax.jit(lambda p, ids: model.apply(p, input_ids=ids).hidden_states)
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    return (sh.with_mesh(fn.lower, mesh) if mesh else fn.lower)(params, ids)


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        MeshConfig(data=8),
        MeshConfig(data=2, fsdp=2, tensor=2),
        MeshConfig(fsdp=4, tensor=2),
        MeshConfig(data=2, sequence=2, tensor=2),
    ],
)
def test_residual_stream_is_constrained_to_the_batch_axes(mesh_cfg):
    mesh = sh.make_mesh(mesh_cfg)
    text = lowered(mesh).as_text()
    # one constraint per layer input, one on the stack's output, one per MLP hidden
    assert text.count("sharding_constraint") >= 2 * CFG.num_layers + 1
    spec = tuple(lowered(mesh).compile().output_shardings.spec) + (None,) * 3
    assert spec[0] == sh.logical_to_spec(("batch",), (8,), mesh)[0] is not None
    assert spec[1:3] == (("sequence" if mesh_cfg.sequence > 1 else None), None)  # length: split by sequence only


def test_no_mesh_in_context_no_constraint():
    assert "sharding_constraint" not in lowered(None).as_text()
