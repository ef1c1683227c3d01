"""Losses, computed in float32 whatever the logits dtype.

Shapes: b batch, t sequence (any leading dims work where [...] is written), v vocab / classes,
m embedding dim.
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


def cross_entropy(logits: Array, targets: Array, weights: Array | None = None, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
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
    log_z = jax.nn.logsumexp(logits, axis=-1)                                   # [...]
    # The target's logit as a masked sum, not a gather: its gradient is then elementwise (it fuses
    # with the softmax's) instead of a scatter into a zero [..., v] array.
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None].astype(jnp.int32)
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    nll = log_z - target_logit
    if label_smoothing:
        real = logits > MASKED_LOGIT / 2                                        # [..., v]
        mean_logit = (jnp.sum(jnp.where(real, logits, 0.0), axis=-1)
                      / jnp.maximum(jnp.sum(real, axis=-1), 1).astype(jnp.float32))
        nll = (1.0 - label_smoothing) * nll - label_smoothing * (mean_logit - log_z)
    z_term = z_loss * jnp.square(log_z)
    per_token = nll + z_term
    weight_sum = jnp.sum(w)
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
    loss_sum = jnp.sum(per_token * w)
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)  # the argmax (ties count), without its index
    aux = {
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "accuracy": jnp.sum(correct * w) / denom,
        "z_loss": jnp.sum(z_term * w) / denom,
    }
    return loss_sum / denom, aux


def distillation_loss(student_logits: Array, teacher_logits: Array, weights: Array | None = None, *,
                      temperature: float = 1.0) -> Array:
    """Hinton et al.: KL(softmax(teacher / T) || softmax(student / T)) * T^2, weighted mean over [...].

    The teacher gets no gradient.
    """
    t = jnp.float32(temperature)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_p = jax.nn.log_softmax(teacher / t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * t * t              # [...]
    w = _weights(weights, kl.shape)
    weight_sum = jnp.sum(w)
    return jnp.sum(kl * w) / jnp.where(weight_sum > 0, weight_sum, 1.0)


def contrastive_loss(a: Array, b: Array, *, temperature: float | Array = 0.07) -> Array:
    """Symmetric in-batch InfoNCE (CLIP): row i of `a` [b, m] is the positive of row i of `b` [b, m].

    Embeddings are L2-normalised; logits = a_n b_n^T / temperature (a float or a traced,
    e.g. learned, scalar); the loss is the mean of the a->b and b->a cross-entropies against
    the diagonal.
    """
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    logits = jnp.einsum("im,jm->ij", a, b) / temperature                         # [b, b]
    labels = jnp.arange(logits.shape[0])
    loss_ab, _ = cross_entropy(logits, labels)
    loss_ba, _ = cross_entropy(logits.T, labels)
    return (loss_ab + loss_ba) / 2
