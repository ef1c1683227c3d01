"""Per-device memory of a config's train step on a mesh of any size, with nothing allocated and none
of the mesh's devices needed: what `python -m train.bench --abstract` reports (docs/bench.md).

Parameters, optimizer state and gradients are counted from the arrays themselves: the model's
parameters and the config's own optax optimizer state (`optimizer.make_optimizer`, its `init` under
`jax.eval_shape`) as ShapeDtypeStructs, sharded by the project's rules table (`sharding.RULES` over
the model's logical axes; the optimizer state as `optimizer.optimizer_shardings` places it) on a
`jax.sharding.AbstractMesh` of the config's mesh sizes. Activations are an analytic estimate
(`activation_estimate`, ACTIVATION_FORMULA). XLA's own temporaries beyond one layer's
recomputation, the FSDP all-gather and other collective buffers, and fragmentation are not counted.

Array names and letters as in `transformer_jax/attention.py` (B batch, T length, D model width,
N heads, K kv heads, H head dim, F mlp hidden, V vocab, L layers)."""

from __future__ import annotations

import math

import jax
import numpy as np

from train import optimizer, trainer
from transformer_jax import sharding as sh
from transformer_jax import tasks
from transformer_jax.config import Config
from transformer_jax.models import abstract_build, count_params, published_params

H200_GB = 141  # NVIDIA's H200: 141 GB of HBM3e
GB = 1e9  # decimal, as the vendors state device memory

ACTIVATION_FORMULA = (
    "Korthikanti et al. 2022 (arXiv:2205.05198, section 4), tensor parallel without their sequence parallelism of "
    "the norms and dropouts, per layer and micro-batch of b sequences of s tokens on a device: "
    "s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes at 2-byte activations, itemised and generalised to head_dim, kv heads, "
    "mlp_dim, gated MLPs, model.dtype, dropout masks only where a dropout rate is > 0 and the a*s^2 score terms "
    "only where attention_impl materialises the scores (explicit, xla; not the cudnn / tpu_flash flash kernels), "
    "and to context parallelism (mesh.sequence = p: s/p of each sequence's tokens on a device, and each layer's "
    "K and V all-gathered over the whole length); "
    "kept for the backward: that whole itemisation per layer (remat none), the weight matmuls' outputs and the "
    "layer input (dots_saveable), the layer input (full), nothing on the device (offload: the layer input goes to "
    "host memory); plus one layer's whole itemisation while it is recomputed in the backward (any remat), and "
    "the float32 logits and their gradient"
)


def abstract_mesh(cfg: Config, devices: int) -> jax.sharding.AbstractMesh:
    """The config's mesh (mesh.data / fsdp / tensor; -1 takes the rest) over `devices` devices that need not
    exist: the same sizes and axis types as `sharding.make_mesh`, no devices attached."""
    sizes = sh.mesh_shape(cfg.mesh, devices)
    return jax.sharding.AbstractMesh(
        tuple(sizes[a] for a in sh.MESH_AXES),
        sh.MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(sh.MESH_AXES),
    )


def tree_bytes(abstract, shardings=None) -> int:
    """Bytes of a tree of ShapeDtypeStructs: whole (no shardings) or on one device (the largest shard of
    each array, as its NamedSharding cuts it; a replicated array counts whole on every device)."""
    leaves = jax.tree.leaves(abstract)
    shapes = (
        [x.shape for x in leaves]
        if shardings is None
        else [s.shard_shape(x.shape) for x, s in zip(leaves, jax.tree.leaves(shardings))]
    )
    return sum(math.prod(shape) * np.dtype(x.dtype).itemsize for x, shape in zip(leaves, shapes))


def _split(size: int, ways: int) -> int:
    """How many ways the rules table cuts a dimension of `size` over a mesh axis of `ways` devices: all
    of them where they divide it (sharding.logical_to_spec), else none."""
    return ways if size % ways == 0 else 1


def activation_estimate(cfg: Config, mesh) -> dict:
    """Activation bytes on one device for one micro-batch (ACTIVATION_FORMULA): the total and its parts."""
    m, t = cfg.model, cfg.train
    e = np.dtype(m.dtype).itemsize
    b = t.batch_size // t.grad_accum // sh.batch_parallel(mesh)
    s = cfg.data.seq_len
    sh.logical_to_spec(("length",), (s,), mesh)  # a length the sequence axis does not divide: ConfigError
    tensor, seq = mesh.shape["tensor"], mesh.shape["sequence"]
    d, n, k, h, f = m.model_dim, m.num_heads, m.resolved_kv_heads, m.resolved_head_dim, m.mlp_dim
    tq, tk, tf = _split(n, tensor), _split(k, tensor), _split(f, tensor)
    gates = 2 if m.activation.startswith("gated") else 1
    dropout_mask = 1 if m.dropout_rate > 0 else 0  # bytes per element of a dropout's boolean mask
    scores = m.attention_impl in ("explicit", "xla")  # the flash kernels keep no [T, S] scores
    # per token of one layer, everything its backward reads (Korthikanti's itemisation)
    whole = (
        e * d * 4  # 2 norm inputs, the attention and MLP inputs (norm outputs)
        + 2 * dropout_mask * d  # the two residual dropouts' masks
        + e * (n * h / tq + 2 * k * h / tk * seq)  # Q, and K, V over the whole length (gathered: seq > 1)
        + e * n * h / tq  # the output projection's input
        + e * f * gates / tf
        + e * f / tf
    )  # the activation's input(s), the second matmul's input
    if scores:
        attention_dropout = m.attention_dropout_rate > 0
        whole += n * s / tq * (e + (1 + e if attention_dropout else 0))  # softmax out (+ its mask and output)
    matmul_outputs = e * (d + (n * h / tq + 2 * k * h / tk) + d + f * gates / tf + d)  # + the layer input
    kept = {"none": whole, "dots_saveable": matmul_outputs, "full": e * d, "offload": 0.0}[m.remat]
    tokens = s * b // seq
    layers = m.num_layers
    stored = layers * kept * tokens
    working = 0.0 if m.remat == "none" else whole * tokens
    output = tokens * (2 * 4 * m.padded_vocab_size / _split(m.padded_vocab_size, tensor) + 2 * e * d)
    out = {
        "micro_batch_per_device": b,
        "tokens_per_device": tokens,
        "kept_per_layer": round(kept * tokens),
        "layers": layers,
        "stored": round(stored),
        "recomputed_layer": round(working),
        "output_layer": round(output),
        "total": round(stored + working + output),
    }
    if m.remat == "offload":
        out["host_offloaded"] = round(layers * e * d * tokens)
    return out


def device_memory(gb: float | None) -> tuple[int, str]:
    """(bytes, where the figure comes from): `gb` when given, else the first device's allocator limit on
    an accelerator, else an H200's 141 GB."""
    if gb is not None:
        return round(gb * GB), f"--device-memory-gb {gb:g}"
    device = jax.devices()[0]
    stats = device.memory_stats() if jax.default_backend() != "cpu" and hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind}: bytes_limit"
    return round(H200_GB * GB), f"default: H200, {H200_GB} GB"


def estimate(cfg: Config, devices: int, memory_gb: float | None = None) -> dict:
    """Per-device bytes of `cfg`'s train step (params, optimizer state, gradients, activations) on
    `devices` devices of its mesh, against a device memory: one JSON-ready dict with the verdict."""
    cfg = tasks.get(cfg.train.objective).with_heads(cfg)  # what training builds: the objective's heads
    mesh = abstract_mesh(cfg, devices)
    trainer.check_batch_fits(cfg.train, mesh)
    model, abstract_params = abstract_build(cfg)
    param_shardings = sh.tree_shardings(model.logical_axes, abstract_params, mesh)
    tx, _ = optimizer.make_optimizer(cfg.train, None)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optimizer.optimizer_shardings(abstract_opt, abstract_params, param_shardings, mesh)
    # gradients: float32 like the params, sharded like them; with grad_accum > 1 the scan's accumulator
    # and one micro-batch's gradients are alive together
    grad_copies = 2 if cfg.train.grad_accum > 1 else 1
    per_device = {
        "params": tree_bytes(abstract_params, param_shardings),
        "optimizer_state": tree_bytes(abstract_opt, opt_shardings),
    }
    per_device["gradients"] = grad_copies * per_device["params"]
    activations = activation_estimate(cfg, mesh)
    per_device["activations"] = activations["total"]
    per_device["total"] = sum(per_device.values())
    limit, source = device_memory(memory_gb)
    fits = per_device["total"] <= limit
    return {
        "config": cfg.name,
        "mode": "abstract",
        "devices": devices,
        "mesh": dict(mesh.shape),
        "params_published": published_params(model, abstract_params),
        "params_padded": count_params(abstract_params),
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "seq_len": cfg.data.seq_len,
        "dtype": cfg.model.dtype,
        "param_dtype": cfg.model.param_dtype,
        "remat": cfg.model.remat,
        "attention_impl": cfg.model.attention_impl,
        "optimizer": cfg.train.optimizer,
        "total_bytes": {
            "params": tree_bytes(abstract_params),
            "optimizer_state": tree_bytes(abstract_opt),
            "gradients": grad_copies * tree_bytes(abstract_params),
        },
        "bytes_per_device": per_device,
        "gradient_copies": grad_copies,
        "activations": activations,
        "activation_formula": ACTIVATION_FORMULA,
        "not_counted": "XLA temporaries beyond one layer's recomputation, FSDP all-gathers and collective buffers, "
        "fragmentation, the input batch",
        "device_memory_bytes": limit,
        "device_memory_source": source,
        "headroom_bytes": limit - per_device["total"],
        "fits": fits,
        "verdict": "fits" if fits else "does not fit",
    }


def summary(result: dict) -> str:
    """One line for people: the per-device parts and the verdict."""
    gb = lambda x: f"{x / GB:,.1f} GB"
    per = result["bytes_per_device"]
    mesh = " x ".join(f"{a} {n}" for a, n in result["mesh"].items())
    return (
        f"{result['config'] or 'model'} on {result['devices']} devices ({mesh}), per device: params "
        f"{gb(per['params'])} · optimizer {gb(per['optimizer_state'])} · gradients {gb(per['gradients'])} · "
        f"activations {gb(per['activations'])} (remat {result['remat']}, micro-batch "
        f"{result['activations']['micro_batch_per_device']}) = {gb(per['total'])} of "
        f"{gb(result['device_memory_bytes'])} ({result['device_memory_source']}): {result['verdict']}"
    )
