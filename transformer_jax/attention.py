"""Attention as pure functions: softmax(Q K^T / sqrt(d_k)) V, and its multi-head form.

Shapes use named letters: b batch, t query length, s key/value length, h query heads,
k key/value heads (grouped-query attention: h is a multiple of k), g = h // k query heads
per key/value head, d head dim, m model dim.

Nothing here has parameters or state; the NNX modules in `layers.py` call these.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------- masks
def padding_mask(ids: Array | None = None, *, lengths: Array | None = None, max_len: int | None = None,
                 pad_id: int = 0) -> Array:
    """Key mask [b, 1, 1, s] (True = attend) from token ids or from lengths."""
    if (ids is None) == (lengths is None):
        raise ValueError("padding_mask takes exactly one of ids or lengths")
    if ids is not None:
        keep = ids != pad_id
    else:
        if max_len is None:
            raise ValueError("padding_mask(lengths=...) needs max_len")
        keep = jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]
    return keep[:, None, None, :]


def key_mask(attention_mask: Array) -> Array:
    """A [b, s] 0/1 attention mask as a boolean [b, 1, 1, s] mask."""
    return attention_mask.astype(bool)[:, None, None, :]


def causal_mask(q_len: int, kv_len: int | None = None, *, offset: Array | int = 0) -> Array:
    """[1, 1, t, s] lower-triangular mask; query i sits at position offset + i."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None] + offset
    return (jnp.arange(kv_len)[None, :] <= q_pos)[None, None]


def segment_mask(q_segments: Array, kv_segments: Array | None = None) -> Array:
    """[b, 1, t, s] mask that keeps attention inside one packed document (segment id 0 = padding)."""
    kv_segments = q_segments if kv_segments is None else kv_segments
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return (same & (kv_segments[:, None, :] != 0))[:, None]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the masks that are not None (broadcasting); None if all are None."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0].astype(bool)
    for m in masks[1:]:
        out = jnp.logical_and(out, m.astype(bool))
    return out


# ----------------------------------------------------------------------------- attention
IMPLEMENTATIONS = (None, "xla", "cudnn", "tpu_flash")


KERNEL_BACKENDS = {"cudnn": "gpu", "tpu_flash": "tpu"}


def check_backend(implementation: str | None) -> None:
    """One line, before anything compiles, when the kernel asked for does not exist on this backend."""
    need, have = KERNEL_BACKENDS.get(implementation), jax.default_backend()
    if need and need != have:
        from transformer_jax.config import ConfigError
        raise ConfigError(f"model.attention_impl: {implementation} runs on {need} only and this run's backend is "
                          f"{have}; use xla (fused where XLA can) or explicit")


class Mask(NamedTuple):
    """What each query may attend to, in the smallest form that says it. Causality and padding
    travel as a flag and as lengths (the fused kernels take them natively); `dense` holds only
    what nothing else expresses (packed segments, a KV cache's written slots, arbitrary masks)."""
    causal: bool = False
    kv_lengths: Array | None = None     # [b]: keys at index >= length are padding
    dense: Array | None = None          # boolean, broadcastable to [b, h, t, s]; True = attend


def _length_masks(b: int, t: int, s: int, q_lengths, kv_lengths) -> tuple[Array | None, Array | None]:
    q = None if q_lengths is None else (jnp.arange(t)[None, :] < jnp.reshape(q_lengths, (b, 1)))[:, None, :, None]
    kv = None if kv_lengths is None else (jnp.arange(s)[None, :] < jnp.reshape(kv_lengths, (b, 1)))[:, None, None, :]
    return q, kv


def _as_4d(x: Array | None, dtype=None) -> Array | None:
    if x is None:
        return None
    x = jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)
    return x if dtype is None else x.astype(dtype)


def _tpu_flash(q, k, v, *, bias, mask, causal, kv_lengths, scale):
    """The Pallas TPU flash kernel: segment ids express padding; it takes no boolean mask."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu
    if mask is not None:
        raise ValueError("attention_impl tpu_flash takes causality and padding, not a dense mask "
                         "(packed segments, KV cache): use attention_impl xla for these")
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) if g > 1 else x for x in (k, v))  # the kernel wants as many kv heads as q heads
    segments = None
    if kv_lengths is not None:
        _, kv_keep = _length_masks(b, t, k.shape[1], None, kv_lengths)
        segments = tpu.SegmentIds(q=jnp.ones((b, t), jnp.int32), kv=kv_keep[:, 0, 0, :].astype(jnp.int32))
    out = tpu.flash_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)),
                              ab=None if bias is None else jnp.broadcast_to(bias, (b, h, t, k.shape[1])).astype(q.dtype),
                              segment_ids=segments, causal=causal, sm_scale=scale)
    return out.transpose(0, 2, 1, 3)


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, bias: Array | None = None,
                          causal: bool = False, q_lengths: Array | None = None, kv_lengths: Array | None = None,
                          dropout_rate: float = 0.0, dropout_rng: Array | None = None,
                          implementation: str | None = None, return_weights: bool = False,
                          scale: float | None = None):
    """softmax(Q K^T / sqrt(d_k) + bias) V.

    q: [b, t, h, d]; k, v: [b, s, k, d] with h a multiple of k (grouped-query attention).
    mask: boolean, broadcastable to [b, h, t, s], True = attend. bias: additive, broadcastable
    to [b, h, t, s]. causal: query i attends to keys j <= i (aligned at the start).
    q_lengths / kv_lengths [b]: queries / keys at index >= length are padding.
    The softmax runs in float32 for bfloat16/float16/float32 inputs (float64 for float64
    inputs, so gradient checks in float64 are exact); a query row with no key to attend
    to gives zeros, never NaN. `scale` replaces 1/sqrt(d_k) (T5 folds it into its weights).

    implementation: None for this explicit path; "xla" or "cudnn" route to
    `jax.nn.dot_product_attention` (cuDNN flash attention on GPU), "tpu_flash" to the Pallas
    TPU flash kernel. Causality and lengths reach them as such; mask and bias are passed in the
    shape given, never broadcast. The fused kernels have no dropout: dropout_rate > 0 with one
    of them is an error. Attention weights exist only on the explicit path, which
    return_weights uses whatever the implementation. Returns out [b, t, h, d], or
    (out, weights [b, h, t, s]).
    """
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if h % kv_heads:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv_heads})")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    scale = d ** -0.5 if scale is None else scale
    if implementation is not None and not return_weights:
        if dropout_rate > 0.0:
            raise ValueError(f"attention dropout ({dropout_rate}) needs the explicit path: the {implementation} "
                             "kernel has none (use attention_impl explicit, or attention_dropout_rate 0)")
        return _fused(q, k, v, mask=mask, bias=bias, causal=causal, q_lengths=q_lengths, kv_lengths=kv_lengths,
                      implementation=implementation, scale=scale)

    mask = combine_masks(mask, causal_mask(t, s) if causal else None, *_length_masks(b, t, s, q_lengths, kv_lengths))
    g = h // kv_heads
    qg = q.reshape(b, t, kv_heads, g, d)
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float32 at least; float64 stays float64
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=softmax_dtype) * scale
    logits = logits.reshape(b, h, t, s)
    if bias is not None:
        logits = logits + bias.astype(softmax_dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(softmax_dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)  # all-masked rows: zeros rather than uniform
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs a dropout_rng")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights_dropped = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    else:
        weights_dropped = weights
    out = jnp.einsum("bkgts,bskd->btkgd", weights_dropped.reshape(b, kv_heads, g, t, s).astype(v.dtype), v)
    out = out.reshape(b, t, h, d)
    return (out, weights) if return_weights else out


def _fused(q, k, v, *, mask, bias, causal, q_lengths, kv_lengths, implementation, scale):
    b, t, _, _ = q.shape
    s = k.shape[1]
    mask = _as_4d(mask, bool)
    int32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    if implementation == "tpu_flash":
        if q_lengths is not None:
            raise ValueError("attention_impl tpu_flash takes key lengths only")
        out = _tpu_flash(q, k, v, bias=_as_4d(bias), mask=mask, causal=causal, kv_lengths=kv_lengths, scale=scale)
    else:
        out = jax.nn.dot_product_attention(q, k, v, bias=_as_4d(bias, q.dtype), mask=mask, scale=scale,
                                           is_causal=causal, query_seq_lengths=int32(q_lengths),
                                           key_value_seq_lengths=int32(kv_lengths), implementation=implementation)
    # A query row with no key to attend to is zeros here as on the explicit path (the kernels give
    # an average or padding garbage): rows of padded queries, of empty sequences, of masked-out rows.
    q_keep, kv_keep = _length_masks(b, t, s, q_lengths, kv_lengths)
    rows = None
    if mask is not None:  # only where a dense mask exists anyway
        rows = jnp.any(combine_masks(mask, causal_mask(t, s) if causal else None, kv_keep), axis=-1)  # [b|1, h|1, t]
    elif kv_lengths is not None:
        rows = (jnp.asarray(kv_lengths) > 0)[:, None, None]
    if q_keep is not None:
        rows = combine_masks(rows, q_keep[..., 0])
    if rows is not None:
        out = out * jnp.swapaxes(rows, 1, 2)[..., None].astype(out.dtype)  # [b|1, t, h|1, 1]
    return out


# ----------------------------------------------------------------------------- multi-head
class AttentionOutput(NamedTuple):
    out: Array                      # [b, t, m]
    weights: Array | None = None    # [b, h, t, s] when asked for
    kv_cache: dict | None = None    # updated cache when one was given


def project(params: dict, x: Array, spec: str) -> Array:
    """A dense projection with an optional bias: params {'kernel', 'bias'?}."""
    y = jnp.einsum(spec, x, params["kernel"].astype(x.dtype))
    if params.get("bias") is not None:
        y = y + params["bias"].astype(x.dtype)
    return y


def update_kv_cache(cache: dict, k: Array, v: Array) -> tuple[dict, Array, Array]:
    """Write k, v [b, t, k, d] into cache {'key', 'value': [b, S, k, d], 'index': []} at its index."""
    i = cache["index"]
    key = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype), i, axis=1)
    value = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype), i, axis=1)
    return {"key": key, "value": value, "index": i + k.shape[1]}, key, value


def init_kv_cache(batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any = jnp.float32) -> dict:
    zeros = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
    return {"key": zeros, "value": zeros, "index": jnp.zeros((), jnp.int32)}


def multi_head_attention(params: dict, inputs_q: Array, inputs_kv: Array | None = None, *,
                         num_heads: int | None = None, num_kv_heads: int | None = None,
                         mask: Array | None = None, bias: Array | None = None, causal: bool = False,
                         kv_lengths: Array | None = None, rotary: Any = None, kv_cache: dict | None = None, scale: float | None = None,
                         dropout_rate: float = 0.0, dropout_rng: Array | None = None,
                         implementation: str | None = None, return_weights: bool = False) -> AttentionOutput:
    """Multi-head attention over an explicit params pytree.

    params: {'query': {'kernel' [m, h, d], 'bias'? [h, d]}, 'key' and 'value': [m, k, d],
    'out': {'kernel' [h, d, m], 'bias'? [m]}}. inputs_q [b, t, m]; inputs_kv [b, s, m]
    (defaults to inputs_q: self-attention). rotary: a function (x [b, t, h, d], which) -> x
    applied to queries and keys ('q' or 'k'). kv_cache: {'key', 'value', 'index'}; the new keys
    and values are written at `index` and queries attend to the whole cache (the caller's
    mask hides slots not yet written). num_heads / num_kv_heads, when given, are checked
    against the kernels' shapes.
    """
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    q = project(params["query"], inputs_q, "btm,mhd->bthd")
    k = project(params["key"], inputs_kv, "bsm,mkd->bskd")
    v = project(params["value"], inputs_kv, "bsm,mkd->bskd")
    for name, want, got in (("num_heads", num_heads, q.shape[2]), ("num_kv_heads", num_kv_heads, k.shape[2])):
        if want is not None and want != got:
            raise ValueError(f"{name}={want} but the kernels hold {got} heads")
    if rotary is not None:
        q, k = rotary(q, "q"), rotary(k, "k")
    if kv_cache is not None:
        index = kv_cache["index"]
        kv_cache, k, v = update_kv_cache(kv_cache, k, v)
        if causal:  # the queries sit at cache slots index .. index + t - 1, not at the start
            mask = combine_masks(mask, causal_mask(q.shape[1], k.shape[1], offset=index))
            causal = False
    result = dot_product_attention(q, k, v, mask=mask, bias=bias, causal=causal, kv_lengths=kv_lengths,
                                   dropout_rate=dropout_rate,
                                   dropout_rng=dropout_rng, implementation=implementation,
                                   return_weights=return_weights, scale=scale)
    out, weights = result if return_weights else (result, None)
    return AttentionOutput(project(params["out"], out, "bthd,hdm->btm"), weights, kv_cache)
