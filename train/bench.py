"""Benchmark a config's compiled train step (or forward pass), optionally against the same model in PyTorch.

One file over 400 lines on purpose: both sides must time the same batch and count the same FLOPs,
so the PyTorch peer sits beside ours where a change to one is seen next to the other.

    python -m train.bench --config configs/gpt2_small.yaml --set train.batch_size=8 --set model.dtype=bfloat16
    python -m train.bench --config configs/gpt2_small.yaml --compare torch [--compile] [--forward] [--min-ratio 1.0]
    python -m train.bench --config configs/gpt3_175b.yaml --abstract --devices 256 --set mesh.fsdp=256 [--require-fit]

Prints one JSON object on stdout (with --workdir also written to <workdir>/bench.json) and a
one-line summary on stderr. The train step is ours, jitted:
forward + loss + backward + optimizer update; `--forward` times a jitted `model.apply` instead
(inference, no optimizer). Times are the median of `--steps` timed steps after a warm-up.

`--abstract` runs nothing: the train step's bytes per device (parameters, optimizer state, gradients,
an activation estimate) on `--devices` devices of the config's mesh, which need not exist, against
one device's memory (`--device-memory-gb`); `--require-fit` exits 1 when it does not fit. How it
counts: train/memory.py.

`--compare torch` (needs the `hf` extra: torch and transformers) builds the same model with
Hugging Face `transformers` in the same run, on the same device, from the mapped config
(`transformer_jax.hf.config_to_hf`): GPT2LMHeadModel (decoder), BertForPreTraining (encoder, mlm
+ nsp heads), BertForMaskedLM (mlm head), BertModel (no heads), T5ForConditionalGeneration
(encoder-decoder). Random weights (timing only); the published parameter counts are checked to
match. Same token ids (the synthetic batch), dropout off on both sides when the config's is 0,
float32 unless model.dtype is bfloat16/float16 (then torch autocast to it), torch threads set to
the CPU cores JAX uses. torch's step: forward + the model's own loss (`labels=`) + backward +
gradient clipping (when train.grad_clip > 0) + torch.optim.AdamW (torch's default
foreach/fused choice; Adafactor when train.optimizer is adafactor), eager and, with `--compile`,
`torch.compile(model)`. The JSON gains a `torch` object and `speedup_vs_torch_eager` /
`speedup_vs_torch_compile` (ours / torch, tokens per second); `--min-ratio X` exits 1 when
ours / torch eager < X.

Model FLOPs per token (training = forward + backward = 3x the forward; `--forward` counts the
forward alone), attention included as in PaLM (appendix B), causal self-attention at half (the
masked half of the score matrix is no useful work; MaxText counts it so since its causal-mask
change):
  each stack of L layers over T tokens, attending to S keys:
      6 * (matmul weights applied per token) + 12 * c * L * (heads * head_dim) * S
  c = 1/2 for causal self-attention (a decoder's; the decoder self-attention of an encoder-decoder),
  S = T; c = 1 for bidirectional self-attention (S = T) and cross-attention (S = the encoder length);
  a locally banded layer (model.local_window_size w) counts the query-key pairs of its band the same
  way, c * S = w - w^2 / (2T) with w at most T (a band as wide as T counts as causal: T / 2);
  plus the output layer, 6 * model_dim * vocab per predicted token (the published vocabulary, not
  the padded one; for MLM only the masked positions, `mlm_positions`, go through the head);
  cross-attention keys and values are projected once per encoder token, the pooler and sentence
  heads once per example. Forward only: 2 and 4 * c in place of 6 and 12 * c.
The vision families (vision_language, dual_encoder) have no such formula here (image patches, the
ITM / ITC passes): their model FLOPs and MFU are null, `model_flops_note` says so, and
`xla_flops_per_step` (XLA's count) stands alone; their tokens/s counts the caption tokens.
MFU = achieved model FLOP/s per device over a peak, named by `peak_source`: the nominal dense bf16
peak of a known accelerator (NOMINAL_BF16_PEAK: H100/H200 989 TFLOP/s, ...), else a matmul peak
measured in this run (4096x4096; float32 over all cores on CPU, bfloat16 on an accelerator; best
of several runs). Both MFUs are reported as well (`mfu_vs_measured_peak`, `mfu_vs_nominal_peak`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from train import cli, memory, trainer
from transformer_jax import attention as attn
from transformer_jax import config as config_lib
from transformer_jax import sharding as sh
from transformer_jax import tasks
from transformer_jax.config import Config
from transformer_jax.models import abstract_build, build, count_params, published_params

NOMINAL_BF16_PEAK = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "V100": 125e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}
MATMUL_SIZE = 4096
HF_EXTRA = "pip install 'transformer-jax[hf]' (torch and transformers)"


class BenchError(ValueError):
    """A bench that cannot run as asked: one line on stderr, exit 2 (train.cli.main)."""


# ----------------------------------------------------------------------------- FLOPs
def _kernel_sizes(tree, *, skip=()) -> int:
    """Elements of the matmul weights (2-d and up) in `tree`, but for biases (the attention
    projections' are [heads, head_dim]: added, not multiplied) and paths containing a `skip` string."""
    skip = tuple(skip) + ("['relative_bias']",)  # T5's bias table is looked up, not multiplied
    return sum(
        int(np.prod(x.shape))
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if len(x.shape) >= 2
        and not jax.tree_util.keystr(path).endswith("['bias']")
        and not any(s in jax.tree_util.keystr(path) for s in skip)
    )


def attention_flops(layers: int, attn_dim: int, queries: int, keys: int, *, causal: bool) -> float:
    """Training FLOPs of the score and value matmuls of `layers` attention layers: 3 x (2 matmuls x
    2 FLOPs) per query, key and attention dimension; a causal mask leaves half of them."""
    return 12 * layers * attn_dim * queries * keys * (0.5 if causal else 1.0)


def band_pairs(length: int, window: int) -> float:
    """Query-key pairs of a causal band over `length` tokens (query i sees min(i + 1, window) keys),
    counted as the causal half is (length^2 / 2 for a band as wide as the sequence): w * T - w^2 / 2."""
    w = min(window, length)
    return w * length - w * w / 2


FLOPS_FAMILIES = ("decoder", "encoder", "encoder_decoder")  # the families the formula covers


def flops_note(family: str) -> str | None:
    """Why a family has no model FLOPs (None: it has)."""
    if family in FLOPS_FAMILIES:
        return None
    return (
        f"model.family {family}: the model FLOPs formula covers {', '.join(FLOPS_FAMILIES)} only (not image "
        "patches nor the ITM / ITC passes): model FLOPs and MFU are null; xla_flops_per_step is XLA's count; "
        "tokens_per_sec counts the caption tokens"
    )


def model_flops_per_example(
    cfg: Config,
    abstract_params,
    seq_len: int,
    target_len: int,
    predicted_len: int | None = None,
    *,
    forward: bool = False,
) -> float | None:
    """Model FLOPs of one example (the formula of the module docstring); training unless `forward`.
    None for a family the formula does not cover (`flops_note`)."""
    m = cfg.model
    if m.family not in FLOPS_FAMILIES:
        return None
    attn_dim = m.num_heads * m.resolved_head_dim
    out_layer = 6 * m.model_dim * m.vocab_size
    if m.family == "encoder_decoder":
        enc, dec = abstract_params["encoder"], abstract_params["decoder"]
        cross_kv = _kernel_sizes(dec, skip=("['attention']", "['mlp']", "['query']", "['out']"))
        flops = 6 * _kernel_sizes(enc) * seq_len + attention_flops(
            m.num_layers, attn_dim, seq_len, seq_len, causal=False
        )
        flops += 6 * (_kernel_sizes(dec) - cross_kv) * target_len + 6 * cross_kv * seq_len
        layers = m.resolved_decoder_layers
        flops += attention_flops(layers, attn_dim, target_len, target_len, causal=True)
        flops += attention_flops(layers, attn_dim, target_len, seq_len, causal=False)
        flops += out_layer * target_len
    elif m.family == "decoder":
        windows = [m.layer_window(i) for i in range(m.num_layers)]
        flops = 6 * _kernel_sizes(abstract_params["decoder"]) * seq_len
        flops += attention_flops(windows.count(0), attn_dim, seq_len, seq_len, causal=True) + out_layer * seq_len
        flops += sum(12 * attn_dim * band_pairs(seq_len, w) for w in windows if w)  # banded layers
    else:  # encoder
        flops = 6 * _kernel_sizes(abstract_params["encoder"]) * seq_len
        flops += attention_flops(m.num_layers, attn_dim, seq_len, seq_len, causal=False)
        if "mlm" in abstract_params:
            flops += (6 * _kernel_sizes(abstract_params["mlm"]) + out_layer) * (predicted_len or seq_len)
        flops += 6 * sum(
            _kernel_sizes(abstract_params[k]) for k in ("pooler", "nsp", "classification") if k in abstract_params
        )
    return flops / 3 if forward else flops


# ----------------------------------------------------------------------------- peaks
@functools.cache
def measured_matmul_peak(dtype_name: str, n: int = MATMUL_SIZE) -> float:
    """FLOP/s of an n x n matmul on the first device, best of several runs (cached per process)."""
    a = jax.device_put(jnp.ones((n, n), dtype_name), jax.devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    runs = 5 if jax.default_backend() == "cpu" else 20
    best = min(_timed(f, a) for _ in range(runs))
    return 2 * n**3 / best


def _timed(f, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - start


def nominal_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k.lower() in kind.lower()), None)


def peaks() -> dict:
    """The peak MFU is stated against (`peak_tflops`, `peak_source`), and both candidates."""
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    measured = measured_matmul_peak(dtype)
    nominal = None if jax.default_backend() == "cpu" else nominal_peak()
    kind = jax.devices()[0].device_kind
    if nominal:
        peak, source = nominal, f"nominal {kind} bf16 dense"
    else:
        peak, source = measured, f"measured matmul {MATMUL_SIZE}x{MATMUL_SIZE} {dtype}"
    return {"peak": peak, "peak_source": source, "measured": measured, "nominal": nominal}


# ----------------------------------------------------------------------------- our side
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


def _peak_memory(compiled) -> int:
    device = jax.devices()[0]
    memory = device.memory_stats() if hasattr(device, "memory_stats") else None
    if memory and "peak_bytes_in_use" in memory:
        return int(memory["peak_bytes_in_use"])
    analysis = compiled.memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)


def _time_steps(run, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def bench(cfg: Config, steps: int = 10, mesh=None, *, forward: bool = False, batch: dict | None = None) -> dict:
    """Time our jitted train step (or, `forward`, the jitted forward) of `cfg`: one dict of figures.
    Training adds the objective's heads to the model; the forward runs the model as configured."""
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
        jax.block_until_ready(compiled(params, inputs))  # warm-up
        times = _time_steps(lambda: jax.block_until_ready(compiled(params, inputs)), steps)
        loss = None
    else:
        task = trainer.Task(
            model=model, init_params=lambda rng: build(cfg, rng)[1], loss_fn=objective.loss_fn(cfg), train_batches=None
        )
        tx, schedule = trainer.make_optimizer(cfg.train, None)
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

        run()  # warm-up
        times = _time_steps(run, steps)
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
    peak = peaks() if achieved is not None else {"peak": None, "peak_source": None, "measured": None, "nominal": None}
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
        "peak_memory_bytes": _peak_memory(compiled),
    }
    if flops_note(cfg.model.family):
        result["model_flops_note"] = flops_note(cfg.model.family)
    if loss is not None:
        result["loss"] = loss
    return result


# ----------------------------------------------------------------------------- torch
def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise BenchError(f"--compare torch needs torch and transformers ({cli.first_line(e)}): {HF_EXTRA}") from None
    return torch, transformers


def hf_architecture(model_cfg) -> str:
    """The Hugging Face class of our model: GPT2LMHeadModel, BertForPreTraining / BertForMaskedLM /
    BertModel (by heads), T5ForConditionalGeneration."""
    from transformer_jax import hf

    if model_cfg.family not in FLOPS_FAMILIES:  # the text families: the ones Hugging Face has a class of ours for
        raise BenchError(
            f"model.family: {model_cfg.family} has no Hugging Face counterpart for --compare torch "
            "(decoder: GPT2LMHeadModel, encoder: BERT, encoder_decoder: T5ForConditionalGeneration)"
        )
    try:
        return hf._default_architecture(model_cfg)
    except ValueError as e:
        raise BenchError(f"--compare torch: {cli.first_line(e)}") from None


def check_comparable(cfg: Config, *, forward: bool = False) -> str:
    """The Hugging Face architecture `--compare torch` will build, or a BenchError saying why none."""
    from transformer_jax import hf

    _import_torch()
    model_cfg = cfg.model if forward else tasks.get(cfg.train.objective).with_heads(cfg).model
    architecture = hf_architecture(model_cfg)
    if not forward and architecture in ("BertModel", "GPT2Model"):
        raise BenchError(f"--compare torch: {architecture} has no loss to train (objective {cfg.train.objective})")
    try:
        hf.config_to_hf(model_cfg, architecture)
    except (KeyError, ValueError) as e:
        raise BenchError(f"--compare torch: {architecture}: {cli.first_line(e)}") from None
    return architecture


def torch_model(model_cfg, architecture: str | None = None, seed: int = 0):
    """(torch module, architecture, HF config dict): the Hugging Face model of `model_cfg`, random weights."""
    torch, transformers = _import_torch()
    from transformer_jax import hf

    architecture = architecture or hf_architecture(model_cfg)
    try:
        hf_config = hf.config_to_hf(model_cfg, architecture)
    except (KeyError, ValueError) as e:
        raise BenchError(f"--compare torch: {architecture}: {cli.first_line(e)}") from None
    config = transformers.AutoConfig.for_model(**hf_config)
    torch.manual_seed(seed)
    module = getattr(transformers, architecture)(config)
    out, into = module.get_output_embeddings(), module.get_input_embeddings()
    if not hf_config.get("tie_word_embeddings", True) and out is not None and out.weight is into.weight:
        # transformers 5 ties T5's LM head whatever config.json says: untie it, as our model is
        out.weight = torch.nn.Parameter(into.weight.detach().clone())
        module.config.tie_word_embeddings = False
    return module, architecture, hf_config


def torch_params(module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied weights once


def _jax_cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _torch_device(torch) -> str:
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return "cuda"
    raise BenchError(
        f"--compare torch: JAX runs on {backend}, and this torch ({torch.__version__}) has no device "
        "of that kind: compare on the same device (a CUDA build of torch, or JAX_PLATFORMS=cpu)"
    )


def _torch_batch(torch, architecture: str, batch: dict, device: str, forward: bool) -> dict:
    """The synthetic batch as HF keyword arguments (same token ids); training adds HF's `labels`."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)
    family = (
        "decoder"
        if architecture.startswith("GPT2")
        else "encoder_decoder"
        if architecture.startswith("T5")
        else "encoder"
    )
    kwargs = {k: t(v) for k, v in forward_inputs(family, batch).items()}
    if forward or architecture in ("BertModel", "GPT2Model"):
        return kwargs
    if family == "decoder":
        kwargs["labels"] = kwargs["input_ids"]  # HF shifts them: the next-token loss
    elif family == "encoder_decoder":
        kwargs["labels"] = t(np.where(batch["loss_mask"] > 0, batch["targets"], -100))
    else:  # MLM over the masked positions; HF's head runs at every position
        labels = np.full(batch["input_ids"].shape, -100, np.int64)
        positions = batch["mlm_positions"]
        picked = np.take_along_axis(batch["mlm_targets"], positions, axis=1)
        weights = np.take_along_axis(batch["mlm_weights"], positions, axis=1)
        np.put_along_axis(labels, positions, np.where(weights > 0, picked, -100), axis=1)
        kwargs["labels"] = t(labels)
        if architecture == "BertForPreTraining":
            kwargs["next_sentence_label"] = t(batch["nsp_labels"])
    return kwargs


def torch_bench(cfg: Config, batch: dict, steps: int = 10, *, forward: bool = False, compile: bool = False) -> dict:
    """Time the Hugging Face model of `cfg` in torch on `batch` (ours' synthetic batch): eager and,
    `compile`, torch.compile. Training: forward + loss + backward (+ clip) + AdamW step."""
    torch, transformers = _import_torch()
    transformers.logging.set_verbosity_error()  # not its notes on config defaults (loss_type=None)
    cfg = cfg if forward else tasks.get(cfg.train.objective).with_heads(cfg)
    model_cfg, t = cfg.model, cfg.train
    architecture = check_comparable(cfg, forward=True)  # cfg has its heads already
    device = _torch_device(torch)
    default_threads = torch.get_num_threads()
    threads = _jax_cpu_threads()
    torch.set_num_threads(threads)
    module, architecture, _ = torch_model(model_cfg, architecture, seed=t.seed)
    module.to(device)
    dropout = max(model_cfg.dropout_rate, model_cfg.attention_dropout_rate)
    module.train(not forward and dropout > 0)  # eval mode: every dropout off (the config's rate is 0)
    kwargs = _torch_batch(torch, architecture, batch, device, forward)
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_cfg.dtype)
    autocast = (
        (lambda: torch.autocast(device_type=device, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    target_len = batch["decoder_input_ids"].shape[1] if "decoder_input_ids" in batch else 0
    tokens = t.batch_size * (cfg.data.seq_len + target_len)

    def make_optimizer():
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]  # as ours: no decay on 1-d
        if t.optimizer == "adafactor":
            return torch.optim.Adafactor(groups, lr=t.learning_rate)
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.b1, t.b2), eps=1e-8)

    def timed(net, warmup: int) -> dict:
        if forward:

            def step():
                with torch.inference_mode(), autocast():
                    net(**kwargs)
                sync()
        else:
            optimizer = make_optimizer()

            def step():
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = net(**kwargs).loss
                loss.backward()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), t.grad_clip)
                optimizer.step()
                sync()
                step.loss = float(loss.detach())

        first = _time_steps(step, warmup)
        times = _time_steps(step, steps)
        step_s = float(np.median(times))
        out = {
            "warmup_s": round(sum(first), 2),
            "step_s": round(step_s, 5),
            "step_s_range": [round(min(times), 5), round(max(times), 5)],
            "tokens_per_sec": round(tokens / step_s, 1),
        }
        if not forward:
            out["loss"] = step.loss
        return out

    result = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "architecture": architecture,
        "device": device,
        "threads": threads,
        "torch_default_threads": default_threads,
        "attn_implementation": getattr(module.config, "_attn_implementation", None),
        "dtype": f"autocast {model_cfg.dtype}" if autocast_dtype else "float32",
        "dropout": "on" if module.training else "off",
        "params": torch_params(module),
        "step": "forward (inference_mode)"
        if forward
        else f"forward + loss + backward{' + clip' if t.grad_clip > 0 else ''} + "
        f"torch.optim.{'Adafactor' if t.optimizer == 'adafactor' else 'AdamW'}",
    }
    result["eager"] = timed(module, warmup=2)
    if compile:
        try:
            result["compile"] = timed(torch.compile(module), warmup=2)  # the first step compiles
        except Exception as e:  # inductor needs a C++ compiler on CPU, Triton on GPU
            raise BenchError(f"--compile: torch.compile failed: {type(e).__name__}: {cli.first_line(e)}") from None
    return result


# ----------------------------------------------------------------------------- the program
def summary(result: dict) -> str:
    """One line for people: our tokens/s, then torch's and the ratios (or MFU without torch)."""
    parts = [f"jax {result['tokens_per_sec']:,.0f} tok/s"]
    tr = result.get("torch")
    if tr:
        parts.append(
            f"torch eager {tr['eager']['tokens_per_sec']:,.0f} tok/s ({result['speedup_vs_torch_eager']:.2f}x)"
        )
        if "compile" in tr:
            parts.append(
                f"torch.compile {tr['compile']['tokens_per_sec']:,.0f} tok/s "
                f"({result['speedup_vs_torch_compile']:.2f}x)"
            )
    if result["mfu"] is None:
        parts.append("MFU n/a (no model FLOPs formula for this family: model_flops_note)")
    else:
        parts.append(f"MFU {100 * result['mfu']:.1f}% of {result['peak_tflops']:g} TFLOP/s ({result['peak_source']})")
    if "pipeline" in result:
        data = result["pipeline"]
        parts.append(
            f"pipeline ({data['source']}, {data['workers']} workers) {data['tokens_per_sec']:,.0f} tok/s: "
            f"the {data['bottleneck']} is the bottleneck"
        )
    what = "forward" if result["mode"] == "forward" else "train step"
    return f"{result['config'] or 'bench'} {what}: " + " · ".join(parts)


RESULT_FILE = "bench.json"


def parser():
    p = cli.parser(
        __doc__.splitlines()[0],
        workdir=f"where the JSON result is also written ({RESULT_FILE}), and where --pipeline trains or "
        "finds its tokenizer (default there: runs/bench_pipeline); without it nothing is written",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--forward", action="store_true", help="time the forward pass (inference) instead of the train step")
    p.add_argument("--compare", choices=["torch"], help="also time the same model in PyTorch (Hugging Face)")
    p.add_argument("--compile", action="store_true", help="with --compare torch: also time torch.compile(model)")
    p.add_argument("--min-ratio", type=float, help="exit 1 when ours / torch eager tokens/s is below this")
    p.add_argument(
        "--pipeline",
        type=int,
        nargs="?",
        const=400,
        metavar="BATCHES",
        help="also time the input pipeline alone (train.pretrain's, as configured: data.source, "
        "data.workers) over BATCHES batches (default 400), and say which is the bottleneck",
    )
    p.add_argument(
        "--abstract",
        action="store_true",
        help="run nothing: the train step's memory per device (params, optimizer state, gradients, "
        "activations) on --devices devices of the config's mesh, nothing allocated (train/memory.py)",
    )
    p.add_argument("--devices", type=int, help="with --abstract: the devices of the mesh (default: this machine's)")
    p.add_argument(
        "--device-memory-gb",
        type=float,
        dest="device_memory_gb",
        help=f"with --abstract: one device's memory in GB (1e9 bytes; default: the device's own on an "
        f"accelerator, else an H200's {memory.H200_GB})",
    )
    p.add_argument(
        "--require-fit",
        action="store_true",
        dest="require_fit",
        help="with --abstract: exit 1 when the estimate does not fit the device memory",
    )
    return p


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


def abstract_run(args) -> tuple[dict, str | None]:
    """--abstract: (train/memory.py's estimate, None or the line saying why --require-fit failed)."""
    timing = [
        flag
        for flag, on in (
            ("--compare", args.compare),
            ("--forward", args.forward),
            ("--pipeline", args.pipeline),
            ("--compile", args.compile),
            ("--min-ratio", args.min_ratio is not None),
        )
        if on
    ]
    if timing:
        raise BenchError(f"{timing[0]}: --abstract runs nothing (it estimates memory); drop one of the two")
    devices = len(jax.devices()) if args.devices is None else args.devices
    if devices < 1:
        raise BenchError(f"--devices: {devices}, needs at least 1")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise BenchError(f"--device-memory-gb: {args.device_memory_gb:g}, needs a positive size")
    cfg, _ = cli.config_and_workdir(args)
    result = memory.estimate(cfg, devices, args.device_memory_gb)
    if args.require_fit and not result["fits"]:
        per = result["bytes_per_device"]
        return result, (
            f"--require-fit: {per['total'] / memory.GB:,.1f} GB per device does not fit in "
            f"{result['device_memory_bytes'] / memory.GB:,.1f} GB ({result['device_memory_source']})"
        )
    return result, None


def run(args, mesh=None) -> tuple[dict, str | None]:
    """(the JSON object, None or the line saying why --min-ratio failed) for parsed arguments."""
    if args.abstract:
        return abstract_run(args)
    abstract_only = [
        flag
        for flag, on in (
            ("--devices", args.devices is not None),
            ("--require-fit", args.require_fit),
            ("--device-memory-gb", args.device_memory_gb is not None),
        )
        if on
    ]
    if abstract_only:
        raise BenchError(f"{abstract_only[0]} needs --abstract")
    if args.steps < 1:
        raise BenchError(f"--steps: {args.steps}, needs at least 1")
    if (args.compile or args.min_ratio is not None) and args.compare != "torch":
        raise BenchError(f"{'--compile' if args.compile else '--min-ratio'} needs --compare torch")
    cfg, _ = cli.config_and_workdir(args)
    if mesh is None:  # the mesh and batch split, before anything is built (a given mesh: bench() checks the batch)
        cli.check_mesh(cfg, jax.devices()[:1] if args.compare == "torch" else None)
    if args.compare == "torch":
        check_comparable(cfg, forward=args.forward)  # before the (long) JAX side: said at once
        mesh = mesh or sh.make_mesh(cfg.mesh, jax.devices()[:1])  # torch runs on one device: so do we
    if args.pipeline and not config_lib.is_text_objective(cfg.train.objective):
        raise BenchError(f"--pipeline: times train.pretrain's text pipeline; train.objective is {cfg.train.objective}")
    batch = synthetic_batch(cfg, np.random.default_rng(0))
    result = bench(cfg, args.steps, mesh, forward=args.forward, batch=batch)
    if args.pipeline:
        workdir = args.workdir or os.path.join("runs", "bench_pipeline")
        result["pipeline"] = data = pipeline_bench(cfg, workdir, args.pipeline)
        # this process's pipeline feeds 1/process_count of the step's tokens
        data["step_tokens_per_sec_per_process"] = round(result["tokens_per_sec"] / jax.process_count(), 1)
        data["bottleneck"] = "pipeline" if data["tokens_per_sec"] < data["step_tokens_per_sec_per_process"] else "step"
    if args.compare != "torch":
        return result, None
    result["torch"] = tr = torch_bench(cfg, batch, args.steps, forward=args.forward, compile=args.compile)
    tr["params_match"] = tr["params"] == result["params_published"]
    result["speedup_vs_torch_eager"] = round(result["tokens_per_sec"] / tr["eager"]["tokens_per_sec"], 3)
    result["speedup_vs_torch_compile"] = (
        round(result["tokens_per_sec"] / tr["compile"]["tokens_per_sec"], 3) if "compile" in tr else None
    )
    if args.min_ratio is not None and result["speedup_vs_torch_eager"] < args.min_ratio:
        return result, (
            f"ours / torch eager = {result['speedup_vs_torch_eager']:.3f}x is below --min-ratio "
            f"{args.min_ratio:g} ({result['tokens_per_sec']:,.0f} vs {tr['eager']['tokens_per_sec']:,.0f} tok/s)"
        )
    return result, None


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.compare == "torch":  # JAX must leave the GPU's memory to torch too
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    result, failure = run(args)
    print(json.dumps(result, indent=1), flush=True)
    if args.workdir and jax.process_index() == 0:
        os.makedirs(args.workdir, exist_ok=True)
        path = os.path.join(args.workdir, RESULT_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(path + ".tmp", path)
    if result["mode"] == "abstract":
        print(memory.summary(result), file=sys.stderr)
        if failure:
            print(f"error: {failure}", file=sys.stderr)
            sys.exit(1)
        return
    tr = result.get("torch")
    if tr and not tr["params_match"]:
        print(
            f"warning: parameter counts differ: ours {result['params_published']:,} (published), "
            f"torch {tr['architecture']} {tr['params']:,}",
            file=sys.stderr,
        )
    print(summary(result), file=sys.stderr)
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.main(main)
