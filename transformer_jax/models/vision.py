"""Vision models for image-text pretraining, on the same blocks as the text models, and their objectives.

- `PatchEmbed` (ViT): images [b, H, W, C] -> [b, 1 + N, m]: N = (H/p)(W/p) patches of p*p*C values
  each through one kernel [p*p*C, m] (the einsum form of a stride-p convolution), a learned class
  token in front, learned positions.
- `ViT`: PatchEmbed + `models.common.Stack`.
- `VisionLanguage` (family `vision_language`): single-stream fusion. Image patch tokens and text
  tokens, each with a modality (type) embedding, go through one bidirectional `Stack`; the image
  class token (position 0) feeds the binary ITM head; the text positions an optional MLM head. The
  same stack run on one modality alone gives unimodal embeddings for image-text contrastive
  learning (ITC) through two projections and a learned temperature (`itc_encoder: fusion`), or a
  `DualEncoder` inside the model gives them (`itc_encoder: dual`).
- `DualEncoder` (family `dual_encoder`): CLIP. A ViT image tower and a text encoder tower
  (`models.encoder.Encoder`), projections, a learned temperature.

Objectives (pure JAX over a module and a batch): `contrastive_loss` (symmetric InfoNCE; captions
sharing a `pair_id` are all positives), `mine_negatives` (in-batch ITM negatives: the most similar
by ITC, sampled by similarity, or uniform), `vision_language_loss` (ITC + ITM + MLM),
`dual_encoder_loss` (ITC), and `retrieval_recall` / `chance_recall` for held-out retrieval.

Batches: `pixels` [b, H, W, C] (uint8 0..255, or floats already in [-1, 1]), `input_ids`,
`attention_mask` [b, t] (the caption, [CLS] first), `pair_id` [b] (examples with equal ids
describe the same image content: never each other's negatives), `example_weight` [b] (0 on
padding rows), and for MLM `mlm_input_ids`, `mlm_targets`, `mlm_weights` [b, t].
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_jax import attention as attn
from transformer_jax.config import ModelConfig
from transformer_jax.layers import Dense, Embed, Norm, param
from transformer_jax.models.common import Embedder, ModelOutput, Stack, default_positions, dtype_of, \
    sequence_lengths
from transformer_jax.models.encoder import Encoder, MLMHead, Pooler, label_head

Array = jax.Array

TEXT, IMAGE = 0, 1  # modality ids
MIN_TEMPERATURE = 0.01  # CLIP clips its logit scale at 100


def num_patches(cfg: ModelConfig) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def patchify(images: Array, patch: int) -> Array:
    """[b, H, W, C] -> [b, (H/p)(W/p), p*p*C]: patches in row-major order, each flattened (row, col, channel)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


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
    """ViT's input: patches through a kernel [p*p*C, m] plus a bias, a class token, learned positions."""

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
            raise ValueError(f"pixels have shape {pixels.shape[1:]}, the model expects "
                             f"{(cfg.image_size, cfg.image_size, cfg.num_channels)} (model.image_size, num_channels)")
        x = self.projection(patchify(normalize_pixels(pixels, dtype), cfg.patch_size), "bnk,km->bnm")
        cls = jnp.broadcast_to(self.class_token[...].astype(dtype), (x.shape[0], 1, cfg.model_dim))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position(jnp.arange(x.shape[1]), dtype)[None]
        return self.norm(x) if self.norm is not None else x


class ViT(nnx.Module):
    """Vision Transformer: PatchEmbed + the shared bidirectional Stack. Output [b, 1 + N, m]; the
    class token's state (position 0) summarises the image."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross_attention=False, rngs=rngs)

    def __call__(self, pixels: Array, dropout_rng=None, return_weights: bool = False):
        x = self.patch_embed(pixels)
        positions = default_positions(x[..., 0])
        x, _, weights = self.encoder(x, positions=positions, mask=attn.Mask(), dropout_rng=dropout_rng,
                                     return_weights=return_weights)
        return x, weights


def _projection(cfg: ModelConfig, rngs: nnx.Rngs) -> Dense:
    return Dense((cfg.model_dim, cfg.projection_dim or cfg.model_dim), ("embed", None), use_bias=False,
                 bias_ndim=1, cfg=cfg, rngs=rngs)


def _log_temperature(cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.asarray(math.log(cfg.temperature_init), jnp.float32), axes=())


class _Contrastive:
    """What both families share: normalised projections and the learned temperature."""

    def temperature(self) -> Array:
        return jnp.exp(jnp.maximum(self.log_temperature[...], math.log(MIN_TEMPERATURE)))

    def similarity(self, image_embeds: Array, text_embeds: Array) -> Array:
        """[b_i, p], [b_t, p] (normalised) -> logits [b_i, b_t] = cosine / temperature, float32."""
        return jnp.einsum("ip,jp->ij", image_embeds, text_embeds) / self.temperature()


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
        """Normalised image embeddings [b, p] (float32)."""
        x, _ = self.vision(pixels, dropout_rng)
        return _l2_normalize(self.image_projection(x[:, 0], "bm,mp->bp"))

    def embed_text(self, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """Normalised text embeddings [b, p] (float32) from the [CLS] position."""
        x = self.text(input_ids, attention_mask=attention_mask, dropout_rng=dropout_rng).hidden_states
        return _l2_normalize(self.text_projection(x[:, 0], "bm,mp->bp"))

    def __call__(self, pixels: Array, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None,
                 return_weights: bool = False) -> ModelOutput:
        """logits: image-to-text similarity [b, b] over the temperature; heads: the embeddings."""
        rngs = [None, None] if dropout_rng is None else list(jax.random.split(dropout_rng))
        image, text = self.embed_image(pixels, rngs[0]), self.embed_text(input_ids, attention_mask, rngs[1])
        return ModelOutput(logits=self.similarity(image, text),
                           heads={"image_embeds": image, "text_embeds": text, "temperature": self.temperature()})


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
            self.dual = DualEncoder(cfg, rngs=rngs)
            self.image_projection = self.text_projection = self.log_temperature = None
        else:
            self.dual = None
            self.image_projection = _projection(cfg, rngs)
            self.text_projection = _projection(cfg, rngs)
            self.log_temperature = _log_temperature(cfg)

    # -- tokens and the stack
    def _image_tokens(self, pixels: Array) -> Array:
        x = self.patch_embed(pixels)
        return x + self.modality(jnp.full(x.shape[:2], IMAGE, jnp.int32), x.dtype)

    def _text_tokens(self, input_ids: Array, dropout_rng=None) -> Array:
        x = self.embed(input_ids, default_positions(input_ids), None, dropout_rng)
        return x + self.modality(jnp.full(input_ids.shape, TEXT, jnp.int32), x.dtype)

    def _run(self, x: Array, key_mask: Array | None, dropout_rng=None, return_weights=False):
        mask = attn.Mask(kv_lengths=sequence_lengths(key_mask))
        return self.encoder(x, positions=default_positions(x[..., 0]), mask=mask, dropout_rng=dropout_rng,
                            return_weights=return_weights)

    def _rngs(self, dropout_rng, n):
        return [None] * n if dropout_rng is None else list(jax.random.split(dropout_rng, n))

    def encode_image(self, pixels: Array, dropout_rng=None) -> Array:
        """The fusion stack on the image alone: [b, 1 + N, m]."""
        return self._run(self._image_tokens(pixels), None, dropout_rng)[0]

    def encode_text(self, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """The fusion stack on the text alone: [b, t, m]."""
        rngs = self._rngs(dropout_rng, 2)
        return self._run(self._text_tokens(input_ids, rngs[0]), attention_mask, rngs[1])[0]

    def fuse(self, pixels: Array, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None,
             return_weights: bool = False):
        """Image and text in one sequence: hidden [b, 1 + N + t, m] (image first) and attention weights."""
        rngs = self._rngs(dropout_rng, 2)
        image, text = self._image_tokens(pixels), self._text_tokens(input_ids, rngs[0])
        key_mask = None
        if attention_mask is not None:
            key_mask = jnp.concatenate([jnp.ones(image.shape[:2], attention_mask.dtype), attention_mask], axis=1)
        x, _, weights = self._run(jnp.concatenate([image, text], axis=1), key_mask, rngs[1], return_weights)
        return x, weights

    # -- heads
    def embed_image(self, pixels: Array, dropout_rng=None) -> Array:
        """Normalised ITC image embeddings [b, p] (float32)."""
        if self.dual is not None:
            return self.dual.embed_image(pixels, dropout_rng)
        return _l2_normalize(self.image_projection(self.encode_image(pixels, dropout_rng)[:, 0], "bm,mp->bp"))

    def embed_text(self, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """Normalised ITC text embeddings [b, p] (float32), from the [CLS] position."""
        if self.dual is not None:
            return self.dual.embed_text(input_ids, attention_mask, dropout_rng)
        return _l2_normalize(self.text_projection(self.encode_text(input_ids, attention_mask, dropout_rng)[:, 0],
                                                  "bm,mp->bp"))

    def temperature(self) -> Array:
        return self.dual.temperature() if self.dual is not None else _Contrastive.temperature(self)

    def _pool(self, x: Array) -> Array:
        return self.pooler(x) if self.pooler is not None else x[:, 0]

    def match(self, pixels: Array, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """ITM logits [b, 2] (index 1: the caption describes the image)."""
        x, _ = self.fuse(pixels, input_ids, attention_mask, dropout_rng)
        return self.itm(self._pool(x), "bm,mn->bn").astype(jnp.float32)

    def masked_lm(self, pixels: Array, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None) -> Array:
        """MLM logits [b, t, v] over the caption, conditioned on the image."""
        if self.mlm is None:
            raise ValueError("this model has no mlm head (model.heads)")
        x, _ = self.fuse(pixels, input_ids, attention_mask, dropout_rng)
        return self.mlm(x[:, x.shape[1] - input_ids.shape[1]:], self.embed.token)

    def __call__(self, pixels: Array, input_ids: Array, attention_mask: Array | None = None, dropout_rng=None,
                 return_weights: bool = False) -> ModelOutput:
        """logits: ITM [b, 2]; hidden_states: the fused sequence; heads: itm (and mlm [b, t, v])."""
        x, weights = self.fuse(pixels, input_ids, attention_mask, dropout_rng, return_weights)
        pooled = self._pool(x)
        heads = {"itm": self.itm(pooled, "bm,mn->bn").astype(jnp.float32)}
        if self.mlm is not None:
            heads["mlm"] = self.mlm(x[:, x.shape[1] - input_ids.shape[1]:], self.embed.token)
        return ModelOutput(logits=heads["itm"], hidden_states=x, pooled=pooled, heads=heads,
                           attention_weights={"encoder": weights} if return_weights else None)


# ----------------------------------------------------------------------------- objectives
def _batch_defaults(batch: dict) -> tuple[Array, Array]:
    b = batch["input_ids"].shape[0]
    weights = batch.get("example_weight")
    weights = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    pair_ids = batch.get("pair_id")
    return weights, jnp.arange(b) if pair_ids is None else pair_ids


def _masked_logsumexp(x: Array, mask: Array, axis: int) -> Array:
    return jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), axis=axis)


def contrastive_loss(logits: Array, pair_ids: Array, weights: Array | None = None) -> tuple[Array, dict]:
    """Symmetric InfoNCE over similarity logits [b, b] (image i, text j; already over the temperature).

    Text j is a positive of image i when pair_ids match (the diagonal, and duplicates of the same
    content: -log of the softmax mass on all positives); rows and columns of weight 0 (padding) take
    no part. Returns (mean of the image->text and text->image losses, {itc_accuracy}: the share of
    argmaxes that are positives, both directions averaged).
    """
    logits = logits.astype(jnp.float32)
    b = logits.shape[0]
    w = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    valid = (w[:, None] > 0) & (w[None, :] > 0)
    positive = (pair_ids[:, None] == pair_ids[None, :]) & valid
    denom = jnp.maximum(jnp.sum(w), 1e-9)
    # a padding row (column) sums over everything instead: finite values (and gradients) at weight 0
    real, eye = w > 0, jnp.eye(b, dtype=bool)
    i2t = (_masked_logsumexp(logits, jnp.where(real[:, None], valid, True), 1)
           - _masked_logsumexp(logits, jnp.where(real[:, None], positive, eye), 1))
    t2i = (_masked_logsumexp(logits, jnp.where(real[None, :], valid, True), 0)
           - _masked_logsumexp(logits, jnp.where(real[None, :], positive, eye), 0))
    loss = (jnp.sum(i2t * w) + jnp.sum(t2i * w)) / (2 * denom)
    masked = jnp.where(valid, logits, -jnp.inf)
    hit_i2t = jnp.take_along_axis(positive, jnp.argmax(masked, 1)[:, None], 1)[:, 0]
    hit_t2i = jnp.take_along_axis(positive, jnp.argmax(masked, 0)[None, :], 0)[0]
    accuracy = jnp.sum((hit_i2t.astype(jnp.float32) + hit_t2i.astype(jnp.float32)) * w) / (2 * denom)
    return loss, {"itc_accuracy": accuracy}


def mine_negatives(logits: Array, pair_ids: Array, weights: Array, mode: str = "hard",
                   rng: Array | None = None) -> tuple[Array, Array, Array, Array]:
    """In-batch ITM negatives from similarity logits [b, b] (no gradient flows through them).

    For each image i a caption j (and for each caption j an image i) with another pair_id and a
    non-zero weight: `hard` the most similar, `sampled` drawn with probability softmax(logits) over
    the candidates (ALBEF), `random` drawn uniformly, `mixed` sampled or uniform by a fair coin per
    example (a small model learns from the easy half what the hard half alone does not teach it).
    Without `rng` (eval) every mode is `hard`.
    Returns (text index per image [b], image index per text [b], and for each whether a candidate
    existed [b] (bool, twice)).
    """
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    allowed = (pair_ids[:, None] != pair_ids[None, :]) & (weights[None, :] > 0) & (weights[:, None] > 0)
    if rng is None or mode == "hard":
        pick_t = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=1)
        pick_i = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=0)
    else:
        k_t, k_i, k_coin = jax.random.split(rng, 3)
        scores = logits if mode in ("sampled", "mixed") else jnp.zeros_like(logits)
        if mode == "mixed":  # rows (texts for images) and columns (images for texts) flip their own coins
            uniform = jax.random.bernoulli(k_coin, 0.5, (2, logits.shape[0]))
            scores_t = jnp.where(uniform[0][:, None], 0.0, scores)
            scores_i = jnp.where(uniform[1][None, :], 0.0, scores)
        else:
            scores_t = scores_i = scores
        pick_t = jax.random.categorical(k_t, jnp.where(allowed, scores_t, -jnp.inf), axis=1)
        pick_i = jax.random.categorical(k_i, jnp.where(allowed, scores_i, -jnp.inf), axis=0)
    return pick_t, pick_i, jnp.any(allowed, axis=1), jnp.any(allowed, axis=0)


def itm_batch(batch: dict, text_for_image: Array, image_for_text: Array) -> dict:
    """The 3b ITM pairs: (image i, caption i) positives, (image i, caption text_for_image[i]) and
    (image image_for_text[j], caption j) negatives."""
    take = lambda x, idx: jnp.take(x, idx, axis=0)
    pixels, ids, mask = batch["pixels"], batch["input_ids"], batch["attention_mask"]
    return {"pixels": jnp.concatenate([pixels, pixels, take(pixels, image_for_text)]),
            "input_ids": jnp.concatenate([ids, take(ids, text_for_image), ids]),
            "attention_mask": jnp.concatenate([mask, take(mask, text_for_image), mask])}


def itm_loss(logits: Array, weights: Array, has_text_negative: Array, has_image_negative: Array
             ) -> tuple[Array, dict]:
    """Binary cross-entropy over the 3b ITM pairs of `itm_batch`, positives and negatives weighing
    the same in total (each negative counts half); accuracy likewise balanced (chance 0.5)."""
    from transformer_jax import losses
    b = weights.shape[0]
    labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
    neg_w = jnp.concatenate([weights * has_text_negative, weights * has_image_negative]) * 0.5
    loss, _ = losses.cross_entropy(logits, labels, jnp.concatenate([weights, neg_w]))
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    pos = jnp.sum(correct[:b] * weights) / jnp.maximum(jnp.sum(weights), 1e-9)
    neg = jnp.sum(correct[b:] * neg_w) / jnp.maximum(jnp.sum(neg_w), 1e-9)
    return loss, {"itm_accuracy": (pos + neg) / 2, "itm_positive_accuracy": pos, "itm_negative_accuracy": neg}


def vision_language_loss(module: VisionLanguage, batch: dict, dropout_rng=None, *, itm_weight: float = 1.0,
                         itc_weight: float = 1.0, mlm_weight: float = 0.0, negatives: str = "sampled"
                         ) -> tuple[Array, dict]:
    """ITC + ITM (+ MLM) of a VisionLanguage module on a batch: (weighted total, metrics)."""
    from transformer_jax import losses
    rngs = [None] * 5 if dropout_rng is None else list(jax.random.split(dropout_rng, 5))
    weights, pair_ids = _batch_defaults(batch)
    total, metrics = jnp.zeros((), jnp.float32), {}
    need_similarity = itc_weight > 0 or (itm_weight > 0 and negatives != "random")
    if need_similarity:
        image = module.embed_image(batch["pixels"], rngs[0])
        text = module.embed_text(batch["input_ids"], batch["attention_mask"], rngs[1])
        logits = module.similarity(image, text)
    else:
        b = batch["input_ids"].shape[0]
        logits = jnp.zeros((b, b), jnp.float32)
    if itc_weight > 0:
        value, aux = contrastive_loss(logits, pair_ids, weights)
        total += itc_weight * value
        metrics.update(itc_loss=value, temperature=module.temperature(), **aux)
    if itm_weight > 0:
        text_for_image, image_for_text, has_t, has_i = mine_negatives(logits, pair_ids, weights, negatives, rngs[2])
        pairs = itm_batch(batch, text_for_image, image_for_text)
        itm_logits = module.match(pairs["pixels"], pairs["input_ids"], pairs["attention_mask"], rngs[3])
        value, aux = itm_loss(itm_logits, weights, has_t, has_i)
        total += itm_weight * value
        metrics.update(itm_loss=value, **aux)
    if mlm_weight > 0:
        logits_mlm = module.masked_lm(batch["pixels"], batch["mlm_input_ids"], batch["attention_mask"], rngs[4])
        value, aux = losses.cross_entropy(logits_mlm, batch["mlm_targets"], batch["mlm_weights"] * weights[:, None])
        total += mlm_weight * value
        metrics.update(mlm_loss=value, mlm_accuracy=aux["accuracy"])
    return total, metrics


def dual_encoder_loss(module: DualEncoder, batch: dict, dropout_rng=None) -> tuple[Array, dict]:
    """CLIP's symmetric InfoNCE with the learned temperature: (loss, metrics)."""
    weights, pair_ids = _batch_defaults(batch)
    out = module(batch["pixels"], batch["input_ids"], batch["attention_mask"], dropout_rng)
    value, aux = contrastive_loss(out.logits, pair_ids, weights)
    return value, {"itc_loss": value, "temperature": out.heads["temperature"], **aux}


# ----------------------------------------------------------------------------- retrieval
def retrieval_recall(similarity: np.ndarray, match: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Recall@k both ways from similarity [n_images, n_texts] and match [n_images, n_texts] (bool:
    the text describes the image). image->text: the share of images with a matching text among
    their k most similar texts; text->image the same over columns."""
    sim, match = np.asarray(similarity, np.float64), np.asarray(match, bool)
    out = {}
    for k in ks:
        top_t = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        top_i = np.argsort(-sim, axis=0, kind="stable")[:k, :]
        out[f"i2t_recall{k}"] = float(np.mean(np.take_along_axis(match, top_t, 1).any(1)))
        out[f"t2i_recall{k}"] = float(np.mean(np.take_along_axis(match, top_i, 0).any(0)))
    return out


def chance_recall(match: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Expected recall@k of a random ranking: 1 - C(n - m, k) / C(n, k) per query with m matches."""
    match = np.asarray(match, bool)

    def expected(counts, n, k):
        return float(np.mean([1.0 - math.comb(n - m, k) / math.comb(n, k) for m in counts]))
    out = {}
    for k in ks:
        out[f"i2t_recall{k}"] = expected(match.sum(1), match.shape[1], k)
        out[f"t2i_recall{k}"] = expected(match.sum(0), match.shape[0], k)
    return out
