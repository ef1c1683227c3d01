"""Decoder-only model (GPT-2): embeddings, causal stack with a KV cache, LM head (tied or not)."""

from __future__ import annotations

import jax
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.layers import Dense, mask_padded_vocab
from transformer_jax.models.common import Embedder, ModelOutput, Stack, default_positions, self_attention_mask


def lm_logits(cfg: ModelConfig, x_btd, embed, lm_head):
    """Token logits [B, T, V] (V = padded_vocab_size), float32, the padded ids masked (never win)."""
    if lm_head is not None:
        return mask_padded_vocab(lm_head(x_btd, "BTD,DV->BTV"), cfg.vocab_size)
    if cfg.tied_logits_scale:
        x_btd = x_btd * cfg.model_dim**-0.5
    return mask_padded_vocab(embed.attend(x_btd), cfg.vocab_size)


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs)
        self.decoder = Stack(cfg, cfg.num_layers, causal=True, cross_attention=False, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Dense(
                (cfg.model_dim, cfg.padded_vocab_size),
                ("embed", "vocab"),
                use_bias=False,
                bias_ndim=1,
                cfg=cfg,
                rngs=rngs,
            )
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        segment_ids=None,
        cache=None,
        dropout_rng=None,
        return_weights=False,
    ) -> ModelOutput:
        rngs = [None] * 2 if dropout_rng is None else list(jax.random.split(dropout_rng, 2))
        offset = 0 if cache is None else cache["index"][0]
        positions = default_positions(input_ids, offset) if positions is None else positions
        x_btd = self.embed(input_ids, positions, None, rngs[0])
        mask = self_attention_mask(
            input_ids.shape[1], causal=True, attention_mask=attention_mask, segment_ids=segment_ids, cache=cache
        )
        x_btd, cache, weights = self.decoder(
            x_btd, positions=positions, mask=mask, cache=cache, dropout_rng=rngs[1], return_weights=return_weights
        )
        return ModelOutput(
            logits=lm_logits(self.cfg, x_btd, self.embed.token, self.lm_head),
            hidden_states=x_btd,
            cache=cache,
            attention_weights={"decoder": weights} if return_weights else None,
        )
