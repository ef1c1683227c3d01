"""The PyTorch peer of `python -m train.bench --compare torch`: the same model, built with Hugging
Face `transformers`, timed in the same run, on the same device, on the same batch.

Needs the `hf` extra (torch and transformers). The model comes from the mapped config
(`transformer_jax.hf.config_to_hf`): GPT2LMHeadModel (decoder), BertForPreTraining (encoder, mlm
+ nsp heads), BertForMaskedLM (mlm head), BertModel (no heads), T5ForConditionalGeneration
(encoder-decoder). Random weights (timing only); the published parameter counts are checked to
match. Same token ids (train/step_bench.py's synthetic batch), dropout off on both sides when the
config's is 0, float32 unless model.dtype is bfloat16/float16 (then torch autocast to it), torch
threads set to the CPU cores JAX uses. torch's step: forward + the model's own loss (`labels=`) +
backward + gradient clipping (when train.grad_clip > 0) + torch.optim.AdamW (torch's default
foreach/fused choice; Adafactor when train.optimizer is adafactor), eager and, with `--compile`,
`torch.compile(model)`; `--forward` times the forward under `torch.inference_mode`.

Both sides must time the same batch and count the same FLOPs: the same model on the same tokens
(`forward_inputs`, shared with train/step_bench.py; the tokens per step counted alike), so ours /
torch in tokens per second (train.bench's `speedup_vs_torch_eager` / `speedup_vs_torch_compile`)
is a ratio of model FLOP/s too (train/flops.py). A change to what one side's step does (its
inputs, loss, clipping, optimizer) is to be made on the other too.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np

from train import cli
from train.flops import FLOPS_FAMILIES
from train.step_bench import BenchError, forward_inputs, time_steps
from transformer_jax import tasks
from transformer_jax.config import Config

HF_EXTRA = "pip install 'transformer-jax[hf]' (torch and transformers)"


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


def torch_bench(
    cfg: Config,
    batch: dict,
    steps: int = 10,
    *,
    forward: bool = False,
    compile: bool = False,
    eager: bool = True,
    warmup: int = 2,
) -> dict:
    """Time the Hugging Face model of `cfg` in torch on `batch` (ours' synthetic batch): eager (unless
    not `eager`) and, `compile`, torch.compile, each after `warmup` steps. Training: forward + loss +
    backward (+ clip) + AdamW step. On CUDA each mode's `peak_memory_bytes` is torch's allocator peak."""
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

    def timed(net) -> dict:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        losses: list[float] = []  # the training steps' losses: the last one is reported
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
                losses.append(float(loss.detach()))

        first = time_steps(step, warmup)
        times = time_steps(step, steps)
        step_s = float(np.median(times))
        out = {
            "warmup_s": round(sum(first), 2),
            "step_s": round(step_s, 5),
            "step_s_range": [round(min(times), 5), round(max(times), 5)],
            "tokens_per_sec": round(tokens / step_s, 1),
        }
        if not forward:
            out["loss"] = losses[-1]
        if device == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
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
    if eager:
        result["eager"] = timed(module)
    if compile:
        try:
            result["compile"] = timed(torch.compile(module))  # the first step compiles
        except Exception as e:  # inductor needs a C++ compiler on CPU, Triton on GPU
            raise BenchError(f"--compile: torch.compile failed: {type(e).__name__}: {cli.first_line(e)}") from None
    return result
