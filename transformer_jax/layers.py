"""Flax NNX modules around the pure attention functions: one block design for every family.

Every parameter carries logical axis names in its `axes` metadata (`vocab`, `embed`, `heads`,
`kv`, `mlp`, `norm`, `relpos`); `sharding.py` maps them to mesh axes with one rules table.
Stacked (scanned) layers add a leading `layers` axis.

Names carry shapes, einsum strings too (`x_btd`, 'BTD,DF->BTF'); the letters, as in `attention.py`:

    B  batch          T  query length      S  key/value length     D  model width
    N  query heads    K  key/value heads   H  head dim             F  mlp hidden
    V  vocab          L  layers (a scanned stack)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import attention as attn
from transformer_jax import sharding as sh
from transformer_jax.config import ModelConfig
from transformer_jax.losses import MASKED_LOGIT

Array = jax.Array


def param(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], init: str, dtype, std: float = 0.02
) -> nnx.Param:
    if init == "normal":
        assert rngs is not None, "a normal init draws from rngs"
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = jnp.ones(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Dense(nnx.Module):
    """kernel of any shape (input dims first) plus an optional bias over the output dims."""

    def __init__(self, shape, axes, *, use_bias: bool, bias_ndim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kernel = param(rngs, tuple(shape), tuple(axes), "normal", cfg.param_dtype, cfg.init_std)
        self.bias = (
            param(rngs, tuple(shape[-bias_ndim:]), tuple(axes[-bias_ndim:]), "zeros", cfg.param_dtype)
            if use_bias
            else None
        )

    def params(self) -> dict:
        return {"kernel": self.kernel[...], "bias": None if self.bias is None else self.bias[...]}

    def __call__(self, x: Array, spec: str) -> Array:
        return attn.project(self.params(), x, spec)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, axes, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embedding = param(rngs, (num, dim), axes, "normal", cfg.param_dtype, cfg.init_std)

    def __call__(self, ids: Array, dtype) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)

    def attend(self, x_btd: Array) -> Array:
        """Tied output projection: [B, T, D] -> [B, T, V]."""
        return tied_logits(x_btd, self.embedding[...].astype(x_btd.dtype))


@jax.custom_vjp
def tied_logits(x_btd: Array, embedding_vd: Array) -> Array:
    """x @ embedding^T, whose embedding gradient is computed as (x^T g)^T: the transposes then
    move [T, D] and [D, V] arrays, not the [T, V] logits' gradient (XLA's own order on CPU)."""
    return jnp.einsum("BTD,VD->BTV", x_btd, embedding_vd)


def _tied_logits_bwd(residuals, g_btv):
    x_btd, embedding_vd = residuals
    g_btv = g_btv.astype(x_btd.dtype)
    return (
        jnp.einsum("BTV,VD->BTD", g_btv, embedding_vd),
        jnp.einsum("BTD,BTV->DV", x_btd, g_btv).T.astype(embedding_vd.dtype),
    )


tied_logits.defvjp(lambda x, e: (tied_logits(x, e), (x, e)), _tied_logits_bwd)


TOKEN_LOGIT_AXES = ("batch", "length", "vocab")


def mask_padded_vocab(logits: Array, vocab_size: int, axes: tuple[str | None, ...] | None = None) -> Array:
    """Token logits [B, T, V] (V the padded vocab) as float32 with the padded ids (>= vocab_size) at
    `losses.MASKED_LOGIT`, so they never win an argmax, a sample or a softmax. The padded last
    dimension stays (a tensor-parallel split of `vocab` stays even); every token head goes through here,
    and is pinned here to `axes`: split over vocab under tensor parallelism, so the loss reduces over
    the split and no device holds the whole [B, T, V] (None: TOKEN_LOGIT_AXES)."""
    logits = sh.constrain(logits, TOKEN_LOGIT_AXES if axes is None else axes).astype(jnp.float32)
    if logits.shape[-1] == vocab_size:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, jnp.float32(MASKED_LOGIT))


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only, T5); statistics in float32."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = param(rngs, (dim,), ("norm",), "ones", cfg.param_dtype)
        self.bias = param(rngs, (dim,), ("norm",), "zeros", cfg.param_dtype) if cfg.norm == "layernorm" else None

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


# ----------------------------------------------------------------------------- positions
def sinusoidal_positions(positions: Array, dim: int) -> Array:
    """The 2017 Transformer's table, evaluated at integer positions [B, T] -> [B, T, dim]."""
    half = dim // 2
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(half) / max(half - 1, 1))  # [dim/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, dim/2]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rotary(positions: Array, head_dim: int, base: float) -> Callable[[Array, str], Array]:
    """RoPE (rotate-half form) at positions [B, T]; returns x [B, T, N, H] -> rotated x (or
    [B, T, K, H]: the keys)."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [H/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]

    def apply(x_btnh: Array, which: str) -> Array:
        x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)

    return apply


def relative_buckets(relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """T5's bucketing of key_pos - query_pos: exact for small distances, logarithmic beyond."""
    buckets: Array | int = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nnx.Module):
    """T5's learned per-head bias over relative position buckets, shared by all layers of a stack."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional, self.cfg = bidirectional, cfg
        self.embedding = param(
            rngs, (cfg.relative_buckets, cfg.num_heads), ("relpos", "heads"), "normal", cfg.param_dtype, cfg.init_std
        )

    def __call__(self, q_positions: Array, k_positions: Array) -> Array:
        """q_positions [T], k_positions [S] -> bias [1, N, T, S]."""
        buckets_ts = relative_buckets(
            k_positions[None, :] - q_positions[:, None],
            bidirectional=self.bidirectional,
            num_buckets=self.cfg.relative_buckets,
            max_distance=self.cfg.relative_max_distance,
        )
        bias_tsn = jnp.take(self.embedding[...], buckets_ts, axis=0)
        return jnp.einsum("TSN->NTS", bias_tsn)[None].astype(jnp.float32)


# ----------------------------------------------------------------------------- attention, mlp, block
class MultiHeadAttention(nnx.Module):
    """W_Q [D, N, H], W_K, W_V [D, K, H] and W_O [N, H, D] around `attention.multi_head_attention`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.model_dim, cfg.num_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        dense = lambda shape, axes, bias_ndim: Dense(
            shape, axes, use_bias=cfg.use_bias, bias_ndim=bias_ndim, cfg=cfg, rngs=rngs
        )
        self.query = dense((d, n, h), ("embed", "heads", "kv"), 2)
        self.key = dense((d, k, h), ("embed", "heads", "kv"), 2)
        self.value = dense((d, k, h), ("embed", "heads", "kv"), 2)
        self.out = dense((n, h, d), ("heads", "kv", "embed"), 1)

    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        *,
        mask: attn.Mask | None = None,
        bias=None,
        rotary_fn=None,
        kv_cache=None,
        dropout_rng=None,
        return_weights=False,
    ) -> attn.AttentionOutput:
        """x [B, T, D]; context [B, S, D] for cross-attention (None: self-attention)."""
        cfg = self.cfg
        mask = attn.Mask() if mask is None else mask
        params = {name: getattr(self, name).params() for name in ("query", "key", "value", "out")}
        rate = cfg.attention_dropout_rate if dropout_rng is not None else 0.0
        impl = None if cfg.attention_impl == "explicit" else cfg.attention_impl
        return attn.multi_head_attention(
            params,
            x,
            context,
            mask=mask.dense,
            causal=mask.causal,
            kv_lengths=mask.kv_lengths,
            bias=bias,
            rotary=rotary_fn,
            kv_cache=kv_cache,
            scale=None if cfg.scale_attention else 1.0,
            dropout_rate=rate,
            dropout_rng=dropout_rng,
            implementation=impl,
            return_weights=return_weights,
            local_window=mask.local_window,
            segment_ids=mask.segment_ids,
            constrain_kv=lambda x_bskh: sh.constrain(x_bskh, ("batch", "kv_length", "heads", "kv")),
        )


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "gated_gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gated_silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """wi -> activation -> wo; gated variants multiply by a second projection (T5 v1.1 wi_0 * wi_1)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.activation = cfg.activation
        dense = lambda shape, axes: Dense(shape, axes, use_bias=cfg.use_bias, bias_ndim=1, cfg=cfg, rngs=rngs)
        self.wi = dense((cfg.model_dim, cfg.mlp_dim), ("embed", "mlp"))
        self.wi_gate = (
            dense((cfg.model_dim, cfg.mlp_dim), ("embed", "mlp")) if cfg.activation.startswith("gated") else None
        )
        self.wo = dense((cfg.mlp_dim, cfg.model_dim), ("mlp", "embed"))

    def __call__(self, x_btd: Array, dropout_rate: float = 0.0, dropout_rng=None) -> Array:
        hidden_btf = ACTIVATIONS[self.activation](
            sh.constrain(self.wi(x_btd, "BTD,DF->BTF"), ("batch", "length", "mlp"))
        )
        if self.wi_gate is not None:
            hidden_btf = hidden_btf * self.wi_gate(x_btd, "BTD,DF->BTF")
        return self.wo(dropout(hidden_btf, dropout_rate, dropout_rng), "BTF,FD->BTD")


class Block(nnx.Module):
    """Self-attention, optional cross-attention, MLP; each a residual branch, pre- or post-norm."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention = MultiHeadAttention(cfg, rngs)
        self.attention_norm = Norm(cfg.model_dim, cfg, rngs)
        self.cross_attention = MultiHeadAttention(cfg, rngs) if cross_attention else None
        self.cross_attention_norm = Norm(cfg.model_dim, cfg, rngs) if cross_attention else None
        self.mlp = MLP(cfg, rngs)
        self.mlp_norm = Norm(cfg.model_dim, cfg, rngs)

    def _residual(self, x_btd, norm, branch, rng):
        if self.cfg.norm_position == "pre":
            return x_btd + dropout(branch(norm(x_btd)), self.cfg.dropout_rate, rng)
        return norm(x_btd + dropout(branch(x_btd), self.cfg.dropout_rate, rng))

    def __call__(
        self,
        x_btd: Array,
        *,
        mask=None,
        bias=None,
        rotary_fn=None,
        kv_cache=None,
        context=None,
        context_mask=None,
        context_bias=None,
        dropout_rng=None,
        return_weights=False,
    ):
        """x_btd [B, T, D]; context [B, S, D] (cross-attention). Returns (x_btd, the updated
        self-attention cache, {'self', 'cross'?: weights [B, N, T, S]} or None)."""
        rngs = list(jax.random.split(dropout_rng, 6)) if dropout_rng is not None else [None] * 6
        results = {}

        def self_attention(h_btd):
            r = self.attention(
                h_btd,
                mask=mask,
                bias=bias,
                rotary_fn=rotary_fn,
                kv_cache=kv_cache,
                dropout_rng=rngs[0],
                return_weights=return_weights,
            )
            results["self"] = r
            return r.out

        x_btd = self._residual(x_btd, self.attention_norm, self_attention, rngs[1])

        if self.cross_attention is not None:

            def cross_attention(h_btd):
                r = self.cross_attention(
                    h_btd,
                    context,
                    mask=context_mask,
                    bias=context_bias,
                    dropout_rng=rngs[2],
                    return_weights=return_weights,
                )
                results["cross"] = r
                return r.out

            x_btd = self._residual(x_btd, self.cross_attention_norm, cross_attention, rngs[3])

        x_btd = self._residual(
            x_btd, self.mlp_norm, lambda h_btd: self.mlp(h_btd, self.cfg.dropout_rate, rngs[4]), rngs[5]
        )
        weights = {k: r.weights for k, r in results.items()} if return_weights else None
        return x_btd, results["self"].kv_cache, weights
