"""Encoder-decoder model (T5 v1.0/v1.1, the 2017 Transformer): shared embeddings, two stacks.

Letters as in `attention.py`: the encoder's states are [B, S, D] (S source length), the decoder's
[B, T, D]."""

from __future__ import annotations

import jax
from flax import nnx

from transformer_jax import attention as attn
from transformer_jax.config import ModelConfig
from transformer_jax.layers import Dense
from transformer_jax.models.common import (
    Embedder,
    ModelOutput,
    Stack,
    default_positions,
    self_attention_mask,
    sequence_lengths,
)
from transformer_jax.models.decoder import lm_logits


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross_attention=False, rngs=rngs)
        self.decoder = Stack(cfg, cfg.resolved_decoder_layers, causal=True, cross_attention=True, rngs=rngs)
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

    def encode(
        self, input_ids, attention_mask=None, positions=None, segment_ids=None, dropout_rng=None, return_weights=False
    ):
        positions = default_positions(input_ids) if positions is None else positions
        rngs = [None] * 2 if dropout_rng is None else list(jax.random.split(dropout_rng, 2))
        x_bsd = self.embed(input_ids, positions, None, rngs[0])
        mask = self_attention_mask(
            input_ids.shape[1], causal=False, attention_mask=attention_mask, segment_ids=segment_ids, cache=None
        )
        x_bsd, _, weights = self.encoder(
            x_bsd, positions=positions, mask=mask, dropout_rng=rngs[1], return_weights=return_weights
        )
        return x_bsd, weights

    def decode(
        self,
        decoder_input_ids,
        encoder_hidden_states,
        attention_mask=None,
        decoder_attention_mask=None,
        decoder_positions=None,
        segment_ids=None,
        decoder_segment_ids=None,
        cache=None,
        dropout_rng=None,
        return_weights=False,
    ):
        rngs = [None] * 2 if dropout_rng is None else list(jax.random.split(dropout_rng, 2))
        offset = 0 if cache is None else cache["index"][0]
        positions = default_positions(decoder_input_ids, offset) if decoder_positions is None else decoder_positions
        y_btd = self.embed(decoder_input_ids, positions, None, rngs[0])
        mask = self_attention_mask(
            decoder_input_ids.shape[1],
            causal=True,
            attention_mask=decoder_attention_mask,
            segment_ids=decoder_segment_ids,
            cache=cache,
        )
        context_mask = attn.Mask(
            kv_lengths=sequence_lengths(attention_mask),
            dense=None if segment_ids is None else attn.segment_mask(decoder_segment_ids, segment_ids),
        )
        y_btd, cache, weights = self.decoder(
            y_btd,
            positions=positions,
            mask=mask,
            cache=cache,
            context=encoder_hidden_states,
            context_mask=context_mask,
            dropout_rng=rngs[1],
            return_weights=return_weights,
        )
        return lm_logits(self.cfg, y_btd, self.embed.token, self.lm_head), y_btd, cache, weights

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        positions=None,
        decoder_positions=None,
        segment_ids=None,
        decoder_segment_ids=None,
        encoder_hidden_states=None,
        cache=None,
        dropout_rng=None,
        return_weights=False,
    ) -> ModelOutput:
        rngs = [None] * 2 if dropout_rng is None else list(jax.random.split(dropout_rng, 2))
        enc_weights = None
        if encoder_hidden_states is None:
            encoder_hidden_states, enc_weights = self.encode(
                input_ids, attention_mask, positions, segment_ids, rngs[0], return_weights
            )
        logits_btv, y_btd, cache, dec_weights = self.decode(
            decoder_input_ids,
            encoder_hidden_states,
            attention_mask,
            decoder_attention_mask,
            decoder_positions,
            segment_ids,
            decoder_segment_ids,
            cache,
            rngs[1],
            return_weights,
        )
        weights = {"encoder": enc_weights, "decoder": dec_weights} if return_weights else None
        return ModelOutput(
            logits=logits_btv,
            hidden_states=y_btd,
            attention_weights=weights,
            cache=cache,
            encoder_hidden_states=encoder_hidden_states,
        )
