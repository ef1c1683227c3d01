"""Our side of `python -m train.bench`: a config's jitted train step (or forward) timed on a
synthetic batch, and the input pipeline timed alone.

The train step is ours, jitted: forward + loss + backward + optimizer update (train/trainer.py's);
`forward` times a jitted `model.apply` instead (inference, no optimizer). Times are the median of
the timed steps after a warm-up. The batch (`synthetic_batch`) is the one the PyTorch peer
(train/torch_peer.py) times too, the same token ids; the model FLOPs and MFU come from
train/flops.py.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from train import optimizer, trainer
from train.flops import flops_note, model_flops_per_example, peaks
from transformer_jax import attention as attn
from transformer_jax import sharding as sh
from transformer_jax import tasks
from transformer_jax.config import Config
from transformer_jax.models import abstract_build, build, count_params, published_params


class BenchError(ValueError):
    """A bench that cannot run as asked (train.bench's flags, the PyTorch peer): one line on stderr,
    exit 2 (train.cli.main)."""


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict:
    shapes = tasks.get(cfg.train.objective).batch_shapes(cfg, cfg.train.batch_size)
    batch = {}
    for key, (shape, dtype) in shapes.items():
        if key in ("input_ids", "decoder_input_ids", "targets", "mlm_targets", "mlm_input_ids"):
            batch[key] = rng.integers(7, cfg.model.vocab_size, shape).astype(dtype)
        elif key == "pixels":
            batch[key] = rng.integers(0, 256, shape).astype(dtype)
        elif key == "pair_id":  # every image with its own caption
            batch[key] = np.arange(shape[0]).astype(dtype)
        elif key in ("positions", "mlm_positions"):
            batch[key] = np.broadcast_to(np.arange(shape[1]), shape).astype(dtype)
        elif key == "nsp_labels":
            batch[key] = rng.integers(0, 2, shape).astype(dtype)
        elif key == "token_type_ids":
            batch[key] = (np.arange(shape[1]) >= shape[1] // 2).astype(dtype)[None].repeat(shape[0], 0)
        else:  # masks, weights, segment ids: every token real, one document per row
            batch[key] = np.ones(shape, dtype)
    return batch


FORWARD_INPUTS = {
    "decoder": ("input_ids",),
    "encoder": ("input_ids", "attention_mask", "token_type_ids"),
    "encoder_decoder": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
    "vision_language": ("pixels", "input_ids", "attention_mask"),
    "dual_encoder": ("pixels", "input_ids", "attention_mask"),
}


def forward_inputs(family: str, batch: dict) -> dict:
    """What an inference forward takes (the same on both sides): no positions, no MLM gather."""
    return {k: batch[k] for k in FORWARD_INPUTS[family] if k in batch}


DEVICE_PEAK = "device memory_stats peak_bytes_in_use (the whole process)"
COMPILED_PEAK = "compiled memory_analysis: arguments + outputs + temporaries (no device allocator stats here)"


def peak_memory(compiled) -> tuple[int, str]:
    """(bytes, which figure): the device allocator's peak where it keeps one (GPU, TPU), else the
    compiled program's own sizes (CPU)."""
    device = jax.devices()[0]
    memory = device.memory_stats() if hasattr(device, "memory_stats") else None
    if memory and "peak_bytes_in_use" in memory:
        return int(memory["peak_bytes_in_use"]), DEVICE_PEAK
    analysis = compiled.memory_analysis()
    return (
        int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes),
        COMPILED_PEAK,
    )


def time_steps(run, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `run` (which waits for its own result)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def bench(
    cfg: Config,
    steps: int = 10,
    mesh=None,
    *,
    forward: bool = False,
    batch: dict | None = None,
    warmup: int = 1,
    peak: dict | None = None,
) -> dict:
    """Time our jitted train step (or, `forward`, the jitted forward) of `cfg`: one dict of figures.
    Training adds the objective's heads to the model; the forward runs the model as configured.
    `peak`: train/flops.py's `peaks()` when already known (else measured here)."""
    objective = tasks.get(cfg.train.objective)
    cfg = cfg if forward else objective.with_heads(cfg)
    model, abstract = abstract_build(cfg)
    mesh = mesh or sh.make_mesh(cfg.mesh)
    trainer.check_batch_fits(cfg.train, mesh)
    host_batch = batch if batch is not None else synthetic_batch(cfg, np.random.default_rng(0))
    if forward:
        attn.check_backend(cfg.model.attention_impl)
        param_shardings = sh.tree_shardings(model.logical_axes, abstract, mesh)
        params = jax.jit(lambda key: build(cfg, key)[1], out_shardings=param_shardings)(jax.random.key(cfg.train.seed))
        inputs = sh.global_batch(forward_inputs(cfg.model.family, host_batch), mesh)
        fn = jax.jit(lambda p, x: model.apply(p, **x))
        start = time.perf_counter()
        with jax.set_mesh(mesh):  # traced as the trainer does: the activations' sharding constraints apply
            compiled = fn.lower(params, inputs).compile()
        compile_s = time.perf_counter() - start
        time_steps(lambda: jax.block_until_ready(compiled(params, inputs)), warmup)
        times = time_steps(lambda: jax.block_until_ready(compiled(params, inputs)), steps)
        loss = None
    else:
        task = trainer.Task(
            model=model, init_params=lambda rng: build(cfg, rng)[1], loss_fn=objective.loss_fn(cfg), train_batches=None
        )
        tx, schedule = optimizer.make_optimizer(cfg.train, None)
        sharded, _ = trainer.init_state(task, tx, mesh, cfg.train.seed, None)
        step_fn = jax.jit(
            trainer.make_train_step(task, tx, schedule, cfg.train),
            in_shardings=(sharded.shardings, sh.batch_sharding(mesh)),
            out_shardings=(sharded.shardings, sh.replicated(mesh)),
            donate_argnums=(0,),
        )
        inputs = sh.global_batch(host_batch, mesh)
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = step_fn.lower(sharded.state, inputs).compile()
        compile_s = time.perf_counter() - start
        box = {"state": sharded.state}

        def run():
            box["state"], box["metrics"] = compiled(box["state"], inputs)
            jax.block_until_ready(box["metrics"])

        time_steps(run, warmup)
        times = time_steps(run, steps)
        loss = float(box["metrics"]["loss"])
    step_s = float(np.median(times))

    seq_len = cfg.data.seq_len
    target_len = host_batch["decoder_input_ids"].shape[1] if "decoder_input_ids" in host_batch else 0
    tokens = cfg.train.batch_size * (seq_len + target_len)
    predicted_len = None if forward or "mlm_positions" not in host_batch else host_batch["mlm_positions"].shape[1]
    flops_example = model_flops_per_example(cfg, abstract, seq_len, target_len, predicted_len, forward=forward)
    flops_step = None if flops_example is None else cfg.train.batch_size * flops_example
    achieved = None if flops_step is None else flops_step / step_s / mesh.size
    # no model FLOPs, no MFU: the peak is not measured either
    if achieved is None:
        peak = {"peak": None, "peak_source": None, "measured": None, "nominal": None}
    elif peak is None:
        peak = peaks()
    ratio = lambda a, b: None if a is None or b is None else round(a / b, 4)
    tflops = lambda x: None if x is None else round(x / 1e12, 3)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    device = jax.devices()[0]
    result = {
        "config": cfg.name,
        "mode": "forward" if forward else "train",
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": mesh.size,
        "params_published": published_params(model, abstract),
        "params_padded": count_params(abstract),
        "batch_size": cfg.train.batch_size,
        "seq_len": seq_len,
        "target_len": target_len,
        "dtype": cfg.model.dtype,
        "attention_impl": cfg.model.attention_impl,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 5),
        "step_s_range": [round(min(times), 5), round(max(times), 5)],
        "tokens_per_sec": round(tokens / step_s, 1),
        "model_flops_per_token": None if flops_step is None else round(flops_step / tokens),
        "xla_flops_per_step": float(cost.get("flops", 0.0)) * mesh.size if cost else None,  # XLA counts per device
        "model_flops_per_step": None if flops_step is None else float(flops_step),
        "mfu": ratio(achieved, peak["peak"]),
        "peak_tflops": tflops(peak["peak"]),
        "peak_source": peak["peak_source"],
        "measured_matmul_peak_tflops": tflops(peak["measured"]),
        "mfu_vs_measured_peak": ratio(achieved, peak["measured"]),
        "nominal_peak_tflops": None if peak["nominal"] is None else peak["nominal"] / 1e12,
        "mfu_vs_nominal_peak": ratio(achieved, peak["nominal"]),
    }
    result["peak_memory_bytes"], result["peak_memory_source"] = peak_memory(compiled)
    if flops_note(cfg.model.family):
        result["model_flops_note"] = flops_note(cfg.model.family)
    if loss is not None:
        result["loss"] = loss
    return result


# ----------------------------------------------------------------------------- the input pipeline
def pipeline_bench(cfg: Config, workdir: str, batches: int) -> dict:
    """The train pipeline of train.pretrain alone: tokens/s of this process's batches after a
    warm-up (worker start, the first shuffle window). Its tokenizer comes from `workdir` (trained
    there if the config names none)."""
    from train import pretrain

    cfg, task = pretrain.make_task(cfg, workdir)
    it = iter(task.train_batches)
    for _ in range(min(20, batches)):
        next(it)
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += trainer.batch_tokens(next(it))
    elapsed = time.perf_counter() - start
    return {
        "source": cfg.data.source,
        "workers": cfg.data.workers,
        "batches": batches,
        "tokens_per_sec": round(tokens / elapsed, 1),
    }
