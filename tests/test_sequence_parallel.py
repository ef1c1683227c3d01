"""Sequence (context) parallelism: `mesh.sequence` splits the length of every activation; each layer
all-gathers its keys and values (whole along S) while queries and the residual stream stay split. A
train step on 8 CPU devices equals the unsharded one."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer_jax as tj
from train import memory, optimizer, trainer
from transformer_jax import losses, tasks
from transformer_jax import sharding as sh
from transformer_jax.config import ConfigError, MeshConfig, ModelConfig, load_config
from transformer_jax.tasks.base import Task

B, T = 4, 64
DECODER = ModelConfig(
    family="decoder", vocab_size=128, model_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64, num_layers=2, max_len=T
)
VARIANTS = {
    "dense": (DECODER, False),
    "banded": (dataclasses.replace(DECODER, local_window_size=8, local_layers="all"), False),
    # blocks of 12 straddle the devices' shares of the length
    "banded_padded": (dataclasses.replace(DECODER, local_window_size=12, local_layers="all"), True),
    "padded": (DECODER, True),
    "encoder": (dataclasses.replace(DECODER, family="encoder", heads=("mlm",)), True),
}
MESHES = [MeshConfig(data=1, sequence=8), MeshConfig(data=2, sequence=4)]


def batch(padded: bool) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (B, T)).astype(np.int32)
    lengths = np.array([T, 40, 17, 1]) if padded else np.full(B, T)
    keep = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": ids * keep, "attention_mask": keep, "targets": np.roll(ids, -1, 1), "weights": keep}


def grad_fn(model):
    def loss(params, b):
        out = model.apply(params, input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return losses.cross_entropy(out.logits, b["targets"], b["weights"], label_smoothing=0.1, z_loss=1e-4)[0]

    return jax.value_and_grad(loss)


def sharded_step(model, params, mesh):
    """The loss and gradients jitted on `mesh` (params and batch placed by the project's shardings), as
    the train loop runs them: traced with the mesh in context."""
    shardings = sh.tree_shardings(model.logical_axes, params, mesh)
    step = jax.jit(grad_fn(model), in_shardings=(shardings, sh.batch_sharding(mesh)))
    return sh.with_mesh(step, mesh), sh.with_mesh(step.lower, mesh), shardings


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_sequence_parallel_step_equals_the_unsharded_step(variant):
    cfg, padded = VARIANTS[variant]
    model, params = tj.build(cfg, rng=jax.random.key(0))
    b = batch(padded)
    want_loss, want_grads = jax.jit(grad_fn(model))(params, b)
    for mesh_cfg in MESHES:
        step, _, shardings = sharded_step(model, params, sh.make_mesh(mesh_cfg))
        loss, grads = step(jax.device_put(params, shardings), b)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), grads, want_grads)


def collectives(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(op, shape) of every array a collective returns in compiled HLO text (tuples: each element)."""
    ops = "all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute"
    return [
        (op, tuple(int(d) for d in dims.split(",") if d))
        for result, op in re.findall(rf"= (.+?) ({ops})(?:-start)?\(", text)
        for dims in re.findall(r"\w+\[([\d,]*)\]", result)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_keys_and_values_are_all_gathered_and_the_residual_stays_split(kv_heads):
    """Whatever crosses devices along the length is K and V (gathered in the forward, their gradients
    summed in the backward): no queries, scores or residual stream [B, T, D]. Without the K/V constraint
    (layers.MultiHeadAttention's constrain_kv) XLA gathers the queries of full multi-head attention and
    all-reduces scores instead; this test then fails."""
    cfg = dataclasses.replace(DECODER, num_kv_heads=kv_heads, mlp_dim=48, max_len=2 * T)  # no other dim is T
    model, params = tj.abstract_build(cfg)
    _, lower, _ = sharded_step(model, params, sh.make_mesh(MeshConfig(data=2, sequence=4)))
    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch(True))
    moved = collectives(lower(params, abstract_batch).compile().as_text())
    kv_bskh = (B // 2, T, kv_heads, cfg.resolved_head_dim)
    gathered = [shape for op, shape in moved if op == "all-gather" and T in shape]
    assert gathered.count(kv_bskh) >= 2 * cfg.num_layers and set(gathered) == {kv_bskh}, moved
    others = [(op, shape) for op, shape in moved if T in shape and not (op == "all-gather" and shape == kv_bskh)]
    # the K/V gradients: [B, S, K, H] partial sums over each device's queries, in any layout
    assert all(op == "all-reduce" and sorted(shape) == sorted(kv_bskh) for op, shape in others), others


@pytest.mark.slow
def test_the_project_train_step_runs_sequence_parallel():
    """trainer.make_train_step (the clm objective's loss over packed segments, AdamW) on mesh sequence 8:
    the loss and gradient norm of the unsharded step."""
    cfg = load_config(None)  # its train keys: AdamW, clipping, the loss's label smoothing and z-loss
    objective = tasks.get("clm")
    model, params = tj.build(DECODER, rng=jax.random.key(0))
    task = Task(model=model, init_params=lambda r: params, loss_fn=objective.loss_fn(cfg), train_batches=None)
    tx, schedule = optimizer.make_optimizer(cfg.train)
    step_fn = trainer.make_train_step(task, tx, schedule, cfg.train)
    rng = np.random.default_rng(1)
    segments = np.repeat(np.array([[1] * 40 + [2] * 20 + [0] * 4]), B, 0).astype(np.int32)
    positions = np.concatenate([np.arange(40), np.arange(20), np.zeros(4)])[None].repeat(B, 0).astype(np.int32)
    data = {
        "input_ids": rng.integers(1, 128, (B, T)).astype(np.int32),
        "targets": rng.integers(1, 128, (B, T)).astype(np.int32),
        "loss_mask": (segments > 0).astype(np.float32),
        "segment_ids": segments,
        "positions": positions,
    }
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    _, want = jax.jit(step_fn)(state, data)
    mesh = sh.make_mesh(MeshConfig(data=1, sequence=8))
    shardings = sh.tree_shardings(model.logical_axes, params, mesh)
    state_shardings = {
        "step": sh.replicated(mesh),
        "params": shardings,
        "opt_state": optimizer.optimizer_shardings(state["opt_state"], params, shardings, mesh),
    }
    step = sh.with_mesh(jax.jit(step_fn, in_shardings=(state_shardings, sh.batch_sharding(mesh))), mesh)
    _, got = step(jax.device_put(state, state_shardings), data)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)


def test_a_length_the_sequence_axis_does_not_divide_is_a_config_error():
    mesh = sh.make_mesh(MeshConfig(data=2, sequence=4))
    assert sh.logical_to_spec(("batch", "length", "act_embed"), (4, 64, 32), mesh) == jax.sharding.PartitionSpec(
        "data", "sequence", None
    )
    with pytest.raises(ConfigError, match="mesh.sequence: 4 does not divide the length 30"):
        sh.logical_to_spec(("batch", "length", "act_embed"), (4, 30, 32), mesh)
    # other axes still replicate what they cannot split (heads 3 over sequence: untouched)
    assert sh.logical_to_spec(("batch", "length"), (3, 64), mesh) == jax.sharding.PartitionSpec(None, "sequence")
    with pytest.raises(ConfigError, match=r"mesh.sequence: 3 does not divide data.seq_len=128"):
        load_config(None, overrides=["mesh.sequence=3"])
    assert sh.mesh_shape(MeshConfig(data=-1, sequence=4), 8) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}


def test_the_abstract_memory_estimate_splits_the_length():
    cfg = load_config(None, overrides=["mesh.data=1", "mesh.sequence=8", "train.batch_size=8"])
    split = memory.estimate(cfg, 8)["activations"]
    whole = memory.estimate(load_config(None, overrides=["mesh.data=1", "train.batch_size=8"]), 1)["activations"]
    assert split["tokens_per_device"] * 8 == whole["tokens_per_device"] == 8 * cfg.data.seq_len
    # each layer keeps the gathered K and V of the whole length besides its share of everything else
    m, e = cfg.model, 4
    gathered = 2 * m.resolved_kv_heads * m.resolved_head_dim * e * 7 * split["tokens_per_device"]
    assert split["kept_per_layer"] == round(whole["kept_per_layer"] / 8 + gathered)
    with pytest.raises(ConfigError, match="mesh.sequence: 3 does not divide the length 128"):
        memory.estimate(load_config(None, overrides=["mesh.data=1", "mesh.sequence=-1", "train.batch_size=8"]), 3)
