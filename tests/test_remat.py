"""Scan over layers and the remat policies: the same loss and gradients as the plain loop, and
less compiled memory (XLA's memory analysis) the more a policy recomputes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer_jax as tj
from transformer_jax.config import ModelConfig
from transformer_jax.models import scan_params, unscan_params

POLICIES = ["none", "dots_saveable", "full", "offload"]


def loss_fn(model, ids):
    def loss(params):
        logits = model.apply(params, input_ids=ids).logits.astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    return loss


@pytest.fixture(scope="module")
def reference():
    cfg = ModelConfig(family="decoder", vocab_size=128, model_dim=32, num_heads=4, mlp_dim=64, num_layers=3, max_len=16)
    model, params = tj.build(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn(model, ids)))(params)
    return cfg, params, ids, float(loss), grads


# scanned with every policy; the plain loop (the reference, remat none) with the recomputing ones
@pytest.mark.parametrize("scan,remat", [(True, p) for p in POLICIES] + [(False, "dots_saveable"), (False, "full")])
def test_scan_and_remat_give_the_loops_loss_and_gradients(reference, remat, scan):
    cfg, params, ids, want_loss, want_grads = reference
    model, _ = tj.abstract_build(dataclasses.replace(cfg, scan_layers=scan, remat=remat))
    p = scan_params(params) if scan else params
    loss, grads = jax.jit(jax.value_and_grad(loss_fn(model, ids)))(p)
    np.testing.assert_allclose(float(loss), want_loss, atol=1e-6)
    grads = unscan_params(grads) if scan else grads
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def compiled_temp_bytes(remat: str) -> int:
    cfg = ModelConfig(
        family="decoder",
        vocab_size=256,
        model_dim=64,
        num_heads=4,
        mlp_dim=256,
        num_layers=12,
        max_len=256,
        scan_layers=True,
        remat=remat,
    )
    model, abstract = tj.abstract_build(cfg)
    ids = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    compiled = jax.jit(jax.grad(lambda p, i: loss_fn(model, i)(p))).lower(abstract, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_lowers_compiled_peak_memory_on_twelve_layers():
    temp = {policy: compiled_temp_bytes(policy) for policy in ("none", "dots_saveable", "full")}
    print("compiled temp bytes, 12 layers, 8 x 256 tokens:", temp)
    assert temp["full"] < temp["dots_saveable"] < temp["none"]
