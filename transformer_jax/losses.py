"""Losses, computed in float32 whatever the logits dtype: the primitives (cross-entropy,
distillation, contrastive: InfoNCE and supervised contrastive) and the finetuning task losses built
on them (`hard_loss`, `distill_term`; `finetune.make_loss_fn` assembles the finetuning objective
from these).

Shapes: b batch, t sequence (any leading dims work where [...] is written), v vocab / classes,
m embedding dim, n labels, s passage length (QA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# The value masked logits take (the vocabulary padding, `layers.mask_padded_vocab`; QA padding):
# finite, so no inf - inf NaN anywhere; exp() of it is 0 in float32. Columns at or below half of
# it are no classes to `cross_entropy`'s label smoothing.
MASKED_LOGIT = -1e9


def _weights(weights: Array | None, shape) -> Array:
    return jnp.ones(shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)


def cross_entropy(
    logits: Array, targets: Array, weights: Array | None = None, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, dict[str, Array]]:
    """Weighted mean softmax cross-entropy of logits [..., v] against int targets [...].

    label_smoothing: the target distribution is (1 - ls) one-hot + ls / v uniform (as
    optax.smooth_labels / T5X), v counting only the unmasked columns (logits above
    MASKED_LOGIT / 2): padded vocabulary ids get no mass. z_loss: adds z_loss *
    log(sum(exp(logits)))^2 per token (PaLM, T5X), which keeps the softmax normaliser near 1. The
    mean divides by sum(weights), or by 1 where that sum is 0. Returns (mean loss, aux) with
    aux = {loss_sum, weight_sum, accuracy (weighted, of the argmax), z_loss (its weighted mean)}.
    """
    logits = logits.astype(jnp.float32)
    w = _weights(weights, targets.shape)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
    # The target's logit as a masked sum, not a gather: its gradient is then elementwise (it fuses
    # with the softmax's) instead of a scatter into a zero [..., v] array.
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None].astype(jnp.int32)
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    nll = log_z - target_logit
    if label_smoothing:
        real = logits > MASKED_LOGIT / 2  # [..., v]
        mean_logit = jnp.sum(jnp.where(real, logits, 0.0), axis=-1) / jnp.maximum(jnp.sum(real, axis=-1), 1).astype(
            jnp.float32
        )
        nll = (1.0 - label_smoothing) * nll - label_smoothing * (mean_logit - log_z)
    z_term = z_loss * jnp.square(log_z)
    per_token = nll + z_term
    weight_sum = jnp.sum(w)
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
    loss_sum = jnp.sum(per_token * w)
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(
        jnp.float32
    )  # the argmax (ties count), without its index
    aux = {
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "accuracy": jnp.sum(correct * w) / denom,
        "z_loss": jnp.sum(z_term * w) / denom,
    }
    return loss_sum / denom, aux


def distillation_loss(
    student_logits: Array, teacher_logits: Array, weights: Array | None = None, *, temperature: float = 1.0
) -> Array:
    """Hinton et al.: KL(softmax(teacher / T) || softmax(student / T)) * T^2, weighted mean over [...].

    The teacher gets no gradient.
    """
    t = jnp.float32(temperature)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_p = jax.nn.log_softmax(teacher / t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * t * t  # [...]
    w = _weights(weights, kl.shape)
    weight_sum = jnp.sum(w)
    return jnp.sum(kl * w) / jnp.where(weight_sum > 0, weight_sum, 1.0)


def contrastive_loss(a: Array, b: Array, *, temperature: float | Array = 0.07) -> Array:
    """Symmetric in-batch InfoNCE (CLIP): row i of `a` [b, m] is the positive of row i of `b` [b, m].

    Embeddings are L2-normalised; logits = a_n b_n^T / temperature (a float or a traced,
    e.g. learned, scalar); the loss is the mean of the a->b and b->a cross-entropies against
    the diagonal.
    """
    a_ie = a.astype(jnp.float32)
    b_je = b.astype(jnp.float32)
    a_ie = a_ie / jnp.maximum(jnp.linalg.norm(a_ie, axis=-1, keepdims=True), 1e-12)
    b_je = b_je / jnp.maximum(jnp.linalg.norm(b_je, axis=-1, keepdims=True), 1e-12)
    logits_ij = jnp.einsum("IE,JE->IJ", a_ie, b_je) / temperature
    labels = jnp.arange(logits_ij.shape[0])
    loss_ab, _ = cross_entropy(logits_ij, labels)
    loss_ba, _ = cross_entropy(logits_ij.T, labels)
    return (loss_ab + loss_ba) / 2


def supcon_loss(
    z_bm: Array, labels_b: Array, weights_b: Array | None = None, *, temperature: float | Array = 0.1
) -> Array:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out) of embeddings z [b, m] with int
    labels [b].

    Embeddings are L2-normalised. Rows of weight 0 (padding) take no part: only weight > 0
    counts, not its size. For an anchor i, the positives P(i) are the other rows with its label,
    the contrast set A(i) all other rows; loss_i = -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / T) /
    sum_{a in A(i)} exp(z_i.z_a / T)). The loss is the mean over the anchors with a positive (the
    others contribute nothing); 0, with finite gradients, when no anchor has one. Float32.
    """
    z_bm = z_bm.astype(jnp.float32)
    # x / max(|x|, eps) through the squared norm: a zero row (padding) gets a finite gradient too
    z_bm = z_bm * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(z_bm), axis=-1, keepdims=True), 1e-24))
    b = z_bm.shape[0]
    real_b = _weights(weights_b, (b,)) > 0
    contrast_bc = ~jnp.eye(b, dtype=bool) & real_b[None, :]  # A(i): c runs over the same rows as b
    positive_bc = contrast_bc & (labels_b[:, None] == labels_b[None, :]) & real_b[:, None]
    logits_bc = jnp.einsum("BM,CM->BC", z_bm, z_bm) / temperature
    # MASKED_LOGIT, not -inf: an anchor with an empty contrast set (b = 1) stays finite
    log_denom_b = jax.nn.logsumexp(jnp.where(contrast_bc, logits_bc, MASKED_LOGIT), axis=-1)
    log_prob_bc = logits_bc - log_denom_b[:, None]
    num_positive_b = jnp.sum(positive_bc, axis=-1).astype(jnp.float32)
    per_anchor_b = -jnp.sum(jnp.where(positive_bc, log_prob_bc, 0.0), axis=-1) / jnp.maximum(num_positive_b, 1.0)
    anchor_b = (num_positive_b > 0).astype(jnp.float32)
    return jnp.sum(per_anchor_b * anchor_b) / jnp.maximum(jnp.sum(anchor_b), 1.0)


# ----------------------------------------------------------------------------- finetuning task losses
def mask_padding(logits: Array, attention_mask: Array) -> Array:
    """Logits [b, s] as float32 plus MASKED_LOGIT where attention_mask [b, s] is 0 (QA span ends
    never point into padding)."""
    return logits.astype(jnp.float32) + jnp.where(attention_mask > 0, 0.0, MASKED_LOGIT)


def _qa_logits(qa: dict, attention_mask: Array) -> dict:
    return {k: mask_padding(qa[k], attention_mask) for k in ("start", "end")}


def hard_loss(kind: str, out, batch: dict, *, label_smoothing: float = 0.0) -> tuple[Array, dict]:
    """The supervised loss of a task head (a weighted mean over real examples) and its metrics.

    out is `finetune.task_outputs(kind, ...)`: label logits [b, n] (classification), predictions
    [b] (regression), token logits [b, t, n] (token_classification), {'start', 'end'} [b, s] (qa),
    LM logits [b, t, v] (text_to_text). batch carries example_weight [b] and the kind's labels.
    """
    w = batch["example_weight"]
    if kind == "classification":
        loss, aux = cross_entropy(out, batch["labels"], w, label_smoothing=label_smoothing)
        return loss, {"accuracy": aux["accuracy"]}
    if kind == "regression":
        err = jnp.square(out.astype(jnp.float32) - batch["labels"].astype(jnp.float32))
        return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0), {}
    if kind == "token_classification":
        loss, aux = cross_entropy(
            out, batch["labels"], batch["label_weights"] * w[:, None], label_smoothing=label_smoothing
        )
        return loss, {"accuracy": aux["accuracy"]}
    if kind == "qa":
        logits = _qa_logits(out, batch["attention_mask"])
        start, aux_s = cross_entropy(logits["start"], batch["start_positions"], w, label_smoothing=label_smoothing)
        end, aux_e = cross_entropy(logits["end"], batch["end_positions"], w, label_smoothing=label_smoothing)
        return (start + end) / 2, {"accuracy": (aux_s["accuracy"] + aux_e["accuracy"]) / 2}
    if kind == "text_to_text":
        loss, aux = cross_entropy(
            out, batch["targets"], batch["target_weights"] * w[:, None], label_smoothing=label_smoothing
        )
        return loss, {"accuracy": aux["accuracy"]}
    raise ValueError(f"unknown task kind {kind!r}")


def distill_term(kind: str, out, teacher, batch: dict, temperature: float) -> Array:
    """KL(teacher_T || student_T) * T^2 (Hinton) on the head's logits; MSE to the teacher's
    prediction for regression. out and teacher as in `hard_loss`."""
    w = batch["example_weight"]
    if kind == "regression":
        err = jnp.square(out.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32))
        return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)
    if kind == "qa":
        student = _qa_logits(out, batch["attention_mask"])
        teacher = _qa_logits(teacher, batch["attention_mask"])
        start, end = (distillation_loss(student[k], teacher[k], w, temperature=temperature) for k in ("start", "end"))
        return (start + end) / 2
    if kind == "token_classification":
        return distillation_loss(out, teacher, batch["label_weights"] * w[:, None], temperature=temperature)
    if kind == "text_to_text":  # token logits: a teacher padded to another vocab_multiple compares over the
        v = min(out.shape[-1], teacher.shape[-1])  # narrower width (its extra columns are masked padding)
        return distillation_loss(
            out[..., :v], teacher[..., :v], batch["target_weights"] * w[:, None], temperature=temperature
        )
    return distillation_loss(out, teacher, w, temperature=temperature)


# ----------------------------------------------------------------------------- image-text
def _masked_logsumexp(x: Array, mask: Array, axis: int) -> Array:
    return jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), axis=axis)


def itc_loss(
    logits: Array, pair_ids: Array, weights: Array | None = None, extra_text_logits: Array | None = None
) -> tuple[Array, dict]:
    """Symmetric InfoNCE over similarity logits [b, b] (image i, text j; already over the temperature).

    Text j is a positive of image i when pair_ids match (the diagonal, and duplicates of the same
    content: -log of the softmax mass on all positives); rows and columns of weight 0 (padding) take
    no part. extra_text_logits [b]: one more negative text per image (NegCLIP's edited caption) in
    its image->text softmax. Returns (mean of the image->text and text->image losses, {itc_accuracy}:
    the share of in-batch argmaxes that are positives, both directions averaged).
    """
    logits = logits.astype(jnp.float32)
    b = logits.shape[0]
    w = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    valid = (w[:, None] > 0) & (w[None, :] > 0)
    positive = (pair_ids[:, None] == pair_ids[None, :]) & valid
    denom = jnp.maximum(jnp.sum(w), 1e-9)
    # a padding row (column) sums over everything instead: finite values (and gradients) at weight 0
    real, eye = w > 0, jnp.eye(b, dtype=bool)
    all_i2t = _masked_logsumexp(logits, jnp.where(real[:, None], valid, True), 1)
    if extra_text_logits is not None:
        all_i2t = jnp.logaddexp(all_i2t, extra_text_logits.astype(jnp.float32))
    i2t = all_i2t - _masked_logsumexp(logits, jnp.where(real[:, None], positive, eye), 1)
    t2i = _masked_logsumexp(logits, jnp.where(real[None, :], valid, True), 0) - _masked_logsumexp(
        logits, jnp.where(real[None, :], positive, eye), 0
    )
    loss = (jnp.sum(i2t * w) + jnp.sum(t2i * w)) / (2 * denom)
    masked = jnp.where(valid, logits, -jnp.inf)
    hit_i2t = jnp.take_along_axis(positive, jnp.argmax(masked, 1)[:, None], 1)[:, 0]
    hit_t2i = jnp.take_along_axis(positive, jnp.argmax(masked, 0)[None, :], 0)[0]
    accuracy = jnp.sum((hit_i2t.astype(jnp.float32) + hit_t2i.astype(jnp.float32)) * w) / (2 * denom)
    return loss, {"itc_accuracy": accuracy}


def itm_loss(
    logits: Array,
    weights: Array,
    has_text_negative: Array,
    has_image_negative: Array,
    has_edited_negative: Array | None = None,
    edited_share: float = 0.0,
) -> tuple[Array, dict]:
    """Binary cross-entropy over the ITM pairs of `itm_batch`: b positives, b text and b image
    negatives (and with has_edited_negative b edited-caption and b edited-image negatives, holding
    `edited_share` of the negatives' weight, half each), positives and negatives weighing the same in
    total (the text and image negatives half each of the rest); accuracy likewise balanced (chance 0.5)."""
    b = weights.shape[0]
    rest = 1.0 - edited_share if has_edited_negative is not None else 1.0
    negatives = [weights * has_text_negative * rest / 2, weights * has_image_negative * rest / 2]
    if has_edited_negative is not None:
        negatives += [weights * has_edited_negative * edited_share / 2] * 2
    neg_w = jnp.concatenate(negatives)
    labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((len(negatives) * b,), jnp.int32)])
    loss, _ = cross_entropy(logits, labels, jnp.concatenate([weights, neg_w]))
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    pos = jnp.sum(correct[:b] * weights) / jnp.maximum(jnp.sum(weights), 1e-9)
    neg = jnp.sum(correct[b:] * neg_w) / jnp.maximum(jnp.sum(neg_w), 1e-9)
    return loss, {"itm_accuracy": (pos + neg) / 2, "itm_positive_accuracy": pos, "itm_negative_accuracy": neg}
