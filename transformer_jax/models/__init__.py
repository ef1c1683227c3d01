"""The three families behind one functional entry: `build(cfg, rng) -> (Model, params)`."""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_jax import attention as attn
from transformer_jax.config import Config, ModelConfig
from transformer_jax.models.common import ModelOutput
from transformer_jax.models.decoder import Decoder
from transformer_jax.models.encoder import Encoder
from transformer_jax.models.encoder_decoder import EncoderDecoder
from transformer_jax.models.vision import DualEncoder, VisionLanguage

FAMILIES = {
    "encoder": Encoder,
    "decoder": Decoder,
    "encoder_decoder": EncoderDecoder,
    "vision_language": VisionLanguage,
    "dual_encoder": DualEncoder,
}


def _axes_of(state) -> Any:
    """The `axes` metadata of every parameter, as a pure dict shaped like the params."""
    is_var = lambda x: isinstance(x, nnx.Variable)

    def axes(v):  # stacked (scanned) layers carry one more leading dimension: `layers`
        names = tuple(v.get_metadata().get("axes") or ())
        return v.replace(value=("layers",) * (len(v.get_value().shape) - len(names)) + names)

    return nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=is_var))


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model's structure without its weights. `apply(params, **inputs)` is pure: jit it yourself.

    params is a plain nested dict of arrays (as returned by `build` or restored from a checkpoint);
    `logical_axes` is the same tree with each parameter's logical axis names.
    """

    cfg: ModelConfig
    graphdef: Any
    logical_axes: Any

    def module(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    def apply(self, params, **inputs) -> ModelOutput:
        attn.check_backend(self.cfg.attention_impl)
        check_inputs(self.cfg.family, inputs)
        if inputs.get("cache") is None:
            for key in ("attention_mask", "decoder_attention_mask"):
                check_padding_at_end(inputs.get(key), key)
        return self.module(params)(**inputs)

    def encode(self, params, input_ids, attention_mask=None, **kw):
        """Encoder-decoder only: encoder hidden states [B, S, D]."""
        return self.module(params).encode(input_ids, attention_mask, **kw)[0]

    def decode(self, params, decoder_input_ids, encoder_hidden_states, attention_mask=None, **kw):
        """Encoder-decoder only: (logits, hidden, cache, weights) of the decoder given encoder states."""
        return self.module(params).decode(decoder_input_ids, encoder_hidden_states, attention_mask, **kw)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """An empty KV cache {'key', 'value': [L, B, max_len, K, H], 'index': [L]} (letters as in
        attention.py). A banded layer (model.local_window_size w) keeps a ring of min(w, max_len)
        slots (position p in slot p mod its length): with local_layers all every layer's; with
        alternate the dense (even) layers stay at the top level and the banded (odd) ones' rings
        are under 'local' ({'key', 'value': [L // 2, B, min(w, max_len), K, H], 'index'})."""
        cfg = self.cfg
        if cfg.family == "encoder":
            raise ValueError("an encoder-only model has no KV cache")
        layers = cfg.num_layers if cfg.family == "decoder" else cfg.resolved_decoder_layers

        def stacked(count: int, slots: int) -> dict:
            one = attn.init_kv_cache(batch, slots, cfg.resolved_kv_heads, cfg.resolved_head_dim, dtype or cfg.dtype)
            return jax.tree.map(lambda a: jnp.broadcast_to(a, (count,) + a.shape), one)

        ring = min(cfg.local_window_size, max_len)
        if cfg.local_layers == "all":
            return stacked(layers, ring)
        if cfg.local_layers == "alternate":
            return {**stacked((layers + 1) // 2, max_len), "local": stacked(layers // 2, ring)}
        return stacked(layers, max_len)


def _expect(assertion, *args, message: str) -> None:
    """A chex assertion whose failure is a ValueError carrying `message` (which names the argument)."""
    assertion(*args, custom_message=message, exception_type=ValueError)


# the inputs that go with an id sequence: name -> the ids they are laid over, one per token
_PER_TOKEN = {
    "attention_mask": "input_ids",
    "token_type_ids": "input_ids",
    "segment_ids": "input_ids",
    "positions": "input_ids",
    "decoder_attention_mask": "decoder_input_ids",
    "decoder_segment_ids": "decoder_input_ids",
    "decoder_positions": "decoder_input_ids",
}


def check_inputs(family: str, inputs: dict) -> None:
    """The shapes `Model.apply` takes, checked on the static shapes (at trace time under jit: free).
    A wrong one is a ValueError naming the argument. input_ids / decoder_input_ids: integer
    [batch, length]; their masks, token types, segment ids and positions: the same [batch, length]
    (a self-attention mask over a KV cache covers the cache's slots: [batch, cache length]);
    pixels [batch, height, width, channels]; encoder_hidden_states [batch, length, model_dim]."""
    names = ("input_ids", "decoder_input_ids", "mlm_positions", "encoder_hidden_states", "pixels", *_PER_TOKEN)
    x = {k: v if hasattr(v, "shape") else np.asarray(v) for k in names if (v := inputs.get(k)) is not None}
    for name in ("input_ids", "decoder_input_ids"):
        if x.get(name) is not None:
            _expect(
                chex.assert_rank,
                x[name],
                2,
                message=f"{name}: expected rank 2 [batch, length], got shape {tuple(x[name].shape)}",
            )
            _expect(chex.assert_type, x[name], int, message=f"{name}: expected integer token ids, got {x[name].dtype}")
    cached = {"decoder": "attention_mask", "encoder_decoder": "decoder_attention_mask"}.get(family)
    for name, ids in _PER_TOKEN.items():
        if x.get(name) is None:
            continue
        _expect(
            chex.assert_rank,
            x[name],
            2,
            message=f"{name}: expected rank 2 [batch, length] like {ids}, got shape {tuple(x[name].shape)}",
        )
        if x.get(ids) is None:
            continue
        if name == cached and inputs.get("cache") is not None:  # over the cache's slots: the batch must agree
            _expect(
                chex.assert_equal_shape_prefix,
                [x[name], x[ids]],
                1,
                message=f"{name}: batch {x[name].shape[0]} differs from {ids}'s {x[ids].shape[0]}",
            )
        else:
            _expect(
                chex.assert_equal_shape,
                [x[name], x[ids]],
                message=f"{name}: shape {tuple(x[name].shape)} differs from {ids}'s {tuple(x[ids].shape)}",
            )
    if x.get("mlm_positions") is not None:
        _expect(
            chex.assert_rank,
            x["mlm_positions"],
            2,
            message=f"mlm_positions: expected rank 2 [batch, positions], got shape {tuple(x['mlm_positions'].shape)}",
        )
    hidden = x.get("encoder_hidden_states")
    if hidden is not None:
        _expect(
            chex.assert_rank,
            hidden,
            3,
            message=f"encoder_hidden_states: expected rank 3 [batch, length, "
            f"model_dim], got shape {tuple(hidden.shape)}",
        )
        if x.get("attention_mask") is not None and x.get("input_ids") is None:
            _expect(
                chex.assert_equal_shape_prefix,
                [x["attention_mask"], hidden],
                2,
                message=f"attention_mask: shape {tuple(x['attention_mask'].shape)} differs from "
                f"encoder_hidden_states' [batch, length] {tuple(hidden.shape[:2])}",
            )
    if family in ("vision_language", "dual_encoder") and x.get("pixels") is not None:
        _expect(
            chex.assert_rank,
            x["pixels"],
            4,
            message=f"pixels: expected rank 4 [batch, height, width, channels], got shape {tuple(x['pixels'].shape)}",
        )
        if x.get("input_ids") is not None:
            _expect(
                chex.assert_equal_shape_prefix,
                [x["pixels"], x["input_ids"]],
                1,
                message=f"pixels: batch {x['pixels'].shape[0]} differs from input_ids' {x['input_ids'].shape[0]}",
            )


def check_rng(rng) -> None:
    """`build`'s rng: an int seed or one PRNG key (typed, or a raw uint32 [2]), not a batch of keys."""
    if isinstance(rng, int):
        return
    if not hasattr(rng, "shape"):
        raise TypeError(f"rng: expected an int seed or a jax.random.key, got {type(rng).__name__}")
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    _expect(
        chex.assert_rank,
        rng,
        0 if typed else 1,
        message=f"rng: expected an int seed or one PRNG key (jax.random.key(seed)), got {rng.dtype} "
        f"of shape {tuple(rng.shape)}",
    )
    if not typed:
        _expect(chex.assert_type, rng, jnp.uint32, message=f"rng: a raw PRNG key is uint32, got {rng.dtype}")


def check_padding_at_end(mask, name: str = "attention_mask") -> None:
    """attention_mask travels as lengths: the real tokens come first. Checked where the mask is
    concrete (under jit it is a tracer and this is the caller's contract)."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    real = np.asarray(mask) != 0
    if real.ndim == 2 and np.any(real[:, 1:] & ~real[:, :-1]):
        raise ValueError(
            f"{name}: padding must come after the real tokens (it is read as lengths); "
            "for left-padded input pass segment_ids (1 = real token, 0 = padding) instead"
        )


def _model_config(cfg: Config | ModelConfig) -> ModelConfig:
    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    if not hasattr(mcfg, "family"):
        raise TypeError(f"cfg: expected a Config or a ModelConfig, got {type(cfg).__name__}")
    if mcfg.family not in FAMILIES:
        raise ValueError(f"model.family: {mcfg.family!r} is none of {', '.join(FAMILIES)}")
    return mcfg


def abstract_build(cfg: Config | ModelConfig) -> tuple[Model, Any]:
    """The model and its params as jax.ShapeDtypeStructs: nothing is allocated."""
    mcfg = _model_config(cfg)
    abstract = nnx.eval_shape(lambda: FAMILIES[mcfg.family](mcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return Model(mcfg, graphdef, _axes_of(state)), nnx.to_pure_dict(state)


def build(cfg: Config | ModelConfig, rng: jax.Array | int = 0) -> tuple[Model, Any]:
    """Build a model from a config: (Model, params) with params a plain pytree of float arrays."""
    mcfg = _model_config(cfg)
    check_rng(rng)
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    module = FAMILIES[mcfg.family](mcfg, rngs=nnx.Rngs(params=rng))
    graphdef, state = nnx.split(module)
    return Model(mcfg, graphdef, _axes_of(state)), nnx.to_pure_dict(state)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def published_params(model: Model, params) -> int:
    """The parameter count without the vocabulary padding (`model.vocab_multiple`): what the
    paper or the Hugging Face model states. `count_params` counts the padded arrays."""
    vocab, padded = model.cfg.vocab_size, model.cfg.padded_vocab_size
    sizes = jax.tree.map(
        lambda axes, x: int(x.size) // padded * vocab if "vocab" in axes else int(x.size),
        model.logical_axes,
        params,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    return sum(jax.tree.leaves(sizes))


def _convert_layers(tree, convert):
    if not isinstance(tree, dict):
        return tree
    return {k: convert(v) if k == "layers" else _convert_layers(v, convert) for k, v in tree.items()}


def scan_params(params):
    """Looped-layer params ({'layers': {0: ..., 1: ...}}) -> scanned ({'layers': stacked})."""
    return _convert_layers(
        params, lambda layers: jax.tree.map(lambda *a: jnp.stack(a), *[layers[i] for i in sorted(layers)])
    )


def unscan_params(params):
    """Scanned params -> looped-layer params: the inverse of `scan_params`."""

    def split(layers):
        n = jax.tree.leaves(layers)[0].shape[0]
        return {i: jax.tree.map(lambda a: a[i], layers) for i in range(n)}

    return _convert_layers(params, split)
