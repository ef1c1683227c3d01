"""Vision models for image-text pretraining, on the same blocks as the text models.

- `PatchEmbed` (ViT): images [B, height, width, channels] -> [B, 1 + P, D]: P = (height/p)(width/p)
  patches of Q = p*p*channels values each through one kernel [Q, D] (the einsum form of a stride-p
  convolution), a learned class token in front, learned positions.
- `ViT`: PatchEmbed + `models.common.Stack`.
- `VisionLanguage` (family `vision_language`): single-stream fusion. Image patch tokens and text
  tokens, each with a modality (type) embedding, go through one bidirectional `Stack`; the image
  class token (position 0) feeds the binary ITM head; the text positions an optional MLM head. The
  same stack run on one modality alone gives unimodal embeddings for image-text contrastive
  learning (ITC) through two projections and a learned temperature (`itc_encoder: fusion`), or a
  `DualEncoder` inside the model gives them (`itc_encoder: dual`).
- `DualEncoder` (family `dual_encoder`): CLIP. A ViT image tower and a text encoder tower
  (`models.encoder.Encoder`), projections, a learned temperature.

Their objectives are `transformer_jax.tasks.itm` (losses: `losses.itc_loss`, `losses.itm_loss`;
held-out retrieval: `metrics.retrieval_recall`).

Batches: `pixels` [B, height, width, channels] (uint8 0..255, or floats already in [-1, 1]), `input_ids`,
`attention_mask` [B, T] (the caption, [CLS] first), `pair_id` [B] (examples with equal ids
describe the same image content: never each other's negatives), `example_weight` [B] (0 on
padding rows), and for MLM `mlm_input_ids`, `mlm_targets`, `mlm_weights` [B, T].

Letters as in `attention.py` (B batch, T text length, D model width, V vocab), plus P patches
(1 + P tokens with the class token), Q = p*p*channels values per patch, E the projection (ITC
embedding) width, C a label head's outputs (ITM: 2), I images and J texts of a similarity matrix.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import attention as attn
from transformer_jax.config import ModelConfig
from transformer_jax.layers import Dense, Embed, Norm, param
from transformer_jax.models.common import Embedder, ModelOutput, Stack, default_positions, dtype_of, sequence_lengths
from transformer_jax.models.encoder import Encoder, MLMHead, Pooler, label_head

Array = jax.Array

TEXT, IMAGE = 0, 1  # modality ids
MIN_TEMPERATURE = 0.01  # CLIP clips its logit scale at 100


def num_patches(cfg: ModelConfig) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def patchify(images: Array, patch: int) -> Array:
    """[B, height, width, channels] -> [B, P, Q], P = (height/p)(width/p), Q = p*p*channels: patches
    in row-major order, each flattened (row, col, channel)."""
    b, h, w, c = images.shape
    grid = images.reshape(b, h // patch, patch, w // patch, patch, c)  # [B, height/p, p, width/p, p, channels]
    return grid.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalize_pixels(images: Array, dtype) -> Array:
    """uint8 0..255 -> [-1, 1]; floating-point images are taken as already normalised."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return (images.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)
    return images.astype(dtype)


def _l2_normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- modules
class PatchEmbed(nnx.Module):
    """ViT's input: patches through a kernel [Q, D] (Q = p*p*channels) plus a bias, a class token, learned positions."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        k = cfg.patch_size * cfg.patch_size * cfg.num_channels
        self.projection = Dense((k, cfg.model_dim), (None, "embed"), use_bias=True, bias_ndim=1, cfg=cfg, rngs=rngs)
        self.class_token = param(rngs, (cfg.model_dim,), ("embed",), "normal", cfg.param_dtype, cfg.init_std)
        self.position = Embed(num_patches(cfg) + 1, cfg.model_dim, (None, "embed"), cfg, rngs)
        self.norm = Norm(cfg.model_dim, cfg, rngs) if cfg.embed_norm else None

    def __call__(self, pixels: Array) -> Array:
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"pixels have shape {pixels.shape[1:]}, the model expects "
                f"{(cfg.image_size, cfg.image_size, cfg.num_channels)} (model.image_size, num_channels)"
            )
        x_bpd = self.projection(patchify(normalize_pixels(pixels, dtype), cfg.patch_size), "BPQ,QD->BPD")
        cls_b1d = jnp.broadcast_to(self.class_token[...].astype(dtype), (x_bpd.shape[0], 1, cfg.model_dim))
        x_bpd = jnp.concatenate([cls_b1d, x_bpd], axis=1)  # [B, 1 + P, D] from here
        x_bpd = x_bpd + self.position(jnp.arange(x_bpd.shape[1]), dtype)[None]
        return self.norm(x_bpd) if self.norm is not None else x_bpd


class ViT(nnx.Module):
    """Vision Transformer: PatchEmbed + the shared bidirectional Stack. Output [B, 1 + P, D]; the
    class token's state (position 0) summarises the image."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross_attention=False, rngs=rngs)

    def __call__(self, pixels: Array, dropout_rng=None, return_weights: bool = False):
        x_bpd = self.patch_embed(pixels)
        positions = default_positions(x_bpd[..., 0])
        x_bpd, _, weights = self.encoder(
            x_bpd, positions=positions, mask=attn.Mask(), dropout_rng=dropout_rng, return_weights=return_weights
        )
        return x_bpd, weights


def _projection(cfg: ModelConfig, rngs: nnx.Rngs) -> Dense:
    return Dense(
        (cfg.model_dim, cfg.projection_dim or cfg.model_dim),
        ("embed", None),
        use_bias=False,
        bias_ndim=1,
        cfg=cfg,
        rngs=rngs,
    )


def _log_temperature(cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.asarray(math.log(cfg.temperature_init), jnp.float32), axes=())


class _Contrastive:
    """What both families share: normalised projections and the learned temperature."""

    def temperature(self) -> Array:
        # log_temperature: an nnx.Param each subclass sets in __init__ (no class annotation: nnx reads those)
        return jnp.exp(jnp.maximum(self.log_temperature[...], math.log(MIN_TEMPERATURE)))  # type: ignore[attr-defined]

    def similarity(self, image_embeds: Array, text_embeds: Array) -> Array:
        """[I, E], [J, E] (normalised) -> logits [I, J] = cosine / temperature, float32."""
        return jnp.einsum("IE,JE->IJ", image_embeds, text_embeds) / self.temperature()


class DualEncoder(nnx.Module, _Contrastive):
    """CLIP: ViT image tower and text encoder tower, projections into one space, learned temperature."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        tower = dataclasses.replace(cfg, heads=(), pooler=False)
        self.vision = ViT(tower, rngs)
        self.text = Encoder(tower, rngs=rngs)
        self.image_projection = _projection(cfg, rngs)
        self.text_projection = _projection(cfg, rngs)
        self.log_temperature = _log_temperature(cfg)

    def embed_image(self, pixels: Array, dropout_rng=None) -> Array:
        """Normalised image embeddings [B, E] (float32)."""
        x_bpd, _ = self.vision(pixels, dropout_rng)
        return _l2_normalize(self.image_projection(x_bpd[:, 0], "BD,DE->BE"))

    def embed_text(self, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """Normalised text embeddings [B, E] (float32) from the [CLS] position."""
        x_btd = self.text(input_ids, attention_mask=attention_mask, dropout_rng=dropout_rng).hidden_states
        assert x_btd is not None  # an Encoder always returns its hidden states
        return _l2_normalize(self.text_projection(x_btd[:, 0], "BD,DE->BE"))

    def __call__(
        self,
        pixels: Array,
        input_ids: Array,
        attention_mask: Array | None = None,
        dropout_rng=None,
        return_weights: bool = False,
    ) -> ModelOutput:
        """logits: image-to-text similarity [B, B] over the temperature; heads: the embeddings."""
        rngs = [None, None] if dropout_rng is None else list(jax.random.split(dropout_rng))
        image_be, text_be = self.embed_image(pixels, rngs[0]), self.embed_text(input_ids, attention_mask, rngs[1])
        return ModelOutput(
            logits=self.similarity(image_be, text_be),
            heads={"image_embeds": image_be, "text_embeds": text_be, "temperature": self.temperature()},
        )


class VisionLanguage(nnx.Module, _Contrastive):
    """Single-stream image-text model: [image class token, patches, text tokens] through one Stack."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.embed = Embedder(cfg, rngs)
        self.modality = Embed(2, cfg.model_dim, (None, "embed"), cfg, rngs)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross_attention=False, rngs=rngs)
        self.pooler = Pooler(cfg, rngs) if cfg.pooler else None
        self.itm = label_head(cfg, 2, rngs)
        self.mlm = MLMHead(cfg, rngs) if "mlm" in cfg.heads else None
        if cfg.itc_encoder == "dual":
            self.dual: DualEncoder | None = DualEncoder(cfg, rngs=rngs)
            self.image_projection: Dense | None = None
            self.text_projection: Dense | None = None
            self.log_temperature: nnx.Param | None = None
        else:
            self.dual = None
            self.image_projection = _projection(cfg, rngs)
            self.text_projection = _projection(cfg, rngs)
            self.log_temperature = _log_temperature(cfg)

    # -- tokens and the stack
    def _image_tokens(self, pixels: Array) -> Array:
        x_bpd = self.patch_embed(pixels)
        return x_bpd + self.modality(jnp.full(x_bpd.shape[:2], IMAGE, jnp.int32), x_bpd.dtype)

    def _text_tokens(self, input_ids: Array, dropout_rng=None) -> Array:
        x_btd = self.embed(input_ids, default_positions(input_ids), None, dropout_rng)
        return x_btd + self.modality(jnp.full(input_ids.shape, TEXT, jnp.int32), x_btd.dtype)

    def _run(self, x_btd: Array, key_mask: Array | None, dropout_rng=None, return_weights=False):
        """The stack over any token sequence x_btd [B, T, D] with key_mask [B, T] (or None)."""
        mask = attn.Mask(kv_lengths=sequence_lengths(key_mask))
        return self.encoder(
            x_btd,
            positions=default_positions(x_btd[..., 0]),
            mask=mask,
            dropout_rng=dropout_rng,
            return_weights=return_weights,
        )

    def _rngs(self, dropout_rng, n):
        return [None] * n if dropout_rng is None else list(jax.random.split(dropout_rng, n))

    def encode_image(self, pixels: Array, dropout_rng=None) -> Array:
        """The fusion stack on the image alone: [B, 1 + P, D]."""
        return self._run(self._image_tokens(pixels), None, dropout_rng)[0]

    def encode_text(self, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """The fusion stack on the text alone: [B, T, D]."""
        rngs = self._rngs(dropout_rng, 2)
        return self._run(self._text_tokens(input_ids, rngs[0]), attention_mask, rngs[1])[0]

    def fuse(
        self,
        pixels: Array,
        input_ids: Array,
        attention_mask: Array | None = None,
        dropout_rng=None,
        return_weights: bool = False,
    ):
        """Image and text in one sequence: hidden [B, 1 + P + T, D] (image first) and attention weights."""
        rngs = self._rngs(dropout_rng, 2)
        image_bpd, text_btd = self._image_tokens(pixels), self._text_tokens(input_ids, rngs[0])
        key_mask = None  # [B, 1 + P + T]
        if attention_mask is not None:
            key_mask = jnp.concatenate([jnp.ones(image_bpd.shape[:2], attention_mask.dtype), attention_mask], axis=1)
        x_btd, _, weights = self._run(jnp.concatenate([image_bpd, text_btd], axis=1), key_mask, rngs[1], return_weights)
        return x_btd, weights

    # -- heads
    def embed_image(self, pixels: Array, dropout_rng=None) -> Array:
        """Normalised ITC image embeddings [B, E] (float32)."""
        if self.dual is not None:
            return self.dual.embed_image(pixels, dropout_rng)
        assert self.image_projection is not None  # itc_encoder fusion: set with the model
        return _l2_normalize(self.image_projection(self.encode_image(pixels, dropout_rng)[:, 0], "BD,DE->BE"))

    def embed_text(self, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """Normalised ITC text embeddings [B, E] (float32), from the [CLS] position."""
        if self.dual is not None:
            return self.dual.embed_text(input_ids, attention_mask, dropout_rng)
        assert self.text_projection is not None  # itc_encoder fusion: set with the model
        return _l2_normalize(
            self.text_projection(self.encode_text(input_ids, attention_mask, dropout_rng)[:, 0], "BD,DE->BE")
        )

    def temperature(self) -> Array:
        return self.dual.temperature() if self.dual is not None else _Contrastive.temperature(self)

    def _pool(self, x_btd: Array) -> Array:
        return self.pooler(x_btd) if self.pooler is not None else x_btd[:, 0]

    def match(self, pixels: Array, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """ITM logits [B, 2] (index 1: the caption describes the image)."""
        x_btd, _ = self.fuse(pixels, input_ids, attention_mask, dropout_rng)
        return self.itm(self._pool(x_btd), "BD,DC->BC").astype(jnp.float32)

    def masked_lm(
        self, pixels: Array, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None
    ) -> Array:
        """MLM logits [B, T, V] over the caption, conditioned on the image."""
        if self.mlm is None:
            raise ValueError("this model has no mlm head (model.heads)")
        x_btd, _ = self.fuse(pixels, input_ids, attention_mask, dropout_rng)
        return self.mlm(x_btd[:, x_btd.shape[1] - input_ids.shape[1] :], self.embed.token)

    def __call__(
        self,
        pixels: Array,
        input_ids: Array,
        attention_mask: Array | None = None,
        dropout_rng=None,
        return_weights: bool = False,
    ) -> ModelOutput:
        """logits: ITM [B, 2]; hidden_states: the fused sequence; heads: itm (and mlm [B, T, V])."""
        x_btd, weights = self.fuse(pixels, input_ids, attention_mask, dropout_rng, return_weights)
        pooled_bd = self._pool(x_btd)
        heads = {"itm": self.itm(pooled_bd, "BD,DC->BC").astype(jnp.float32)}
        if self.mlm is not None:
            heads["mlm"] = self.mlm(x_btd[:, x_btd.shape[1] - input_ids.shape[1] :], self.embed.token)
        return ModelOutput(
            logits=heads["itm"],
            hidden_states=x_btd,
            pooled=pooled_bd,
            heads=heads,
            attention_weights={"encoder": weights} if return_weights else None,
        )
