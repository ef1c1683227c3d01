"""Model FLOPs and the peaks MFU is stated against: what `python -m train.bench` reports.

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
measured in this run (MATMUL_SIZE: 4096x4096; float32 over all cores on CPU, bfloat16 on an
accelerator; best of several runs). Both MFUs are reported as well (`mfu_vs_measured_peak`,
`mfu_vs_nominal_peak`).

The PyTorch peer (train/torch_peer.py) runs the same model on the same batch: the same FLOPs, so
its tokens/s set beside ours compare the same work.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from transformer_jax.config import Config


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
NOMINAL_BF16_PEAK = {  # matched in this order against jax's device_kind ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "V100": 125e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}
MATMUL_SIZE = 4096  # the measured peak's matmul: n x n


@functools.cache
def measured_matmul_peak(dtype_name: str, n: int = MATMUL_SIZE) -> float:
    """FLOP/s of an n x n matmul on the first device, best of several runs (cached per process)."""
    # random operands: a matmul of constants can run faster than real data does
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype_name), jax.devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    runs = 5 if jax.default_backend() == "cpu" else 20
    best = min(_timed(f, a) for _ in range(runs))
    return 2 * n**3 / best


def _timed(f, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - start


def nominal_peak(kind: str | None = None) -> float | None:
    """The nominal dense bf16 FLOP/s of a device kind (default: the first device's), None if unknown."""
    kind = kind or jax.devices()[0].device_kind
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k.lower() in kind.lower()), None)


def peaks(matmul_size: int = MATMUL_SIZE) -> dict:
    """The peak MFU is stated against (`peak_tflops`, `peak_source`), and both candidates."""
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    measured = measured_matmul_peak(dtype, matmul_size)
    nominal = None if jax.default_backend() == "cpu" else nominal_peak()
    kind = jax.devices()[0].device_kind
    if nominal:
        peak, source = nominal, f"nominal {kind} bf16 dense"
    else:
        peak, source = measured, f"measured matmul {matmul_size}x{matmul_size} {dtype}"
    return {"peak": peak, "peak_source": source, "measured": measured, "nominal": nominal}
