"""What the three families share: embeddings, a stack of blocks (looped or scanned), the output."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import attention as attn
from transformer_jax.config import ModelConfig
from transformer_jax.layers import Block, Embed, Norm, RelativePositionBias, dropout, rotary, sinusoidal_positions

Array = jax.Array

REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


class ModelOutput(NamedTuple):
    logits: Array | None = None                 # token logits [b, t, v] (LM / MLM), or label logits [b, n]
    hidden_states: Array | None = None          # last layer [b, t, m] (decoder side for encoder-decoder)
    pooled: Array | None = None                 # BERT pooler output [b, m]
    heads: dict | None = None                   # other heads: {'nsp': [b, 2], 'classification': [b, n], ...}
    attention_weights: dict | None = None       # {'encoder'|'decoder': {'self'|'cross': [L, b, h, t, s]}}
    cache: dict | None = None                   # updated KV cache when one was given
    encoder_hidden_states: Array | None = None  # encoder-decoder only


def dtype_of(name: str):
    return jnp.dtype(name)


class Embedder(nnx.Module):
    """Token embeddings plus learned / sinusoidal positions and token types; optional norm (BERT)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token = Embed(cfg.vocab_size, cfg.model_dim, ("vocab", "embed"), cfg, rngs)
        self.position = Embed(cfg.max_len, cfg.model_dim, (None, "embed"), cfg, rngs) if cfg.position == "learned" else None
        self.token_type = (Embed(cfg.type_vocab_size, cfg.model_dim, (None, "embed"), cfg, rngs)
                           if cfg.type_vocab_size else None)
        self.norm = Norm(cfg.model_dim, cfg, rngs) if cfg.embed_norm else None

    def __call__(self, ids: Array, positions: Array, token_type_ids: Array | None = None, dropout_rng=None) -> Array:
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        x = self.token(ids, dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.model_dim ** 0.5, dtype)
        if self.position is not None:
            x = x + self.position(positions, dtype)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.model_dim).astype(dtype)
        if self.token_type is not None:
            x = x + self.token_type(jnp.zeros_like(ids) if token_type_ids is None else token_type_ids, dtype)
        if self.norm is not None:
            x = self.norm(x)
        return dropout(x, cfg.dropout_rate, dropout_rng)


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
    run under `jax.lax.scan` (compile time flat in depth); cfg.remat rematerialises each block."""

    def __init__(self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross_attention: bool, rngs: nnx.Rngs):
        self.cfg, self.num_layers, self.causal = cfg, num_layers, causal
        self.relative_bias = (RelativePositionBias(cfg, bidirectional=not causal, rngs=rngs)
                              if cfg.position == "relative" else None)
        self.layers = _stack_blocks(cfg, num_layers, cross_attention, rngs)
        self.final_norm = Norm(cfg.model_dim, cfg, rngs) if cfg.norm_position == "pre" else None

    def __call__(self, x: Array, *, positions: Array, mask: Array | None, cache: dict | None = None,
                 context: Array | None = None, context_mask: Array | None = None, dropout_rng=None,
                 return_weights: bool = False):
        cfg = self.cfg
        t = x.shape[1]
        offset = 0 if cache is None else cache["index"][0]
        kv_len = t if cache is None else cache["key"].shape[2]
        bias = None
        if self.relative_bias is not None:
            bias = self.relative_bias(offset + jnp.arange(t), jnp.arange(kv_len))
        rotary_fn = rotary(positions, cfg.resolved_head_dim, cfg.rotary_base) if cfg.position == "rotary" else None
        keys = None if dropout_rng is None else jax.random.split(dropout_rng, self.num_layers)

        def run(graphdef, state, h, layer_cache, key):
            return nnx.merge(graphdef, state)(h, mask=mask, bias=bias, rotary_fn=rotary_fn, kv_cache=layer_cache,
                                              context=context, context_mask=context_mask, dropout_rng=key,
                                              return_weights=return_weights)
        if cfg.remat != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,), prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(h, xs):
                layer_state, layer_cache, key = xs
                h, layer_cache, weights = run(graphdef, layer_state, h, layer_cache, key)
                return h, (layer_cache, weights)
            x, (new_cache, weights) = jax.lax.scan(body, x, (state, cache, keys))
        else:
            caches, all_weights = [], []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], cache)
                x, layer_cache, weights = run(graphdef, state, x, layer_cache, None if keys is None else keys[i])
                caches.append(layer_cache)
                all_weights.append(weights)
            stack = lambda items: None if items[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *items)
            new_cache, weights = stack(caches), stack(all_weights)
        if self.final_norm is not None:
            x = self.final_norm(x)
        x = dropout(x, cfg.dropout_rate, None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1))
        return x, new_cache, weights


def default_positions(ids: Array, offset: Array | int = 0) -> Array:
    return jnp.broadcast_to(offset + jnp.arange(ids.shape[1]), ids.shape)


def self_attention_mask(t: int, *, causal: bool, attention_mask: Array | None, segment_ids: Array | None,
                        cache: dict | None) -> Array | None:
    """Boolean [b|1, 1, t, s] mask: padding, causal (by index, offset by the cache) and packed segments."""
    if cache is not None:  # queries at index..index+t attend to the cache slots written so far
        offset, kv_len = cache["index"][0], cache["key"].shape[2]
        causal_part = attn.causal_mask(t, kv_len, offset=offset)
    else:
        causal_part = attn.causal_mask(t) if causal else None
    return attn.combine_masks(
        causal_part,
        None if attention_mask is None else attn.key_mask(attention_mask),
        None if segment_ids is None else attn.segment_mask(segment_ids))
