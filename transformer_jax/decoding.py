"""Incremental decoding with the KV cache: greedy, temperature / top-k / top-p sampling, beam search.

Everything is jittable: lengths, beam size and the sampling switches are static, the loops are
`lax.scan` / `lax.while_loop`. Decoder-only prompts are left-padded (the mask marks real tokens);
positions are counted over real tokens, so a padded prompt decodes as the unpadded one would (not
with banded layers: their window counts the padding's slots too, cached or not).
Outputs are [batch, max_new_tokens] tokens: the generated ids, `eos_id` once, then `pad_id`.

The cache is `Model.init_cache`'s: a banded layer (model.local_window_size w) keeps a ring of w
slots, so a long decode holds w positions per banded layer, not all of them (`cache_bytes`).

Encoder-decoder models project the encoder states to cross-attention keys and values once per
source (not at every step). `use_cache=False` is the reference path: each step runs the whole
decoder again over the tokens so far (no KV cache, no precomputed cross-attention); it gives
the same tokens, at a cost quadratic in the length.

`on_mesh` runs a decode with parameters sharded over a mesh on any number of processes: the
batch split over the mesh's batch axes, the tokens whole on every process.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_jax import attention as attn
from transformer_jax.layers import MultiHeadAttention
from transformer_jax.models import Model

Array = jax.Array
NEG_INF = -1.0e7


class _PrecomputedCrossAttention(nnx.Module):
    """Stands in for a decoder block's cross-attention while decoding: the keys and values of the
    encoder states were projected once (`key`, `value`: [b, s, k, d], with a leading layers axis
    when the layers are scanned); each step projects only its queries. The rest is the model's
    own code, as `attention.multi_head_attention` computes it without a cache."""

    def __init__(self, mha: MultiHeadAttention, key: jax.Array, value: jax.Array):
        self.cfg, self.query, self.out = mha.cfg, mha.query, mha.out
        self.cross_key, self.cross_value = nnx.Variable(key), nnx.Variable(value)

    def __call__(
        self,
        x,
        context=None,
        *,
        mask=None,
        bias=None,
        rotary_fn=None,
        kv_cache=None,
        dropout_rng=None,
        return_weights=False,
    ) -> attn.AttentionOutput:
        cfg = self.cfg
        mask = attn.Mask() if mask is None else mask
        q_btnh = attn.project(self.query.params(), x, "BTD,DNH->BTNH")
        result = attn.dot_product_attention(
            q_btnh,
            self.cross_key[...],
            self.cross_value[...],
            mask=mask.dense,
            causal=mask.causal,
            kv_lengths=mask.kv_lengths,
            bias=bias,
            implementation=None if cfg.attention_impl == "explicit" else cfg.attention_impl,
            return_weights=return_weights,
            scale=None if cfg.scale_attention else 1.0,
        )
        out_btnh, weights = result if return_weights else (result, None)
        return attn.AttentionOutput(attn.project(self.out.params(), out_btnh, "BTNH,NHD->BTD"), weights, None)


def cross_attention_kv(model: Model, params, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every decoder layer's cross-attention keys and values of the encoder states [B, S, D]:
    ([L, B, S, K, H], same) -- computed once per source for incremental decoding."""
    layers = model.module(params).decoder.layers  # type: ignore[attr-defined]
    project = lambda p: attn.project(p, encoded, "BSD,DKH->BSKH")
    if model.cfg.scan_layers:  # one stacked block: its kernels carry a leading layers axis
        mha = layers.cross_attention
        return jax.vmap(project)(mha.key.params()), jax.vmap(project)(mha.value.params())
    keys = [project(block.cross_attention.key.params()) for block in layers]
    values = [project(block.cross_attention.value.params()) for block in layers]
    return jnp.stack(keys), jnp.stack(values)


def _decoder_with_cross_kv(model: Model, params, cross_kv) -> nnx.Module:
    """The model with each decoder block's cross-attention reading precomputed keys and values."""
    module = model.module(params)
    keys, values = cross_kv
    layers = module.decoder.layers  # type: ignore[attr-defined]
    if model.cfg.scan_layers:
        layers.cross_attention = _PrecomputedCrossAttention(layers.cross_attention, keys, values)
    else:
        for i, block in enumerate(layers):
            block.cross_attention = _PrecomputedCrossAttention(block.cross_attention, keys[i], values[i])
    return module


def _prepare(
    model: Model,
    params,
    input_ids: Array,
    attention_mask: Array | None,
    max_new_tokens: int,
    decoder_start_id: int,
    use_cache: bool = True,
):
    """Run the prompt (decoder) or the encoder once. Returns the logits for the first new token,
    the cache, and step(tokens [b], cache, i) -> (logits [b, v], cache) for the tokens after it.
    Without use_cache the 'cache' is {'tokens': [1, b, len]}, the sequence so far, and every step
    runs the model over all of it."""
    b = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if model.cfg.family == "decoder":
        prompt_len = input_ids.shape[1]
        kv_mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), attention_mask.dtype)], axis=1)
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        next_position = positions[:, -1] + 1
        if not use_cache:
            all_positions = jnp.concatenate([positions, next_position[:, None] + jnp.arange(max_new_tokens)], axis=1)
            tokens = jnp.concatenate([input_ids, jnp.zeros((b, max_new_tokens), input_ids.dtype)], axis=1)

            def full(tokens, at):
                # left padding: segment ids say it (attention_mask means padding at the end)
                out = model.apply(params, input_ids=tokens, segment_ids=kv_mask, positions=all_positions)
                return jax.lax.dynamic_index_in_dim(out.logits, at, axis=1, keepdims=False)

            def step(new, cache, i):
                at = jnp.minimum(prompt_len + i, prompt_len + max_new_tokens - 1)
                tokens = jax.lax.dynamic_update_index_in_dim(
                    cache["tokens"][0], new.astype(input_ids.dtype), at, axis=1
                )
                return full(tokens, at), {"tokens": tokens[None]}

            return full(tokens, prompt_len - 1), {"tokens": tokens[None]}, step
        cache = model.init_cache(b, prompt_len + max_new_tokens)
        out = model.apply(params, input_ids=input_ids, attention_mask=kv_mask, positions=positions, cache=cache)

        def step(tokens, cache, i):
            out = model.apply(
                params,
                input_ids=tokens[:, None],
                attention_mask=kv_mask,
                positions=(next_position + i)[:, None],
                cache=cache,
            )
            return out.logits[:, 0], out.cache

        assert out.logits is not None  # a decoder always returns its token logits
        return out.logits[:, -1], out.cache, step
    if model.cfg.family != "encoder_decoder":
        raise ValueError("decoding needs a decoder or encoder_decoder model")
    encoded = model.encode(params, input_ids, attention_mask)
    if not use_cache:

        def full(tokens, at):
            logits = model.decode(params, tokens, encoded, attention_mask)[0]
            return jax.lax.dynamic_index_in_dim(logits, at, axis=1, keepdims=False)

        def step(new, cache, i):  # the token of step i sits at decoder position i + 1
            at = jnp.minimum(i + 1, max_new_tokens - 1)  # the last step's logits are never used
            tokens = jax.lax.dynamic_update_index_in_dim(cache["tokens"][0], new.astype(jnp.int32), at, axis=1)
            return full(tokens, at), {"tokens": tokens[None]}

        tokens = jnp.full((b, max_new_tokens), decoder_start_id, jnp.int32)
        return full(tokens, 0), {"tokens": tokens[None]}, step
    cross_kv = cross_attention_kv(model, params, encoded)

    def cached_step(tokens, cache, i):
        module = _decoder_with_cross_kv(model, params, cross_kv)
        logits, _, cache, _ = module.decode(tokens[:, None], encoded, attention_mask, cache=cache)
        return logits[:, 0], cache

    start = jnp.full((b,), decoder_start_id, jnp.int32)
    return *cached_step(start, model.init_cache(b, max_new_tokens), 0), cached_step


def cache_bytes(model: Model, batch: int, max_len: int) -> int:
    """Bytes of the self-attention KV cache a decode of `max_len` positions holds (`Model.init_cache`:
    a banded layer's ring keeps min(model.local_window_size, max_len) of them). Nothing is allocated."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def sample_logits(
    rng: Array | None, logits: Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Array:
    """Pick a token per row: argmax when rng is None or temperature is 0, else sample from the
    temperature-scaled distribution restricted to the top_k tokens and the top_p nucleus."""
    logits = logits.astype(jnp.float32)
    if rng is None or temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def params_mesh(params) -> jax.sharding.Mesh | None:
    """The mesh that `params` are sharded over (None for host arrays or arrays on one device)."""
    meshes = {
        x.sharding.mesh
        for x in jax.tree.leaves(params)
        if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
    }
    if len(meshes) > 1:
        raise ValueError(f"the parameters are sharded over {len(meshes)} different meshes")
    return meshes.pop() if meshes else None


def on_mesh(fn, params, *arrays: np.ndarray) -> np.ndarray:
    """`fn(params, *arrays)` as NumPy. With `params` sharded over a mesh (on any number of
    processes) they stay there: the host arrays, the same on every process, are split over the
    mesh's batch axes and every process gets the whole result (batch-major)."""
    mesh = params_mesh(params)
    if mesh is None:
        return np.asarray(fn(params, *arrays))
    from jax.experimental import multihost_utils

    from transformer_jax import sharding as sh

    split = [jax.make_array_from_callback(x.shape, sh.batch_sharding(mesh), x.__getitem__) for x in arrays]
    return np.asarray(multihost_utils.process_allgather(fn(params, *split), tiled=True))


@partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_id",
        "pad_id",
        "decoder_start_id",
        "use_cache",
    ),
)
def generate(
    model: Model,
    params,
    input_ids: Array,
    attention_mask: Array | None = None,
    *,
    max_new_tokens: int,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    decoder_start_id: int = 0,
    use_cache: bool = True,
) -> Array:
    """Greedy (rng None or temperature 0) or sampled decoding: [b, max_new_tokens] token ids.
    use_cache=False recomputes the whole sequence at each step (the reference for the cache)."""
    logits, cache, step = _prepare(
        model, params, input_ids, attention_mask, max_new_tokens, decoder_start_id, use_cache
    )
    b = input_ids.shape[0]

    def body(carry, xs):
        logits, cache, done = carry
        i, key = xs
        token = jnp.where(done, pad_id, sample_logits(key, logits, temperature=temperature, top_k=top_k, top_p=top_p))
        if eos_id is not None:
            done = done | (token == eos_id)
        logits, cache = step(token, cache, i)
        return (logits, cache, done), token

    xs = (jnp.arange(max_new_tokens), None if rng is None else jax.random.split(rng, max_new_tokens))
    _, tokens = jax.lax.scan(body, (logits, cache, jnp.zeros((b,), bool)), xs)
    return tokens.T


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT's ((5 + length) / 6) ** alpha; alpha 0 gives plain log-probabilities."""
    return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree, indices: Array, batch: int, beams_from: int):
    """Pick beams [b, n] from a tree whose arrays are [b * beams_from, ...] or [b, beams_from, ...]
    (caches: [layers, b * beams_from, ...], rings too; the per-layer `index` has no batch axis)."""

    def gather(x):
        if x.ndim >= 2 and x.shape[:2] == (batch, beams_from):
            return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)
        if x.ndim >= 2 and x.shape[1] == batch * beams_from:  # cache: [layers, b * k, ...]
            # per example (no index crosses examples): stays split where the batch is
            grouped = x.reshape(x.shape[0], batch, beams_from, *x.shape[2:])
            picked = jnp.take_along_axis(grouped, indices.reshape(1, *indices.shape, *(1,) * (x.ndim - 2)), axis=2)
            return picked.reshape(x.shape[0], -1, *x.shape[2:])
        return x

    return jax.tree.map(gather, tree)


@partial(
    jax.jit,
    static_argnames=(
        "model",
        "beam_size",
        "max_new_tokens",
        "alpha",
        "eos_id",
        "decoder_start_id",
        "return_all",
        "use_cache",
    ),
)
def beam_search(
    model: Model,
    params,
    input_ids: Array,
    attention_mask: Array | None = None,
    *,
    beam_size: int = 4,
    max_new_tokens: int,
    alpha: float = 0.6,
    eos_id: int = 1,
    decoder_start_id: int = 0,
    return_all: bool = False,
    use_cache: bool = True,
):
    """Beam search with GNMT length penalty (`alpha`; the 2017 Transformer used beam 4, alpha 0.6).

    Returns the best sequence per example [b, max_new_tokens] (tokens, eos, then zeros), or with
    return_all (sequences [b, beam, n], scores [b, beam]) sorted best first. use_cache=False
    recomputes the whole decoder at each step (the reference for the cache).
    """
    b, k, n = input_ids.shape[0], beam_size, max_new_tokens
    repeat = lambda x: jnp.repeat(x, k, axis=0)
    logits, cache, step = _prepare(
        model,
        params,
        repeat(input_ids),
        None if attention_mask is None else repeat(attention_mask),
        n,
        decoder_start_id,
        use_cache,
    )
    vocab = logits.shape[-1]

    state = dict(
        i=jnp.zeros((), jnp.int32),
        logits=logits,
        cache=cache,
        live_seqs=jnp.zeros((b, k, n), jnp.int32),
        live_logprobs=jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (b, 1)),  # one live beam to begin
        finished_seqs=jnp.zeros((b, k, n), jnp.int32),
        finished_scores=jnp.full((b, k), NEG_INF),
        finished=jnp.zeros((b, k), bool),
    )

    def not_done(s):
        best_possible = s["live_logprobs"][:, 0] / length_penalty(jnp.float32(n), alpha)
        worst_finished = jnp.where(s["finished"].all(axis=1), s["finished_scores"].min(axis=1), NEG_INF)
        return (s["i"] < n) & ~jnp.all(worst_finished > best_possible)

    def body(s):
        i = s["i"]
        logprobs = jax.nn.log_softmax(s["logits"].astype(jnp.float32)).reshape(b, k, vocab)
        candidates = (s["live_logprobs"][..., None] + logprobs).reshape(b, k * vocab)
        top_logprobs, top_index = jax.lax.top_k(candidates, 2 * k)  # 2k: enough to keep k non-eos
        origin, token = top_index // vocab, top_index % vocab
        seqs = _gather_beams(s["live_seqs"], origin, b, k).at[:, :, i].set(token)
        is_eos = token == eos_id

        live_logprobs, live_pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logprobs), k)
        live_seqs = _gather_beams(seqs, live_pick, b, 2 * k)
        live_origin = jnp.take_along_axis(origin, live_pick, axis=1)

        # as in Hugging Face: an eos finishes a hypothesis only among the top k (so beam 1 is greedy)
        new_scores = jnp.where(is_eos & (jnp.arange(2 * k) < k), top_logprobs / length_penalty(i + 1.0, alpha), NEG_INF)
        all_scores = jnp.concatenate([s["finished_scores"], new_scores], axis=1)
        all_seqs = jnp.concatenate([s["finished_seqs"], seqs], axis=1)
        all_flags = jnp.concatenate([s["finished"], is_eos], axis=1)
        finished_scores, pick = jax.lax.top_k(all_scores, k)

        cache = _gather_beams(s["cache"], live_origin, b, k)
        logits, cache = step(live_seqs[:, :, i].reshape(b * k), cache, i)
        return dict(
            i=i + 1,
            logits=logits,
            cache=cache,
            live_seqs=live_seqs,
            live_logprobs=live_logprobs,
            finished_seqs=_gather_beams(all_seqs, pick, b, 3 * k),
            finished_scores=finished_scores,
            finished=jnp.take_along_axis(all_flags, pick, axis=1),
        )

    s = jax.lax.while_loop(not_done, body, state)
    # an example with no finished beam falls back to its live beams at their current length
    any_finished = s["finished"].any(axis=1)
    live_scores = s["live_logprobs"] / length_penalty(s["i"].astype(jnp.float32), alpha)
    seqs = jnp.where(any_finished[:, None, None], s["finished_seqs"], s["live_seqs"])
    scores = jnp.where(any_finished[:, None], s["finished_scores"], live_scores)
    return (seqs, scores) if return_all else seqs[:, 0]
