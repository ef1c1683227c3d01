"""Image-text pretraining objectives: ITM + ITC (+ masked LM on the captions) on a single-stream
vision-language model (`itm`), or CLIP-style contrastive learning on a dual encoder (`itc`).

Held-out figures (`evaluate`): retrieval recall@1 / @5 image->text and text->image over the whole
held-out set by ITC similarity (and their chance levels), ITM accuracy (balanced: chance 0.5) with
each image's hardest held-out negative caption and each caption's hardest negative image
(`itm_hard_accuracy`) and with random ones (`itm_random_accuracy`); on the shapes data also the share
of each image's caption one edit away that ITM rejects, by the edit (`itm_edited_colour_negative_accuracy`,
shape, relation, swap).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import config as config_lib
from transformer_jax import decoding, losses
from transformer_jax import metrics as metrics_lib
from transformer_jax.config import Config, ConfigError
from transformer_jax.data import images
from transformer_jax.data.pipeline import ResumableIterator, process_rows
from transformer_jax.models import abstract_build, build, vision
from transformer_jax.tasks.base import LossFn, Objective, Shapes, Task, split_batch, tokenizer_for

Array = jax.Array
EMBEDDED_EXAMPLES = 20000  # generated training examples of the shapes dataset (data.max_documents: 0)
TOKENIZER_EXAMPLES = 5000


def with_itm_heads(cfg: Config) -> Config:
    """Masked LM (itm.mlm_weight > 0) adds the mlm head to the model."""
    if cfg.itm.mlm_weight > 0 and "mlm" not in cfg.model.heads:
        return config_lib.replace(cfg, model=dict(heads=cfg.model.heads + ("mlm",)))
    return cfg


def load_sources(cfg: Config) -> tuple[images.ImageCaptions, images.ImageCaptions]:
    """(train, held-out) image-caption sources."""
    d, m = cfg.data, cfg.model
    if d.source == "embedded":  # the data set itself does not depend on train.seed: only its order does
        train = images.shapes_dataset(d.max_documents or EMBEDDED_EXAMPLES, image_size=m.image_size, split="train")
        return train, images.shapes_dataset(d.eval_documents, image_size=m.image_size, split="eval")
    if d.source != "tfds":
        raise ConfigError(f"data.source: image-text pretraining reads embedded or tfds data, got {d.source}")
    kw: dict[str, Any] = dict(
        data_dir=d.data_dir or None, image_feature=cfg.itm.image_feature, caption_feature=cfg.itm.caption_feature
    )
    train = images.tfds_image_captions(d.tfds_name, split=d.split, max_examples=d.max_documents or None, **kw)
    if d.eval_split:
        return train, images.tfds_image_captions(d.tfds_name, split=d.eval_split, max_examples=d.eval_documents, **kw)
    num_eval = min(d.eval_documents, max(1, len(train) // 10))
    if len(train) < 2:
        raise ValueError(f"{train.name} has {len(train)} example: too few to hold some out (set data.eval_split)")
    return (
        train.select(range(len(train) - num_eval)),
        train.select(range(len(train) - num_eval, len(train)), f"{train.name} (held out)"),
    )


# ----------------------------------------------------------------------------- losses
def _batch_defaults(batch: dict) -> tuple[Array, Array]:
    b = batch["input_ids"].shape[0]
    weights = batch.get("example_weight")
    weights = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    pair_ids = batch.get("pair_id")
    return weights, jnp.arange(b) if pair_ids is None else pair_ids


def mine_negatives(
    logits: Array, pair_ids: Array, weights: Array, mode: str = "hard", rng: Array | None = None
) -> tuple[Array, Array, Array, Array]:
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
    return {
        "pixels": jnp.concatenate([pixels, pixels, take(pixels, image_for_text)]),
        "input_ids": jnp.concatenate([ids, take(ids, text_for_image), ids]),
        "attention_mask": jnp.concatenate([mask, take(mask, text_for_image), mask]),
    }


def vision_language_loss(
    module: vision.VisionLanguage,
    batch: dict,
    dropout_rng=None,
    *,
    itm_weight: float = 1.0,
    itc_weight: float = 1.0,
    mlm_weight: float = 0.0,
    negatives: str = "sampled",
    caption_negatives: float = 0.0,
    itc_caption_negatives: bool = False,
) -> tuple[Array, dict]:
    """ITC + ITM (+ MLM) of a VisionLanguage module on a batch: (weighted total, metrics).
    caption_negatives > 0: each image also meets its caption one edit away (the batch's
    negative_input_ids) and each caption that edited caption's image (negative_pixels), those pairs
    holding that share of the ITM negatives' weight; itc_caption_negatives: the edited caption is also
    one more text in its image's ITC softmax (NegCLIP)."""
    rngs = [None] * 5 if dropout_rng is None else list(jax.random.split(dropout_rng, 5))
    weights, pair_ids = _batch_defaults(batch)
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, Array] = {}
    need_similarity = itc_weight > 0 or (itm_weight > 0 and negatives != "random")
    if need_similarity:
        image = module.embed_image(batch["pixels"], rngs[0])
        text = module.embed_text(batch["input_ids"], batch["attention_mask"], rngs[1])
        logits = module.similarity(image, text)
    else:
        b = batch["input_ids"].shape[0]
        logits = jnp.zeros((b, b), jnp.float32)
    if itc_weight > 0:
        extra = None
        if itc_caption_negatives:  # NegCLIP: each image's edited caption, one more text in its softmax
            edited = module.embed_text(batch["negative_input_ids"], batch["negative_attention_mask"], rngs[1])
            extra = jnp.einsum("BE,BE->B", image, edited) / module.temperature()
        value, aux = losses.itc_loss(logits, pair_ids, weights, extra)
        total += itc_weight * value
        metrics.update(itc_loss=value, temperature=module.temperature(), **aux)
    if itm_weight > 0:
        text_for_image, image_for_text, has_t, has_i = mine_negatives(logits, pair_ids, weights, negatives, rngs[2])
        pairs = itm_batch(batch, text_for_image, image_for_text)
        has_e = None
        if caption_negatives > 0:  # (image, edited caption) and (the edited caption's image, caption)
            pairs = {
                "pixels": jnp.concatenate([pairs["pixels"], batch["pixels"], batch["negative_pixels"]]),
                "input_ids": jnp.concatenate([pairs["input_ids"], batch["negative_input_ids"], batch["input_ids"]]),
                "attention_mask": jnp.concatenate(
                    [pairs["attention_mask"], batch["negative_attention_mask"], batch["attention_mask"]]
                ),
            }
            has_e = weights > 0
        itm_logits = module.match(pairs["pixels"], pairs["input_ids"], pairs["attention_mask"], rngs[3])
        value, aux = losses.itm_loss(itm_logits, weights, has_t, has_i, has_e, caption_negatives)
        if has_e is not None:
            b = weights.shape[0]
            rejected = (jnp.argmax(itm_logits[3 * b :], -1) == 0).astype(jnp.float32).reshape(2, b)
            for k, kind in enumerate(("caption", "image")):
                aux[f"itm_edited_{kind}_accuracy"] = jnp.sum(rejected[k] * weights) / jnp.maximum(
                    jnp.sum(weights), 1e-9
                )
        total += itm_weight * value
        metrics.update(itm_loss=value, **aux)
    if mlm_weight > 0:
        logits_mlm = module.masked_lm(batch["pixels"], batch["mlm_input_ids"], batch["attention_mask"], rngs[4])
        value, aux = losses.cross_entropy(logits_mlm, batch["mlm_targets"], batch["mlm_weights"] * weights[:, None])
        total += mlm_weight * value
        metrics.update(mlm_loss=value, mlm_accuracy=aux["accuracy"])
    return total, metrics


def dual_encoder_loss(module: vision.DualEncoder, batch: dict, dropout_rng=None) -> tuple[Array, dict]:
    """CLIP's symmetric InfoNCE with the learned temperature: (loss, metrics)."""
    weights, pair_ids = _batch_defaults(batch)
    out = module(batch["pixels"], batch["input_ids"], batch["attention_mask"], dropout_rng)
    assert out.logits is not None and out.heads is not None  # a DualEncoder returns both
    value, aux = losses.itc_loss(out.logits, pair_ids, weights)
    return value, {"itc_loss": value, "temperature": out.heads["temperature"], **aux}


def objective_loss_fn(cfg: Config):
    i = cfg.itm

    def loss_fn(model, params, batch, dropout_rng):
        module = model.module(params)
        if cfg.model.family == "dual_encoder":
            loss, metrics = dual_encoder_loss(module, batch, dropout_rng)
            loss = i.itc_weight * loss
        else:
            loss, metrics = vision_language_loss(
                module,
                batch,
                dropout_rng,
                itm_weight=i.itm_weight,
                itc_weight=i.itc_weight,
                mlm_weight=i.mlm_weight,
                negatives=i.negatives,
                caption_negatives=i.caption_negatives,
                itc_caption_negatives=i.itc_caption_negatives,
            )
        return loss, {**metrics, "loss": loss}

    return loss_fn


def make_evaluate(cfg: Config, model, held_out: dict[str, np.ndarray], batch_size: int):
    """evaluate(params) -> held-out retrieval recall@1/5 both ways (and chance), ITM accuracy with hard
    and random negatives. Jitted once; the set goes through in fixed-size chunks."""
    embed_image = jax.jit(lambda p, x: model.module(p).embed_image(x))
    embed_text = jax.jit(lambda p, ids, mask: model.module(p).embed_text(ids, mask))
    match_prob = jax.jit(lambda p, x, ids, mask: jax.nn.softmax(model.module(p).match(x, ids, mask))[:, 1])
    n = len(held_out["pair_id"])
    pair = held_out["pair_id"]
    matches = pair[:, None] == pair[None, :]
    chance = metrics_lib.chance_recall(matches)

    def chunked(fn, params, *arrays):  # sharded params stay on their mesh, each chunk split over it
        out = []
        for start in range(0, len(arrays[0]), batch_size):
            part = [a[start : start + batch_size] for a in arrays]
            short = batch_size - len(part[0])
            part = [np.concatenate([a, np.repeat(a[-1:], short, 0)]) if short else a for a in part]
            out.append(decoding.on_mesh(fn, params, *part)[: batch_size - short])
        return np.concatenate(out)

    def evaluate(params) -> dict:
        image = chunked(embed_image, params, held_out["pixels"])
        text = chunked(embed_text, params, held_out["input_ids"], held_out["attention_mask"])
        sim = image @ text.T
        metrics = metrics_lib.retrieval_recall(sim, matches)
        metrics.update({f"chance_{k}": v for k, v in chance.items()})
        if cfg.model.family != "vision_language" or n < 2:
            return metrics
        candidates = np.where(matches, -np.inf, sim)
        rng = np.random.default_rng(0)
        random_scores = np.where(matches, -np.inf, rng.random(sim.shape))
        negatives = {
            "hard": (candidates.argmax(1), candidates.argmax(0)),
            "random": (random_scores.argmax(1), random_scores.argmax(0)),
        }
        px, ids, mask = held_out["pixels"], held_out["input_ids"], held_out["attention_mask"]
        positive = chunked(match_prob, params, px, ids, mask) > 0.5
        metrics["itm_match_accuracy"] = float(positive.mean())
        for kind, (text_for_image, image_for_text) in negatives.items():
            neg_t = chunked(match_prob, params, px, ids[text_for_image], mask[text_for_image]) <= 0.5
            neg_i = chunked(match_prob, params, px[image_for_text], ids, mask) <= 0.5
            negative = float(np.concatenate([neg_t, neg_i]).mean())
            metrics[f"itm_{kind}_negative_accuracy"] = negative
            metrics[f"itm_{kind}_accuracy"] = (metrics["itm_match_accuracy"] + negative) / 2
        if "negative_kind" in held_out:  # the shapes data: each image with its caption one edit away
            ids, mask = held_out["negative_input_ids"], held_out["negative_attention_mask"]
            rejected = chunked(match_prob, params, px, ids, mask) <= 0.5
            for k, kind in enumerate(images.NEGATIVE_KINDS):
                of_kind = held_out["negative_kind"] == k
                if of_kind.any():
                    metrics[f"itm_edited_{kind}_negative_accuracy"] = float(rejected[of_kind].mean())
        return metrics

    return evaluate


def make_task(cfg: Config, workdir: str) -> tuple[Config, Task]:
    if cfg.train.objective not in ("itm", "itc"):
        raise ConfigError(f"train.objective: image-text pretraining is itm or itc, got {cfg.train.objective}")
    cfg = with_itm_heads(cfg)
    train_source, eval_source = load_sources(cfg)
    tokenizer = tokenizer_for(cfg, workdir, images.caption_corpus(train_source, TOKENIZER_EXAMPLES))
    t, m, processes = cfg.train, cfg.model, jax.process_count()
    common: dict[str, Any] = dict(
        seq_len=cfg.data.seq_len,
        image_size=m.image_size,
        num_channels=m.num_channels,
        batch_size=split_batch(cfg),
        mlm=cfg.itm.mlm_weight > 0 and m.family == "vision_language",
        mask_rate=cfg.itm.mask_rate,
        caption_negatives=cfg.itm.caption_negatives > 0 and m.family == "vision_language",
        seed=t.seed,
    )
    train_data = images.make_dataset(
        train_source, tokenizer, process_index=jax.process_index(), process_count=processes, **common
    )
    model, _ = abstract_build(cfg)
    # every process reads the whole held-out set in global batches and keeps its rows of each
    eval_data = images.make_eval_dataset(eval_source, tokenizer, **{**common, "batch_size": t.batch_size})
    held_out = images.encode_all(
        eval_source, tokenizer, seq_len=cfg.data.seq_len, image_size=m.image_size, num_channels=m.num_channels
    )
    edited = images.edited_captions(eval_source, tokenizer, seq_len=cfg.data.seq_len)
    if edited is not None and m.family == "vision_language":
        held_out.update(edited)
    task = Task(
        model=model,
        init_params=lambda rng: build(cfg, rng)[1],
        loss_fn=objective_loss_fn(cfg),
        train_batches=ResumableIterator(train_data),
        eval_batches=lambda: process_rows(eval_data, jax.process_index(), processes),
        evaluate=make_evaluate(cfg, model, held_out, t.batch_size),
        best_metric="loss",
    )
    return cfg, task


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTextObjective(Objective):
    def with_heads(self, cfg: Config) -> Config:
        return with_itm_heads(cfg)

    def loss_fn(self, cfg: Config) -> LossFn:
        return objective_loss_fn(cfg)

    def make_task(self, cfg: Config, workdir: str) -> tuple[Config, Task]:
        return make_task(cfg, workdir)

    def batch_shapes(self, cfg: Config, batch_size: int) -> Shapes:
        b, s, m = batch_size, cfg.data.seq_len, cfg.model
        u8, i32, f32 = np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.float32)
        shapes: Shapes = {
            "pixels": ((b, m.image_size, m.image_size, m.num_channels), u8),
            "input_ids": ((b, s), i32),
            "attention_mask": ((b, s), i32),
            "pair_id": ((b,), i32),
            "example_weight": ((b,), f32),
        }
        if cfg.itm.mlm_weight > 0 and m.family == "vision_language":
            shapes.update(mlm_input_ids=((b, s), i32), mlm_targets=((b, s), i32), mlm_weights=((b, s), f32))
        if cfg.itm.caption_negatives > 0 and m.family == "vision_language":
            shapes.update(
                negative_input_ids=((b, s), i32),
                negative_attention_mask=((b, s), i32),
                negative_pixels=((b, m.image_size, m.image_size, m.num_channels), u8),
            )
        return shapes


ITM = ImageTextObjective(name="itm", family="vision_language")
ITC = ImageTextObjective(name="itc", family="dual_encoder")
