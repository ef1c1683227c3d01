"""Benchmark the compiled train step of a config; prints one JSON object.

    python -m train.bench --config configs/gpt2_small.yaml --set train.batch_size=8 --set model.dtype=bfloat16

Model FLOPs per token (training = forward + backward = 3x forward), attention included (as in
PaLM, appendix B; the causal mask is not discounted):
  each stack of L layers over T tokens, attending to S keys (S = T for self-attention):
      6 * (matmul weights applied per token) + 12 * L * (heads * head_dim) * S
  plus the output layer, 6 * model_dim * vocab per predicted token (for MLM only the masked
  positions, `mlm_positions`, go through the head); cross-attention keys and
  values are projected once per encoder token. MFU = achieved model FLOP/s over a peak: the bf16
  (accelerator) or f32 (CPU) matmul peak measured in this run, and the nominal dense bf16 peak of
  a known GPU.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from train import cli, trainer
from train.pretrain import objective_loss_fn, with_objective_heads
from transformer_jax import sharding as sh
from transformer_jax.config import Config
from transformer_jax.data.pipeline import batch_shapes, objective_options
from transformer_jax.models import abstract_build, build

NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "V100": 125e12, "TPU v4": 275e12,
                     "TPU v5e": 197e12, "TPU v5p": 459e12}


def _kernel_sizes(tree, *, skip=()) -> int:
    return sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
               if len(x.shape) >= 2 and not any(s in jax.tree_util.keystr(path) for s in skip))


def model_flops_per_example(cfg: Config, abstract_params, seq_len: int, target_len: int,
                            predicted_len: int | None = None) -> float:
    m = cfg.model
    attn_dim = m.num_heads * m.resolved_head_dim
    out_layer = 6 * m.model_dim * m.vocab_size
    if m.family == "encoder_decoder":
        enc, dec = abstract_params["encoder"], abstract_params["decoder"]
        cross_kv = _kernel_sizes(dec, skip=("['attention']", "['mlp']", "['query']", "['out']"))
        flops = 6 * _kernel_sizes(enc) * seq_len + 12 * m.num_layers * attn_dim * seq_len * seq_len
        flops += 6 * (_kernel_sizes(dec) - cross_kv) * target_len + 6 * cross_kv * seq_len
        flops += 12 * m.resolved_decoder_layers * attn_dim * target_len * (target_len + seq_len)
        return flops + out_layer * target_len
    stack = abstract_params["encoder" if m.family == "encoder" else "decoder"]
    flops = 6 * _kernel_sizes(stack) * seq_len + 12 * m.num_layers * attn_dim * seq_len * seq_len
    head, predicted = abstract_params.get("mlm", {}), predicted_len or seq_len
    return flops + (6 * _kernel_sizes(head) + out_layer) * predicted


def measured_matmul_peak(dtype) -> float:
    n = 4096 if jax.default_backend() != "cpu" else 1024
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    runs = 20 if jax.default_backend() != "cpu" else 5
    best = min(_timed(f, a) for _ in range(runs))
    return 2 * n ** 3 / best


def _timed(f, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - start


def nominal_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k.lower() in kind.lower()), None)


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict:
    shapes = batch_shapes(cfg.train.objective, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
                          **objective_options(cfg.data))
    batch = {}
    for key, (shape, dtype) in shapes.items():
        if key in ("input_ids", "decoder_input_ids", "targets", "mlm_targets"):
            batch[key] = rng.integers(7, cfg.model.vocab_size, shape).astype(dtype)
        elif key in ("positions", "mlm_positions"):
            batch[key] = np.broadcast_to(np.arange(shape[1]), shape).astype(dtype)
        elif key == "nsp_labels":
            batch[key] = rng.integers(0, 2, shape).astype(dtype)
        elif key == "token_type_ids":
            batch[key] = (np.arange(shape[1]) >= shape[1] // 2).astype(dtype)[None].repeat(shape[0], 0)
        else:  # masks, weights, segment ids: every token real, one document per row
            batch[key] = np.ones(shape, dtype)
    return batch


def bench(cfg: Config, steps: int = 10, mesh=None) -> dict:
    cfg = with_objective_heads(cfg)
    model, abstract = abstract_build(cfg)
    mesh = mesh or sh.make_mesh(cfg.mesh)
    trainer.check_batch_fits(cfg.train, mesh)
    task = trainer.Task(model=model, init_params=lambda rng: build(cfg, rng)[1], loss_fn=objective_loss_fn(cfg),
                        train_batches=None)
    tx, schedule = trainer.make_optimizer(cfg.train, None)
    sharded, _ = trainer.init_state(task, tx, mesh, cfg.train.seed, None)
    step_fn = jax.jit(trainer.make_train_step(task, tx, schedule, cfg.train),
                      in_shardings=(sharded.shardings, sh.batch_sharding(mesh)),
                      out_shardings=(sharded.shardings, sh.replicated(mesh)), donate_argnums=(0,))
    batch = sh.global_batch(synthetic_batch(cfg, np.random.default_rng(0)), mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(sharded.state, batch).compile()
    compile_s = time.perf_counter() - start
    state = sharded.state
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))

    seq_len = cfg.data.seq_len
    target_len = batch["decoder_input_ids"].shape[1] if "decoder_input_ids" in batch else 0
    tokens = cfg.train.batch_size * (seq_len + target_len)
    predicted_len = batch["mlm_positions"].shape[1] if "mlm_positions" in batch else None
    flops_step = cfg.train.batch_size * model_flops_per_example(cfg, abstract, seq_len, target_len, predicted_len)
    achieved = flops_step / step_s / mesh.size
    compute_dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    peak = measured_matmul_peak(compute_dtype)
    nominal = nominal_peak()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    device = jax.devices()[0]
    memory = device.memory_stats() if hasattr(device, "memory_stats") else None
    if memory and "peak_bytes_in_use" in memory:
        peak_memory = int(memory["peak_bytes_in_use"])
    else:
        analysis = compiled.memory_analysis()
        peak_memory = int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)
    return {
        "config": cfg.name, "backend": jax.default_backend(), "device_kind": device.device_kind,
        "devices": mesh.size, "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract))),
        "batch_size": cfg.train.batch_size, "seq_len": seq_len, "target_len": target_len, "dtype": cfg.model.dtype,
        "attention_impl": cfg.model.attention_impl, "compile_s": round(compile_s, 2), "step_s": round(step_s, 5),
        "tokens_per_sec": round(tokens / step_s, 1),
        "model_flops_per_token": round(flops_step / tokens),
        "xla_flops_per_step": float(cost.get("flops", 0.0)) * mesh.size if cost else None,  # XLA counts per device
        "model_flops_per_step": float(flops_step),
        "measured_matmul_peak_tflops": round(peak / 1e12, 3),
        "mfu_vs_measured_peak": round(achieved / peak, 4),
        "nominal_peak_tflops": None if nominal is None else nominal / 1e12,
        "mfu_vs_nominal_peak": None if nominal is None else round(achieved / nominal, 4),
        "peak_memory_bytes": peak_memory,
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    args = p.parse_args()
    cfg, _ = cli.config_and_workdir(args)
    print(json.dumps(bench(cfg, args.steps), indent=1))


if __name__ == "__main__":
    cli.main(main)
