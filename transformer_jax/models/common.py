"""What the three families share: embeddings, a stack of blocks (looped or scanned), the output.

Array names and shape comments use the dimension letters of `attention.py` (B batch, T length,
S key length, D model width, N heads, K kv heads, H head dim, V vocab, L layers)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from transformer_jax import attention as attn
from transformer_jax import sharding as sh
from transformer_jax.config import ModelConfig
from transformer_jax.layers import Block, Embed, Norm, RelativePositionBias, dropout, rotary, sinusoidal_positions

Array = jax.Array

RESIDUAL_AXES = ("batch", "length", "act_embed")  # the residual stream [B, T, D] at every layer boundary

_policies = jax.checkpoint_policies
# model.remat: what each layer keeps for the backward pass (the rest is recomputed).
#   none           everything (no rematerialisation)
#   dots_saveable  the weight matmuls' outputs; not the batched QK^T / PV products nor elementwise ops
#   full           nothing but the layer's input
#   offload        nothing but the layer's input, and that in host memory (pinned_host)
REMAT_POLICIES = {
    "dots_saveable": _policies.dots_with_no_batch_dims_saveable,
    "full": _policies.nothing_saveable,
    "offload": _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=["layer_input"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def materialized_gradient(x: Array) -> Array:
    """Identity whose gradient is computed once and stored, on CPU. There XLA fuses the residual
    stream's gradient (a sum over every later layer) into each consumer, transposes included,
    and recomputes it in each: quadratic in depth, 13% of a 6-layer step. Elsewhere: x."""
    return _stored_gradient(x) if jax.default_backend() == "cpu" else x


@jax.custom_vjp
def _stored_gradient(x: Array) -> Array:
    return x


def _store(_, g):
    # XLA:CPU drops optimization barriers before fusion, but a conditional's operand is always
    # materialised. The branches differ only when the gradient is NaN already: nothing changes.
    first = g[(0,) * g.ndim]
    return (jax.lax.cond(first == first, lambda g: g, lambda g: g + jnp.nan, g),)


_stored_gradient.defvjp(lambda x: (x, None), _store)


class ModelOutput(NamedTuple):
    logits: Array | None = None  # token logits [B, T, V] (LM / MLM; float32, V padded to
    # padded_vocab_size, padded ids masked), or label logits [B, n]
    hidden_states: Array | None = None  # last layer [B, T, D] (decoder side for encoder-decoder)
    pooled: Array | None = None  # BERT pooler output [B, D]
    heads: dict | None = None  # other heads: {'nsp': [B, 2], 'classification': [B, n], ...}
    attention_weights: dict | None = None  # {'encoder'|'decoder': {'self'|'cross': [L, B, N, T, S]}}
    cache: dict | None = None  # updated KV cache when one was given
    encoder_hidden_states: Array | None = None  # encoder-decoder only


def dtype_of(name: str):
    return jnp.dtype(name)


class Embedder(nnx.Module):
    """Token embeddings plus learned / sinusoidal positions and token types; optional norm (BERT)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token = Embed(cfg.padded_vocab_size, cfg.model_dim, ("vocab", "embed"), cfg, rngs)
        self.position = (
            Embed(cfg.max_len, cfg.model_dim, (None, "embed"), cfg, rngs) if cfg.position == "learned" else None
        )
        self.token_type = (
            Embed(cfg.type_vocab_size, cfg.model_dim, (None, "embed"), cfg, rngs) if cfg.type_vocab_size else None
        )
        self.norm = Norm(cfg.model_dim, cfg, rngs) if cfg.embed_norm else None

    def __call__(self, ids: Array, positions: Array, token_type_ids: Array | None = None, dropout_rng=None) -> Array:
        """ids, positions, token_type_ids [B, T] -> x [B, T, D]."""
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        x_btd = self.token(ids, dtype)
        if cfg.embed_scale:
            x_btd = x_btd * jnp.asarray(cfg.model_dim**0.5, dtype)
        if self.position is not None:
            x_btd = x_btd + self.position(positions, dtype)
        elif cfg.position == "sinusoidal":
            x_btd = x_btd + sinusoidal_positions(positions, cfg.model_dim).astype(dtype)
        if self.token_type is not None:
            x_btd = x_btd + self.token_type(jnp.zeros_like(ids) if token_type_ids is None else token_type_ids, dtype)
        if self.norm is not None:
            x_btd = self.norm(x_btd)
        return dropout(x_btd, cfg.dropout_rate, dropout_rng)


def _stack_blocks(cfg: ModelConfig, num_layers: int, cross_attention: bool, rngs: nnx.Rngs):
    if not cfg.scan_layers:
        return nnx.List([Block(cfg, cross_attention=cross_attention, rngs=rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(layer_rngs):
        return Block(cfg, cross_attention=cross_attention, rngs=layer_rngs)

    return make(rngs)


class Stack(nnx.Module):
    """num_layers blocks; with cfg.scan_layers their parameters are stacked on a leading axis and
    run under `jax.lax.scan` (compile time flat in depth); cfg.remat rematerialises each block.
    A causal stack with a band (cfg.local_window_size) gives layer i the window cfg.layer_window(i);
    with local_layers alternate the scan steps over (dense, banded) pairs of the same stacked params."""

    def __init__(self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross_attention: bool, rngs: nnx.Rngs):
        self.cfg, self.num_layers, self.causal = cfg, num_layers, causal
        self.relative_bias = (
            RelativePositionBias(cfg, bidirectional=not causal, rngs=rngs) if cfg.position == "relative" else None
        )
        self.layers = _stack_blocks(cfg, num_layers, cross_attention, rngs)
        self.final_norm = Norm(cfg.model_dim, cfg, rngs) if cfg.norm_position == "pre" else None

    def __call__(
        self,
        x_btd: Array,
        *,
        positions: Array,
        mask: attn.Mask,
        cache: dict | None = None,
        context: Array | None = None,
        context_mask: attn.Mask | None = None,
        dropout_rng=None,
        return_weights: bool = False,
    ):
        """x_btd [B, T, D], positions [B, T], context [B, S, D] (cross-attention), cache {'key',
        'value': [L, B, S, K, H], 'index': [L]} (`Model.init_cache`: banded layers keep rings, with
        local_layers alternate under 'local'). Returns (x_btd, the updated cache, attention
        weights {'self', 'cross'?: [L, B, N, T, S]} or None)."""
        cfg = self.cfg
        t = x_btd.shape[1]
        offset = 0 if cache is None else cache["index"][0]
        kv_len = t if cache is None else cache["key"].shape[2]
        bias_1nts = None
        if self.relative_bias is not None:
            bias_1nts = self.relative_bias(offset + jnp.arange(t), jnp.arange(kv_len))
        rotary_fn = rotary(positions, cfg.resolved_head_dim, cfg.rotary_base) if cfg.position == "rotary" else None
        keys = None if dropout_rng is None else jax.random.split(dropout_rng, self.num_layers)

        def layer_fn(window: int):
            """One block, under the self-attention mask of a layer with this band (0 = dense)."""
            layer_mask = mask._replace(local_window=window) if window else mask

            def run(graphdef, state, h_btd, layer_cache, key):
                h_btd = checkpoint_name(sh.constrain(materialized_gradient(h_btd), RESIDUAL_AXES), "layer_input")
                return nnx.merge(graphdef, state)(
                    h_btd,
                    mask=layer_mask,
                    bias=bias_1nts,
                    rotary_fn=rotary_fn,
                    kv_cache=layer_cache,
                    context=context,
                    context_mask=context_mask,
                    dropout_rng=key,
                    return_weights=return_weights,
                )

            if cfg.remat != "none":
                run = jax.checkpoint(
                    run, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,), prevent_cse=not cfg.scan_layers
                )
            return run

        # the layers' bands repeat with this period: 2 for alternate (dense, banded) pairs, else 1
        period = 2 if self.causal and cfg.local_window_size and cfg.local_layers == "alternate" else 1
        runs = [layer_fn(cfg.layer_window(j) if self.causal else 0) for j in range(period)]

        caches = cache_groups(cache, period)  # caches[j]: layers j, j + period, ... stacked
        if cfg.scan_layers and period == 1:
            graphdef, state = nnx.split(self.layers)

            def body(h_btd, xs):
                layer_state, layer_cache, key = xs
                h_btd, layer_cache, weights = runs[0](graphdef, layer_state, h_btd, layer_cache, key)
                return h_btd, (layer_cache, weights)

            x_btd, (new_cache, weights) = jax.lax.scan(body, x_btd, (state, cache, keys))
        elif cfg.scan_layers:  # one scan step per period of layers: [L, ...] seen as [L / period, period, ...]
            graphdef, state = nnx.split(self.layers)
            group = lambda tree: jax.tree.map(lambda a: a.reshape((a.shape[0] // period, period) + a.shape[1:]), tree)

            def body(h_btd, xs):
                grouped, step_caches = xs
                new_caches, all_weights = [], []
                for j, run in enumerate(runs):
                    layer_state, key = jax.tree.map(lambda a: a[j], grouped)
                    h_btd, layer_cache, weights = run(graphdef, layer_state, h_btd, step_caches[j], key)
                    new_caches.append(layer_cache)
                    all_weights.append(weights)
                return h_btd, (new_caches, jax.tree.map(lambda *a: jnp.stack(a), *all_weights))

            x_btd, (new_caches, grouped) = jax.lax.scan(body, x_btd, (group((state, keys)), caches))
            new_cache = join_cache_groups(new_caches)
            weights = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), grouped)
        else:
            new_caches, all_weights = [[] for _ in range(period)], []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                group_cache = caches[i % period]
                layer_cache = None if group_cache is None else jax.tree.map(lambda a: a[i // period], group_cache)
                x_btd, layer_cache, weights = runs[i % period](
                    graphdef, state, x_btd, layer_cache, None if keys is None else keys[i]
                )
                new_caches[i % period].append(layer_cache)
                all_weights.append(weights)
            stack = lambda items: None if items[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *items)
            new_cache, weights = join_cache_groups([stack(c) for c in new_caches]), stack(all_weights)
        x_btd = sh.constrain(x_btd, RESIDUAL_AXES)
        if self.final_norm is not None:
            x_btd = self.final_norm(x_btd)
        x_btd = dropout(x_btd, cfg.dropout_rate, None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1))
        return x_btd, new_cache, weights


def cache_groups(cache: dict | None, period: int) -> list:
    """The cache of the layers j, j + period, ... for each j < period. With local_layers alternate
    (period 2) the dense layers' cache is the top level and the banded layers' rings are 'local'."""
    if cache is None or period == 1:
        return [cache] * period
    return [{k: v for k, v in cache.items() if k != "local"}, cache["local"]]


def join_cache_groups(caches: list) -> dict | None:
    """`cache_groups`' inverse."""
    return caches[0] if caches[0] is None or len(caches) == 1 else {**caches[0], "local": caches[1]}


def default_positions(ids: Array, offset: Array | int = 0) -> Array:
    """Positions [B, T] of ids [B, T]: offset, offset + 1, ..."""
    return jnp.broadcast_to(offset + jnp.arange(ids.shape[1]), ids.shape)


def self_attention_mask(
    t: int, *, causal: bool, attention_mask: Array | None, segment_ids: Array | None, cache: dict | None
) -> attn.Mask:
    """What self-attention may see. attention_mask [B, S] marks the real tokens, which come first
    (padding at the end, as every pipeline here makes it): it travels as lengths. Packed segments
    (segment id 0 = padding) travel as their ids: a banded layer computes its band blockwise from
    them, the others build the [B, 1, T, S] mask. Over a KV cache attention_mask is a key mask over
    the sequence's positions, any pattern (left-padded prompts), and the attention places causality
    at the cache's index."""
    if cache is not None:
        dense = None if attention_mask is None else attn.key_mask(attention_mask)
        return attn.Mask(causal=causal, dense=dense, segment_ids=segment_ids)
    return attn.Mask(causal=causal, kv_lengths=sequence_lengths(attention_mask), segment_ids=segment_ids)


def sequence_lengths(attention_mask: Array | None) -> Array | None:
    """[B, S] 0/1 mask with the real tokens first -> lengths [B] (int32)."""
    return None if attention_mask is None else jnp.sum(attention_mask != 0, axis=-1, dtype=jnp.int32)
