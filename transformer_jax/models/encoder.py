"""Encoder-only model (BERT): embeddings, bidirectional stack, pooler, and separate heads.

Letters as in `attention.py` (B batch, T length, D model width, V vocab), plus E the output width
of a square [D, D] dense layer (the MLM transform, the pooler) and C a label head's outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.layers import ACTIVATIONS, Dense, Norm, dropout, mask_padded_vocab
from transformer_jax.models.common import Embedder, ModelOutput, Stack, default_positions, self_attention_mask


class MLMHead(nnx.Module):
    """BERT's prediction head: dense + activation + norm, then the tied embedding plus a bias.
    Logits [..., padded_vocab_size], float32, the padded ids masked (never win)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.activation, self.vocab_size = cfg.activation, cfg.vocab_size
        self.transform = Dense(
            (cfg.model_dim, cfg.model_dim), ("embed", "mlp"), use_bias=True, bias_ndim=1, cfg=cfg, rngs=rngs
        )
        self.norm = Norm(cfg.model_dim, cfg, rngs)
        self.bias = nnx.Param(jnp.zeros((cfg.padded_vocab_size,), cfg.param_dtype), axes=("vocab",))

    def __call__(self, x_btd, embed, axes=None):
        """x_btd [B, T, D] (T: the MLM positions when only those are predicted) -> logits [B, T, V]."""
        x_btd = self.norm(ACTIVATIONS[self.activation](self.transform(x_btd, "BTD,DE->BTE")))
        return mask_padded_vocab(embed.attend(x_btd) + self.bias[...].astype(x_btd.dtype), self.vocab_size, axes)


class Pooler(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = Dense(
            (cfg.model_dim, cfg.model_dim), ("embed", "mlp"), use_bias=True, bias_ndim=1, cfg=cfg, rngs=rngs
        )

    def __call__(self, x_btd):
        """The first token's state through dense + tanh: [B, T, D] -> [B, D]."""
        return jnp.tanh(self.dense(x_btd[:, 0], "BD,DE->BE"))


def label_head(cfg: ModelConfig, num: int, rngs: nnx.Rngs) -> Dense:
    return Dense((cfg.model_dim, num), ("embed", None), use_bias=True, bias_ndim=1, cfg=cfg, rngs=rngs)


class Encoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross_attention=False, rngs=rngs)
        self.pooler = Pooler(cfg, rngs) if cfg.pooler else None
        heads = set(cfg.heads)
        self.mlm = MLMHead(cfg, rngs) if "mlm" in heads else None
        self.nsp = label_head(cfg, 2, rngs) if "nsp" in heads else None
        self.classifier = label_head(cfg, cfg.num_labels, rngs) if "classification" in heads else None
        self.regressor = label_head(cfg, 1, rngs) if "regression" in heads else None
        self.token_classifier = label_head(cfg, cfg.num_labels, rngs) if "token_classification" in heads else None
        self.qa = label_head(cfg, 2, rngs) if "qa" in heads else None

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        positions=None,
        segment_ids=None,
        dropout_rng=None,
        return_weights=False,
        mlm_positions=None,
    ) -> ModelOutput:
        """`mlm_positions` [b, p] (optional): the MLM head runs at these positions only and logits
        are [b, p, vocab]; indices past the end stand for padding."""
        rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        positions = default_positions(input_ids) if positions is None else positions
        x_btd = self.embed(input_ids, positions, token_type_ids, rngs[0])
        mask = self_attention_mask(
            input_ids.shape[1], causal=False, attention_mask=attention_mask, segment_ids=segment_ids, cache=None
        )
        x_btd, _, weights = self.encoder(
            x_btd, positions=positions, mask=mask, dropout_rng=rngs[1], return_weights=return_weights
        )
        pooled_bd = self.pooler(x_btd) if self.pooler is not None else None
        heads: dict = {}  # as ModelOutput.heads: arrays, and {"start", "end"} for qa
        logits = None
        if self.mlm is not None:
            masked_btd = (
                x_btd
                if mlm_positions is None
                # [B, P, D] at the P mlm_positions
                else jnp.take_along_axis(x_btd, mlm_positions[..., None], 1, mode="clip")
            )
            # the P positions are no length that sequence parallelism splits
            logits = self.mlm(masked_btd, self.embed.token, None if mlm_positions is None else ("batch", None, "vocab"))
        first_bd = dropout(pooled_bd if pooled_bd is not None else x_btd[:, 0], self.cfg.dropout_rate, rngs[2])
        if self.nsp is not None:
            heads["nsp"] = self.nsp(first_bd, "BD,DC->BC")
        summary_bd = first_bd
        if self.cfg.classifier_pooling == "mean" and (self.classifier is not None or self.regressor is not None):
            keep_bt = jnp.ones(input_ids.shape) if attention_mask is None else attention_mask
            keep_bt1 = keep_bt.astype(jnp.float32)[..., None]
            mean_bd = (
                jnp.sum(x_btd.astype(jnp.float32) * keep_bt1, axis=1)  # f32 sums
                / jnp.maximum(jnp.sum(keep_bt1, axis=1), 1)
            )
            summary_bd = dropout(mean_bd.astype(x_btd.dtype), self.cfg.dropout_rate, rngs[2])
        for name in ("classifier", "regressor"):
            if getattr(self, name) is not None:
                heads[name] = getattr(self, name)(summary_bd, "BD,DC->BC")
        if self.token_classifier is not None:
            heads["token_classifier"] = self.token_classifier(
                dropout(x_btd, self.cfg.dropout_rate, rngs[2]), "BTD,DC->BTC"
            )
        if self.qa is not None:
            start_bt, end_bt = jnp.moveaxis(self.qa(x_btd, "BTD,DC->BTC"), -1, 0)
            heads["qa"] = {"start": start_bt, "end": end_bt}
        if logits is None:
            logits = heads.get("classifier", heads.get("regressor", heads.get("token_classifier")))
        return ModelOutput(
            logits=logits,
            hidden_states=x_btd,
            pooled=pooled_bd,
            heads=heads or None,
            attention_weights={"encoder": weights} if return_weights else None,
        )
