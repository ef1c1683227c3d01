"""Locally banded causal attention in O(T * w) memory, and the ring KV cache of a banded layer.

Query i attends to keys i - w < j <= i. Blockwise: the queries are cut into blocks of W = min(w, T)
(T padded up to a multiple of W); block c attends to its own keys and the block before it,
[2W] keys, so scores are [B, C, K, G, W, 2W] and no [T, S] array exists. Letters as in
`attention.py`, plus C the number of blocks and W the block length.

A banded layer's KV cache is a ring of r slots: position p lives in slot p mod r, and slot j holds
the newest position p < index with p = j (mod r), so `index` alone says where everything is.

Pure functions of JAX arrays; nothing here imports the project.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _blocks(x: Array, c: int, w: int) -> tuple[Array, Array]:
    """x [B, T, ...] zero-padded to C * W -> (its blocks [B, C, W, ...], each block with the one
    before it [B, C, 2W, ...]; block 0's predecessor is zeros)."""
    pad = [(0, 0), (0, c * w - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    blocks = jnp.pad(x, pad).reshape(x.shape[0], c, w, *x.shape[2:])
    before = jnp.pad(blocks[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (blocks.ndim - 2))
    return blocks, jnp.concatenate([before, blocks], axis=2)


def banded_attention(
    q_btnh: Array,
    k_bskh: Array,
    v_bskh: Array,
    *,
    window: int,
    scale: float,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    segment_ids: Array | None = None,
    kv_mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Attention in the causal band i - window < j <= i: q [B, T, N, H], k, v [B, S, K, H] (N a
    multiple of K, S >= T), the queries being the last T of the S positions (S = T: a
    self-attention). q_lengths / kv_lengths [B]: queries / keys at index >= length are padding;
    segment_ids [B, S]: packed documents (0 = padding), attention stays inside one; kv_mask
    [B|1, S]: the keys that may be attended. Softmax in float32 at least; a query with no key gives
    zeros. Dropout drops band weights (rate, rng). Returns out [B, T, N, H]; memory O(S * window)."""
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    b, _, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    g, w = n // kv_heads, min(window, s)
    c = -(-s // w)
    q_bsnh = jnp.pad(q_btnh, [(0, 0), (s - t, 0), (0, 0), (0, 0)])
    q_bcwkgh = _blocks(q_bsnh, c, w)[0].reshape(b, c, w, kv_heads, g, h)
    k_bcskh, v_bcskh = (_blocks(x, c, w)[1] for x in (k_bskh, v_bskh))
    # positions: query a of block c sits at c * W + a, key s of its keys at c * W - W + s
    q_pos_cw = jnp.arange(c * w).reshape(c, w)
    k_pos_cs = q_pos_cw[:, :1] - w + jnp.arange(2 * w)[None, :]
    q_pos, k_pos = q_pos_cw[None, :, :, None], k_pos_cs[None, :, None, :]  # [1, C, W, 1], [1, C, 1, 2W]
    keep_bcws = (k_pos >= 0) & (k_pos <= q_pos) & (k_pos > q_pos - window)
    if kv_lengths is not None:
        keep_bcws = keep_bcws & (k_pos < jnp.reshape(kv_lengths, (b, 1, 1, 1)))
    if q_lengths is not None:
        keep_bcws = keep_bcws & (q_pos < jnp.reshape(q_lengths, (b, 1, 1, 1)))
    if segment_ids is not None:
        q_seg_bcw, k_seg_bcs = _blocks(segment_ids, c, w)
        keep_bcws = keep_bcws & (q_seg_bcw[..., :, None] == k_seg_bcs[..., None, :]) & (k_seg_bcs[..., None, :] != 0)
    if kv_mask is not None:
        keep_bcws = keep_bcws & _blocks(kv_mask, c, w)[1][:, :, None, :]
    keep = keep_bcws[:, :, None, None]  # [B|1, C, 1, 1, W, 2W]
    softmax_dtype = jnp.promote_types(q_btnh.dtype, jnp.float32)
    logits = jnp.einsum("BCWKGH,BCSKH->BCKGWS", q_bcwkgh, k_bcskh, preferred_element_type=softmax_dtype) * scale
    logits = jnp.where(keep, logits, jnp.finfo(softmax_dtype).min)
    weights = jnp.where(keep, jax.nn.softmax(logits, axis=-1), 0.0)  # [B, C, K, G, W, 2W]
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs a dropout_rng")
        kept = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(kept, weights / (1.0 - dropout_rate), 0.0)
    out_bcwkgh = jnp.einsum("BCKGWS,BCSKH->BCWKGH", weights.astype(v_bskh.dtype), v_bcskh)
    return out_bcwkgh.reshape(b, c * w, n, h)[:, s - t : s]


# ----------------------------------------------------------------------------- the ring KV cache
def ring_attention_inputs(cache: dict, k_btkh: Array, v_btkh: Array) -> tuple[dict, Array, Array, Array]:
    """A banded layer's step over its ring cache {'key', 'value': [B, R, K, H], 'index': []} with new
    keys and values [B, T, K, H] (T may exceed R: a prompt). The queries attend to [the ring as it
    was ; the new keys]: R + T keys in position order, index - R .. index + T - 1 (a negative one
    was never written). Returns (the updated cache, those keys and values [B, R + T, K, H], their
    positions [R + T]); the newest min(T, R) keys overwrite their slots."""
    index, (r, t) = cache["index"], (cache["key"].shape[1], k_btkh.shape[1])
    ordered = (index + jnp.arange(r)) % r  # the slot of position index - R + i
    keys_bskh, values_bskh = (
        jnp.concatenate([jnp.take(cache[name], ordered, axis=1), x.astype(cache[name].dtype)], axis=1)
        for name, x in (("key", k_btkh), ("value", v_btkh))
    )
    m = min(t, r)
    slots = (index + t - m + jnp.arange(m)) % r
    new = {
        name: cache[name].at[:, slots].set(x[:, t - m :].astype(cache[name].dtype))
        for name, x in (("key", k_btkh), ("value", v_btkh))
    }
    return {**new, "index": index + t}, keys_bskh, values_bskh, index - r + jnp.arange(r + t)
