"""The three families behind one functional entry: `build(cfg, rng) -> (Model, params)`."""
from __future__ import annotations

import dataclasses
from typing import Any

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

FAMILIES = {"encoder": Encoder, "decoder": Decoder, "encoder_decoder": EncoderDecoder,
            "vision_language": VisionLanguage, "dual_encoder": DualEncoder}


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
        if inputs.get("cache") is None:
            for key in ("attention_mask", "decoder_attention_mask"):
                check_padding_at_end(inputs.get(key), key)
        return self.module(params)(**inputs)

    def encode(self, params, input_ids, attention_mask=None, **kw):
        """Encoder-decoder only: encoder hidden states [b, s, m]."""
        return self.module(params).encode(input_ids, attention_mask, **kw)[0]

    def decode(self, params, decoder_input_ids, encoder_hidden_states, attention_mask=None, **kw):
        """Encoder-decoder only: (logits, hidden, cache, weights) of the decoder given encoder states."""
        return self.module(params).decode(decoder_input_ids, encoder_hidden_states, attention_mask, **kw)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """An empty KV cache {'key', 'value': [layers, b, max_len, kv_heads, d], 'index': [layers]}."""
        cfg = self.cfg
        if cfg.family == "encoder":
            raise ValueError("an encoder-only model has no KV cache")
        layers = cfg.num_layers if cfg.family == "decoder" else cfg.resolved_decoder_layers
        one = attn.init_kv_cache(batch, max_len, cfg.resolved_kv_heads, cfg.resolved_head_dim, dtype or cfg.dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (layers,) + a.shape), one)


def check_padding_at_end(mask, name: str = "attention_mask") -> None:
    """attention_mask travels as lengths: the real tokens come first. Checked where the mask is
    concrete (under jit it is a tracer and this is the caller's contract)."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    real = np.asarray(mask) != 0
    if real.ndim == 2 and np.any(real[:, 1:] & ~real[:, :-1]):
        raise ValueError(f"{name}: padding must come after the real tokens (it is read as lengths); "
                         "for left-padded input pass segment_ids (1 = real token, 0 = padding) instead")


def _model_config(cfg: Config | ModelConfig) -> ModelConfig:
    return cfg.model if isinstance(cfg, Config) else cfg


def abstract_build(cfg: Config | ModelConfig) -> tuple[Model, Any]:
    """The model and its params as jax.ShapeDtypeStructs: nothing is allocated."""
    mcfg = _model_config(cfg)
    abstract = nnx.eval_shape(lambda: FAMILIES[mcfg.family](mcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return Model(mcfg, graphdef, _axes_of(state)), nnx.to_pure_dict(state)


def build(cfg: Config | ModelConfig, rng: jax.Array | int = 0) -> tuple[Model, Any]:
    """Build a model from a config: (Model, params) with params a plain pytree of float arrays."""
    mcfg = _model_config(cfg)
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
    sizes = jax.tree.map(lambda axes, x: int(x.size) // padded * vocab if "vocab" in axes else int(x.size),
                         model.logical_axes, params, is_leaf=lambda x: isinstance(x, tuple))
    return sum(jax.tree.leaves(sizes))


def _convert_layers(tree, convert):
    if not isinstance(tree, dict):
        return tree
    return {k: convert(v) if k == "layers" else _convert_layers(v, convert) for k, v in tree.items()}


def scan_params(params):
    """Looped-layer params ({'layers': {0: ..., 1: ...}}) -> scanned ({'layers': stacked})."""
    return _convert_layers(params, lambda layers: jax.tree.map(lambda *a: jnp.stack(a), *[layers[i] for i in sorted(layers)]))


def unscan_params(params):
    """Scanned params -> looped-layer params: the inverse of `scan_params`."""
    def split(layers):
        n = jax.tree.leaves(layers)[0].shape[0]
        return {i: jax.tree.map(lambda a: a[i], layers) for i in range(n)}
    return _convert_layers(params, split)
