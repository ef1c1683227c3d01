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
    k_btkh: Array,
    v_btkh: Array,
    *,
    window: int,
    scale: float,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    segment_ids: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Self-attention in the causal band i - window < j <= i: q [B, T, N, H], k, v [B, T, K, H]
    (N a multiple of K). q_lengths / kv_lengths [B]: queries / keys at index >= length are padding;
    segment_ids [B, T]: packed documents (0 = padding), attention stays inside one. Softmax in
    float32 at least; a query with no key gives zeros. Dropout drops band weights (rate, rng).
    Returns out [B, T, N, H]; memory O(T * window)."""
    b, t, n, h = q_btnh.shape
    kv_heads = k_btkh.shape[2]
    g, w = n // kv_heads, min(window, t)
    c = -(-t // w)
    q_bcwkgh = _blocks(q_btnh, c, w)[0].reshape(b, c, w, kv_heads, g, h)
    k_bcskh, v_bcskh = (_blocks(x, c, w)[1] for x in (k_btkh, v_btkh))
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
    out_bcwkgh = jnp.einsum("BCKGWS,BCSKH->BCWKGH", weights.astype(v_btkh.dtype), v_bcskh)
    return out_bcwkgh.reshape(b, c * w, n, h)[:, :t]


# ----------------------------------------------------------------------------- the ring KV cache
def ring_positions(index: Array, slots: int) -> Array:
    """[slots]: the position each ring slot holds once `index` positions were written (slot j: the
    newest p < index with p = j mod slots); negative where nothing was written yet."""
    return index - 1 - (index - 1 - jnp.arange(slots)) % slots


def ring_attention_inputs(cache: dict, k_btkh: Array, v_btkh: Array, window: int):
    """A banded layer's step over its ring cache {'key', 'value': [B, R, K, H], 'index': []} with new
    keys and values [B, T, K, H] (T may exceed R: a prompt). The queries attend to [the ring as it
    was ; the new keys], R + T keys at known positions. Returns (the updated cache, keys and values
    [B, R + T, K, H], the keys' positions [R + T], the band mask [1, 1, T, R + T]); the newest
    min(T, R) keys overwrite their slots."""
    index, (r, t) = cache["index"], (cache["key"].shape[1], k_btkh.shape[1])
    k_pos_s = jnp.concatenate([ring_positions(index, r), index + jnp.arange(t)])
    q_pos_t1 = (index + jnp.arange(t))[:, None]
    band_ts = (k_pos_s[None, :] >= 0) & (k_pos_s[None, :] <= q_pos_t1) & (k_pos_s[None, :] > q_pos_t1 - window)
    keys_bskh, values_bskh = (
        jnp.concatenate([cache[name], x.astype(cache[name].dtype)], axis=1)
        for name, x in (("key", k_btkh), ("value", v_btkh))
    )
    m = min(t, r)
    slots = (index + t - m + jnp.arange(m)) % r
    new = {
        name: cache[name].at[:, slots].set(x[:, t - m :].astype(cache[name].dtype))
        for name, x in (("key", k_btkh), ("value", v_btkh))
    }
    return {**new, "index": index + t}, keys_bskh, values_bskh, k_pos_s, band_ts[None, None]
