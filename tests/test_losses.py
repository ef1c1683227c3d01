"""Losses against NumPy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ref_cross_entropy(logits, targets, weights, label_smoothing=0.0, z_loss=0.0):
    logits = logits.astype(np.float64)
    v = logits.shape[-1]
    logp = _log_softmax(logits)
    onehot = np.eye(v)[targets]
    soft = (1 - label_smoothing) * onehot + label_smoothing / v
    log_z = np.log(np.exp(logits).sum(-1))
    per = -(soft * logp).sum(-1) + z_loss * log_z**2
    w = np.ones(targets.shape) if weights is None else weights.astype(np.float64)
    denom = w.sum() if w.sum() > 0 else 1.0
    acc = ((logits.argmax(-1) == targets) * w).sum() / denom
    return (per * w).sum() / denom, acc, (z_loss * log_z**2 * w).sum() / denom, w.sum()


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (0.2, 1e-2)])
@pytest.mark.parametrize("use_weights", [False, True])
def test_cross_entropy_matches_numpy(label_smoothing, z_loss, use_weights):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 5))
    weights = (rng.random((3, 5)) < 0.7).astype(np.float32) if use_weights else None
    loss, aux = losses.cross_entropy(
        jnp.asarray(logits),
        jnp.asarray(targets),
        None if weights is None else jnp.asarray(weights),
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    ref, acc, zl, wsum = _ref_cross_entropy(logits, targets, weights, label_smoothing, z_loss)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], acc, atol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], zl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["weight_sum"], wsum)
    np.testing.assert_allclose(aux["loss_sum"], ref * wsum, rtol=1e-5, atol=1e-5)


def test_cross_entropy_bfloat16_logits_computed_in_float32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 7, 50)) * 4, jnp.bfloat16)
    targets = rng.integers(0, 50, (4, 7))
    loss, aux = losses.cross_entropy(logits, jnp.asarray(targets))
    assert loss.dtype == jnp.float32
    ref, *_ = _ref_cross_entropy(np.asarray(logits.astype(jnp.float32)), targets, None)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cross_entropy_zero_weights_is_safe_and_jits():
    logits = jnp.zeros((2, 3, 5))
    targets = jnp.zeros((2, 3), jnp.int32)
    loss, aux = jax.jit(lambda l, t, w: losses.cross_entropy(l, t, w))(logits, targets, jnp.zeros((2, 3)))
    assert float(loss) == 0.0 and np.isfinite(float(aux["accuracy"]))
    grads = jax.grad(lambda l: losses.cross_entropy(l, targets, jnp.zeros((2, 3)))[0])(logits)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_cross_entropy_gradient_matches_softmax_minus_onehot():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 9)).astype(np.float32)
    targets = rng.integers(0, 9, 6)
    g = jax.grad(lambda l: losses.cross_entropy(l, jnp.asarray(targets))[0])(jnp.asarray(logits))
    p = np.exp(_log_softmax(logits.astype(np.float64)))
    np.testing.assert_allclose(g, (p - np.eye(9)[targets]) / 6, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_matches_numpy_kl(temperature):
    rng = np.random.default_rng(3)
    s = rng.normal(size=(2, 4, 13)).astype(np.float32) * 2
    t = rng.normal(size=(2, 4, 13)).astype(np.float32) * 2
    w = (rng.random((2, 4)) < 0.6).astype(np.float32)
    logp = _log_softmax(t.astype(np.float64) / temperature)
    logq = _log_softmax(s.astype(np.float64) / temperature)
    kl = (np.exp(logp) * (logp - logq)).sum(-1) * temperature**2
    np.testing.assert_allclose(
        losses.distillation_loss(jnp.asarray(s), jnp.asarray(t), temperature=temperature),
        kl.mean(),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        losses.distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temperature=temperature),
        (kl * w).sum() / w.sum(),
        rtol=1e-5,
        atol=1e-6,
    )
    # Identical logits: zero loss; the teacher gets no gradient.
    assert abs(float(losses.distillation_loss(jnp.asarray(t), jnp.asarray(t), temperature=temperature))) < 1e-6
    g = jax.grad(lambda tt: losses.distillation_loss(jnp.asarray(s), tt, temperature=temperature))(jnp.asarray(t))
    assert np.all(np.asarray(g) == 0)


def test_contrastive_matches_numpy_infonce():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(8, 16)).astype(np.float32)
    b = (a + 0.5 * rng.normal(size=(8, 16))).astype(np.float32)
    temp = 0.1
    an = a / np.linalg.norm(a, axis=-1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=-1, keepdims=True)
    logits = (an.astype(np.float64) @ bn.T.astype(np.float64)) / temp
    idx = np.arange(8)
    ref = (-_log_softmax(logits)[idx, idx].mean() - _log_softmax(logits.T)[idx, idx].mean()) / 2
    got = losses.contrastive_loss(jnp.asarray(a), jnp.asarray(b), temperature=temp)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # Symmetric in (a, b), invariant to the embeddings' scale.
    np.testing.assert_allclose(
        losses.contrastive_loss(jnp.asarray(b), jnp.asarray(a) * 7.0, temperature=temp), ref, rtol=1e-5, atol=1e-5
    )
