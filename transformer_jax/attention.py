"""Attention as pure functions: softmax(Q K^T / sqrt(d_k)) V, and its multi-head form.

Names carry shapes (as in the Flax gemma example and MaxText): an array's name ends in the
letters of its dimensions (`q_btnh`), einsum strings use the same letters, and shape comments
write them upper-case. The legend, shared by `layers.py` and `models/`:

    B  batch                      T  query (target) length      S  key/value (source) length
    D  model width                N  query heads                K  key/value heads
    H  head dim                   G  = N // K query heads per key/value head (grouped-query attention)
    F  mlp hidden                 V  vocab                      L  layers (a scanned stack)

A 1 in a shape is a broadcast dimension; B|1 is either.

Nothing here has parameters or state; the NNX modules in `layers.py` call these.

One file over 400 lines on purpose: the masks, the routing between the fused, TPU-flash, banded
(`banded.py`) and explicit routes, and the KV-cache step all read the same `Mask`, and a reader
checks one route against another on one page.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from transformer_jax import banded

Array = jax.Array


def _expect(assertion, *args, message: str) -> None:
    """A chex assertion on static shapes (free under jit) whose failure is a ValueError carrying
    `message`, which names the argument."""
    assertion(*args, custom_message=message, exception_type=ValueError)


# ----------------------------------------------------------------------------- masks
def padding_mask(
    ids: Array | None = None, *, lengths: Array | None = None, max_len: int | None = None, pad_id: int = 0
) -> Array:
    """Key mask [B, 1, 1, S] (True = attend) from token ids [B, S] or from lengths [B]."""
    if (ids is None) == (lengths is None):
        raise ValueError("padding_mask takes exactly one of ids or lengths")
    if ids is not None:
        keep_bs = ids != pad_id
    else:
        if max_len is None:
            raise ValueError("padding_mask(lengths=...) needs max_len")
        keep_bs = jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]
    return keep_bs[:, None, None, :]


def key_mask(attention_mask: Array) -> Array:
    """A [B, S] 0/1 attention mask as a boolean [B, 1, 1, S] mask."""
    return attention_mask.astype(bool)[:, None, None, :]


def causal_mask(q_len: int, kv_len: int | None = None, *, offset: Array | int = 0) -> Array:
    """[1, 1, T, S] lower-triangular mask; query i sits at position offset + i."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos_t1 = jnp.arange(q_len)[:, None] + offset  # [T, 1]
    return (jnp.arange(kv_len)[None, :] <= q_pos_t1)[None, None]


def band_mask(q_len: int, kv_len: int | None = None, window: int = 0, *, offset: Array | int = 0) -> Array:
    """[1, 1, T, S] lower edge of a local band: query i (at position offset + i) keeps keys
    j > offset + i - window. With `causal_mask` it is the causal band i - window < j <= i."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos_t1 = jnp.arange(q_len)[:, None] + offset  # [T, 1]
    return (jnp.arange(kv_len)[None, :] > q_pos_t1 - window)[None, None]


def segment_mask(q_segments: Array, kv_segments: Array | None = None) -> Array:
    """[B, 1, T, S] mask that keeps attention inside one packed document (segment id 0 = padding):
    q_segments [B, T], kv_segments [B, S] (default: q_segments)."""
    kv_segments = q_segments if kv_segments is None else kv_segments
    same_bts = q_segments[:, :, None] == kv_segments[:, None, :]
    return (same_bts & (kv_segments[:, None, :] != 0))[:, None]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the masks that are not None (broadcasting); None if all are None."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(bool)
    for m in present[1:]:
        out = jnp.logical_and(out, m.astype(bool))
    return out


# ----------------------------------------------------------------------------- attention
IMPLEMENTATIONS = (None, "xla", "cudnn", "tpu_flash")


KERNEL_BACKENDS: dict[str | None, str] = {"cudnn": "gpu", "tpu_flash": "tpu"}


def check_backend(implementation: str | None) -> None:
    """One line, before anything compiles, when the kernel asked for does not exist on this backend."""
    need, have = KERNEL_BACKENDS.get(implementation), jax.default_backend()
    if need and need != have:
        from transformer_jax.config import ConfigError

        raise ConfigError(
            f"model.attention_impl: {implementation} runs on {need} only and this run's backend is "
            f"{have}; use xla (fused where XLA can) or explicit"
        )


class Mask(NamedTuple):
    """What each query may attend to, in the smallest form that says it. Causality and padding
    travel as a flag and as lengths (the fused kernels take them natively), packed documents as
    their segment ids (a banded layer never needs their [T, S] mask); `dense` holds only what
    nothing else expresses (a KV cache's key mask, arbitrary masks)."""

    causal: bool = False
    kv_lengths: Array | None = None  # [B]: keys at index >= length are padding
    dense: Array | None = None  # boolean, broadcastable to [B, N, T, S]; True = attend
    local_window: int = 0  # > 0 (with causal): the band i - local_window < j <= i; a static
    # int, set per layer by the stack (ModelConfig.layer_window)
    segment_ids: Array | None = None  # [B, T] packed documents of a self-attention (0 = padding)


def _length_masks(b: int, t: int, s: int, q_lengths, kv_lengths) -> tuple[Array | None, Array | None]:
    """Lengths [B] as masks: queries [B, 1, T, 1], keys [B, 1, 1, S] (None where no lengths)."""
    q_b1t1 = None if q_lengths is None else (jnp.arange(t)[None, :] < jnp.reshape(q_lengths, (b, 1)))[:, None, :, None]
    kv_b11s = (
        None if kv_lengths is None else (jnp.arange(s)[None, :] < jnp.reshape(kv_lengths, (b, 1)))[:, None, None, :]
    )
    return q_b1t1, kv_b11s


def _as_4d(x: Array | None, dtype=None) -> Array | None:
    if x is None:
        return None
    x = jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)
    return x if dtype is None else x.astype(dtype)


def _band_rows(t: int, kv_lengths: Array, window: int) -> Array:
    """[B, 1, T]: whether causal query i keeps a key inside the band and the lengths: some j with
    i - window < j <= i and j < length."""
    lengths_b1 = jnp.reshape(kv_lengths, (-1, 1))
    return ((jnp.arange(t)[None, :] < lengths_b1 + window - 1) & (lengths_b1 > 0))[:, None, :]


def _tpu_flash(q_btnh, k_bskh, v_bskh, *, bias, mask, causal, kv_lengths, scale):
    """The Pallas TPU flash kernel: segment ids express padding; it takes no boolean mask."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu

    if mask is not None:
        raise ValueError(
            "attention_impl tpu_flash takes causality and padding, not a dense mask "
            "(packed segments, KV cache): use attention_impl xla for these"
        )
    b, t, n, _ = q_btnh.shape
    s = k_bskh.shape[1]
    g = n // k_bskh.shape[2]
    # the kernel wants as many kv heads as q heads
    k_bsnh, v_bsnh = (jnp.repeat(x, g, axis=2) if g > 1 else x for x in (k_bskh, v_bskh))
    segments = None
    if kv_lengths is not None:
        _, kv_keep_b11s = _length_masks(b, t, s, None, kv_lengths)
        segments = tpu.SegmentIds(q=jnp.ones((b, t), jnp.int32), kv=kv_keep_b11s[:, 0, 0, :].astype(jnp.int32))
    bias_bnts = None if bias is None else jnp.broadcast_to(bias, (b, n, t, s)).astype(q_btnh.dtype)
    out_bnth = tpu.flash_attention(
        *(x.transpose(0, 2, 1, 3) for x in (q_btnh, k_bsnh, v_bsnh)),
        ab=bias_bnts,
        segment_ids=segments,
        causal=causal,
        sm_scale=scale,
    )
    return out_bnth.transpose(0, 2, 1, 3)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    causal: bool = False,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
    scale: float | None = None,
    local_window: int | None = None,
    segment_ids: Array | None = None,
):
    """softmax(Q K^T / sqrt(d_k) + bias) V.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K (grouped-query attention); a
    wrong rank or a batch / head dim that does not match is a ValueError naming the argument.
    mask: boolean, broadcastable to [B, N, T, S], True = attend. bias: additive, broadcastable
    to [B, N, T, S]. causal: query i attends to keys j <= i (aligned at the start).
    q_lengths / kv_lengths [B]: queries / keys at index >= length are padding.
    local_window (with causal only): a causal band, query i attends to keys i - local_window < j <= i
    (cudnn gets it as `local_window_size=(local_window - 1, 0)`; tpu_flash has none). For a
    self-attention (T == S) with no dense mask, no bias and no weights asked for, the explicit and
    xla routes compute the band blockwise (`banded.banded_attention`): O(T * local_window) memory.
    segment_ids [B, T] (self-attention only): packed documents, 0 = padding; attention stays
    inside one (where a [T, S] mask is needed anyway, it is `segment_mask(segment_ids)`).
    The softmax runs in float32 for bfloat16/float16/float32 inputs (float64 for float64
    inputs, so gradient checks in float64 are exact); a query row with no key to attend
    to gives zeros, never NaN. `scale` replaces 1/sqrt(d_k) (T5 folds it into its weights).

    implementation: None for this explicit path; "xla" or "cudnn" route to
    `jax.nn.dot_product_attention` (cuDNN flash attention on GPU), "tpu_flash" to the Pallas
    TPU flash kernel. Causality and lengths reach them as such; mask and bias are passed in the
    shape given, never broadcast. The fused kernels have no dropout: dropout_rate > 0 with one
    of them (the xla route's band included) is an error. Attention weights exist only on the
    explicit path, which return_weights uses whatever the implementation. Returns out [B, T, N, H], or
    (out, weights [B, N, T, S]).
    """
    for name, x in (("q (query)", q), ("k (key)", k), ("v (value)", v)):
        _expect(
            chex.assert_rank,
            x,
            4,
            message=f"{name}: expected rank 4 [batch, length, heads, head_dim], got shape {tuple(x.shape)}",
        )
    _expect(
        chex.assert_equal_shape,
        [k, v],
        message=f"v (value): shape {tuple(v.shape)} differs from k (key)'s {tuple(k.shape)}",
    )
    _expect(
        chex.assert_equal_shape_prefix,
        [q, k],
        1,
        message=f"k (key): batch {k.shape[0]} differs from q (query)'s {q.shape[0]}",
    )
    _expect(
        chex.assert_axis_dimension,
        k,
        3,
        q.shape[3],
        message=f"k (key): head_dim {k.shape[3]} differs from q (query)'s {q.shape[3]}",
    )
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kv_heads})")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    scale = h**-0.5 if scale is None else scale
    local_window = local_window or None
    if local_window is not None and (not causal or local_window < 0):
        raise ValueError(
            f"local_window={local_window} needs causal=True and a positive window (the causal band "
            "i - local_window < j <= i)"
        )
    if segment_ids is not None:
        _expect(
            chex.assert_shape,
            segment_ids,
            (b, t),
            message=f"segment_ids: expected [batch, length] {(b, t)}, got shape {tuple(segment_ids.shape)}",
        )
        if s != t:
            raise ValueError(f"segment_ids: self-attention only (query length {t}, key length {s}); use segment_mask")
    if implementation is not None and not return_weights and dropout_rate > 0.0:
        raise ValueError(
            f"attention dropout ({dropout_rate}) needs the explicit path: the {implementation} "
            "kernel has none (use attention_impl explicit, or attention_dropout_rate 0)"
        )
    if (
        local_window
        and implementation in (None, "xla")
        and not return_weights
        and mask is None
        and bias is None
        and s == t
    ):
        return banded.banded_attention(
            q,
            k,
            v,
            window=local_window,
            scale=scale,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            segment_ids=segment_ids,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )
    if segment_ids is not None:
        mask = combine_masks(mask, segment_mask(segment_ids))
    if implementation is not None and not return_weights:
        return _fused(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            causal=causal,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            implementation=implementation,
            scale=scale,
            local_window=local_window,
        )

    mask = combine_masks(
        mask,
        causal_mask(t, s) if causal else None,
        band_mask(t, s, local_window) if local_window else None,
        *_length_masks(b, t, s, q_lengths, kv_lengths),
    )
    g = n // kv_heads
    q_btkgh = q.reshape(b, t, kv_heads, g, h)
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float32 at least; float64 stays float64
    logits_bkgts = jnp.einsum("BTKGH,BSKH->BKGTS", q_btkgh, k, preferred_element_type=softmax_dtype) * scale
    logits_bnts = logits_bkgts.reshape(b, n, t, s)
    if bias is not None:
        logits_bnts = logits_bnts + bias.astype(softmax_dtype)
    if mask is not None:
        logits_bnts = jnp.where(mask, logits_bnts, jnp.finfo(softmax_dtype).min)
    weights_bnts = jax.nn.softmax(logits_bnts, axis=-1)
    if mask is not None:
        weights_bnts = jnp.where(mask, weights_bnts, 0.0)  # all-masked rows: zeros rather than uniform
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs a dropout_rng")
        keep_bnts = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights_bnts.shape)
        dropped_bnts = jnp.where(keep_bnts, weights_bnts / (1.0 - dropout_rate), 0.0)
    else:
        dropped_bnts = weights_bnts
    out_btkgh = jnp.einsum("BKGTS,BSKH->BTKGH", dropped_bnts.reshape(b, kv_heads, g, t, s).astype(v.dtype), v)
    out_btnh = out_btkgh.reshape(b, t, n, h)
    return (out_btnh, weights_bnts) if return_weights else out_btnh


def _fused(
    q_btnh, k_bskh, v_bskh, *, mask, bias, causal, q_lengths, kv_lengths, implementation, scale, local_window=None
):
    b, t, _, _ = q_btnh.shape
    s = k_bskh.shape[1]
    mask = _as_4d(mask, bool)
    int32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    if implementation == "tpu_flash":
        if q_lengths is not None:
            raise ValueError("attention_impl tpu_flash takes key lengths only")
        if local_window is not None:
            raise ValueError("attention_impl tpu_flash takes no local window: use attention_impl xla or cudnn")
        out_btnh = _tpu_flash(
            q_btnh, k_bskh, v_bskh, bias=_as_4d(bias), mask=mask, causal=causal, kv_lengths=kv_lengths, scale=scale
        )
    else:
        window = None if local_window is None else (local_window - 1, 0)  # keys i - (w - 1) .. i
        out_btnh = jax.nn.dot_product_attention(
            q_btnh,
            k_bskh,
            v_bskh,
            bias=_as_4d(bias, q_btnh.dtype),
            mask=mask,
            scale=scale,
            is_causal=causal,
            query_seq_lengths=int32(q_lengths),
            key_value_seq_lengths=int32(kv_lengths),
            implementation=implementation,
            local_window_size=window,
        )
    # A query row with no key to attend to is zeros here as on the explicit path (the kernels give
    # an average or padding garbage): rows of padded queries, of empty sequences, of masked-out rows.
    q_keep_b1t1, kv_keep_b11s = _length_masks(b, t, s, q_lengths, kv_lengths)
    rows_bnt = None  # [B|1, N|1, T]
    if mask is not None:  # only where a dense mask exists anyway
        band_11ts = band_mask(t, s, local_window) if local_window else None
        rows_bnt = jnp.any(combine_masks(mask, causal_mask(t, s) if causal else None, band_11ts, kv_keep_b11s), axis=-1)
    elif kv_lengths is not None and local_window:  # a band can leave a padded query no key
        rows_bnt = _band_rows(t, kv_lengths, local_window)
    elif kv_lengths is not None:
        rows_bnt = (jnp.asarray(kv_lengths) > 0)[:, None, None]
    if q_keep_b1t1 is not None:
        rows_bnt = combine_masks(rows_bnt, q_keep_b1t1[..., 0])
    if rows_bnt is not None:
        out_btnh = out_btnh * jnp.swapaxes(rows_bnt, 1, 2)[..., None].astype(out_btnh.dtype)  # [B|1, T, N|1, 1]
    return out_btnh


# ----------------------------------------------------------------------------- multi-head
class AttentionOutput(NamedTuple):
    out: Array  # [B, T, D]
    weights: Array | None = None  # [B, N, T, S] when asked for
    kv_cache: dict | None = None  # updated cache when one was given


def project(params: dict, x: Array, spec: str) -> Array:
    """A dense projection with an optional bias: params {'kernel', 'bias'?}."""
    y = jnp.einsum(spec, x, params["kernel"].astype(x.dtype))
    if params.get("bias") is not None:
        y = y + params["bias"].astype(x.dtype)
    return y


def update_kv_cache(cache: dict, k: Array, v: Array) -> tuple[dict, Array, Array]:
    """Write k, v [B, T, K, H] into cache {'key', 'value': [B, S, K, H], 'index': []} at its index."""
    i = cache["index"]
    key_bskh = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype), i, axis=1)
    value_bskh = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype), i, axis=1)
    return {"key": key_bskh, "value": value_bskh, "index": i + k.shape[1]}, key_bskh, value_bskh


def init_kv_cache(batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any = jnp.float32) -> dict:
    zeros_bskh = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
    return {"key": zeros_bskh, "value": zeros_bskh, "index": jnp.zeros((), jnp.int32)}


def multi_head_attention(
    params: dict,
    inputs_q: Array,
    inputs_kv: Array | None = None,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    mask: Array | None = None,
    bias: Array | None = None,
    causal: bool = False,
    kv_lengths: Array | None = None,
    rotary: Any = None,
    kv_cache: dict | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
    local_window: int | None = None,
    constrain_kv: Any = None,
    segment_ids: Array | None = None,
) -> AttentionOutput:
    """Multi-head attention over an explicit params pytree.

    params: {'query': {'kernel' [D, N, H], 'bias'? [N, H]}, 'key' and 'value': [D, K, H],
    'out': {'kernel' [N, H, D], 'bias'? [D]}}. inputs_q [B, T, D]; inputs_kv [B, S, D]
    (defaults to inputs_q: self-attention); a wrong rank or batch is a ValueError naming the
    argument. rotary: a function (x [B, T, N, H], which) -> x applied to queries and keys ('q' or
    'k'). kv_cache: {'key', 'value', 'index'}; the new keys and values are written at `index` and
    queries attend to the whole cache (the caller's mask hides slots not yet written).
    num_heads / num_kv_heads, when given, are checked against the kernels' shapes.
    local_window: a causal band (see `dot_product_attention`). Over a KV cache, a banded layer's
    cache is a ring (`banded.ring_attention_inputs`: slot = position mod its length, any length);
    its queries attend to [the ring ; the new keys] under the band at their positions (blockwise
    when they outnumber the ring's slots), and `mask`'s last axis is read as the keys' positions (a
    key mask over the whole sequence, [B|1, 1, 1|T, P]).
    segment_ids [B, T]: packed documents of a self-attention (see `dot_product_attention`).
    constrain_kv: a function k or v [B, S, K, H] -> the same, applied after rotary (layers.py pins their
    sharding with it: whole along S, so sequence parallelism all-gathers K and V, not Q).
    """
    _expect(
        chex.assert_rank,
        inputs_q,
        3,
        message=f"inputs_q: expected rank 3 [batch, length, model_dim], got shape {tuple(inputs_q.shape)}",
    )
    if inputs_kv is not None:
        _expect(
            chex.assert_rank,
            inputs_kv,
            3,
            message=f"inputs_kv: expected rank 3 [batch, length, model_dim], got shape {tuple(inputs_kv.shape)}",
        )
        _expect(
            chex.assert_equal_shape_prefix,
            [inputs_kv, inputs_q],
            1,
            message=f"inputs_kv: batch {inputs_kv.shape[0]} differs from inputs_q's {inputs_q.shape[0]}",
        )
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    q_btnh = project(params["query"], inputs_q, "BTD,DNH->BTNH")
    k_bskh = project(params["key"], inputs_kv, "BSD,DKH->BSKH")
    v_bskh = project(params["value"], inputs_kv, "BSD,DKH->BSKH")
    for name, want, got in (("num_heads", num_heads, q_btnh.shape[2]), ("num_kv_heads", num_kv_heads, k_bskh.shape[2])):
        if want is not None and want != got:
            raise ValueError(f"{name}={want} but the kernels hold {got} heads")
    if rotary is not None:
        q_btnh, k_bskh = rotary(q_btnh, "q"), rotary(k_bskh, "k")
    if constrain_kv is not None:
        k_bskh, v_bskh = constrain_kv(k_bskh), constrain_kv(v_bskh)
    if kv_cache is not None and local_window:
        if not causal:
            raise ValueError(
                f"local_window={local_window} needs causal=True (the causal band i - local_window < j <= i)"
            )
        if bias is not None or segment_ids is not None or kv_lengths is not None:
            raise ValueError(
                "a ring KV cache (a banded layer) takes no bias, segment_ids or kv_lengths: give a key mask"
            )
        t = q_btnh.shape[1]
        kv_cache, k_bskh, v_bskh, k_pos_s = banded.ring_attention_inputs(kv_cache, k_bskh, v_bskh)
        mask = _as_4d(mask)
        if mask is not None:  # its last axis is the keys' position
            mask = jnp.take(mask, jnp.clip(k_pos_s, 0, mask.shape[-1] - 1), axis=-1)
        blockwise = implementation in (None, "xla") and not return_weights and not dropout_rate
        if t > k_bskh.shape[1] - t and blockwise and (mask is None or mask.shape[1:3] == (1, 1)):
            # a prompt longer than the ring, under a key mask at most: the band blockwise
            kv_keep_bs = (k_pos_s >= 0)[None] & (True if mask is None else mask[:, 0, 0].astype(bool))
            scale = q_btnh.shape[-1] ** -0.5 if scale is None else scale
            out_btnh = banded.banded_attention(
                q_btnh, k_bskh, v_bskh, window=local_window, scale=scale, kv_mask=kv_keep_bs
            )
            return AttentionOutput(project(params["out"], out_btnh, "BTNH,NHD->BTD"), None, kv_cache)
        q_pos_t1 = k_pos_s[-t:, None]
        band_ts = (k_pos_s >= 0) & (k_pos_s <= q_pos_t1) & (k_pos_s > q_pos_t1 - local_window)
        mask, causal, local_window = combine_masks(mask, band_ts[None, None]), False, None
    elif kv_cache is not None:  # from here on S is the cache's length
        if segment_ids is not None:  # the cache holds exactly this step's keys (T == S)
            mask, segment_ids = combine_masks(mask, segment_mask(segment_ids)), None
        index = kv_cache["index"]
        kv_cache, k_bskh, v_bskh = update_kv_cache(kv_cache, k_bskh, v_bskh)
        if causal:  # the queries sit at cache slots index .. index + t - 1, not at the start
            mask = combine_masks(mask, causal_mask(q_btnh.shape[1], k_bskh.shape[1], offset=index))
            causal = False
    result = dot_product_attention(
        q_btnh,
        k_bskh,
        v_bskh,
        mask=mask,
        bias=bias,
        causal=causal,
        kv_lengths=kv_lengths,
        dropout_rate=dropout_rate,
        local_window=local_window,
        dropout_rng=dropout_rng,
        implementation=implementation,
        return_weights=return_weights,
        scale=scale,
        segment_ids=segment_ids,
    )
    out_btnh, weights_bnts = result if return_weights else (result, None)
    return AttentionOutput(project(params["out"], out_btnh, "BTNH,NHD->BTD"), weights_bnts, kv_cache)
