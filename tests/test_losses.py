"""Losses against NumPy float64 references and small cases worked by hand."""

import math

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


def test_distillation_by_hand_shows_the_t_squared_factor():
    # T = 2: teacher logits [2, 0] -> p = softmax([1, 0]); student logits [0, 2] -> q = softmax([0, 1])
    e = math.e
    p = [e / (e + 1), 1 / (e + 1)]
    q = [1 / (1 + e), e / (1 + e)]
    kl = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])
    got = losses.distillation_loss(jnp.array([[0.0, 2.0]]), jnp.array([[2.0, 0.0]]), temperature=2.0)
    np.testing.assert_allclose(got, 4.0 * kl, rtol=1e-6)
    # at T = 1 the factor is 1: p = softmax([2, 0]), q = softmax([0, 2]) = p reversed
    p1 = [e**2 / (e**2 + 1), 1 / (e**2 + 1)]
    kl1 = p1[0] * math.log(p1[0] / p1[1]) + p1[1] * math.log(p1[1] / p1[0])
    got1 = losses.distillation_loss(jnp.array([[0.0, 2.0]]), jnp.array([[2.0, 0.0]]), temperature=1.0)
    np.testing.assert_allclose(got1, kl1, rtol=1e-6)


def test_contrastive_infonce_2x2_by_hand():
    # a = [(1, 0), (0, 1)], b = [(1, 0), (1, 1) / sqrt(2)], T = 1: logits a.b^T = [[1, s], [0, s]], s = 1/sqrt(2)
    s = 1 / math.sqrt(2)
    a_to_b = (-math.log(math.exp(1) / (math.exp(1) + math.exp(s))) - math.log(math.exp(s) / (1 + math.exp(s)))) / 2
    b_to_a = (-math.log(math.exp(1) / (math.exp(1) + 1)) - math.log(math.exp(s) / (math.exp(s) + math.exp(s)))) / 2
    got = losses.contrastive_loss(
        jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([[1.0, 0.0], [1.0, 1.0]]), temperature=1.0
    )
    np.testing.assert_allclose(got, (a_to_b + b_to_a) / 2, rtol=1e-6)


def test_supcon_by_hand():
    # four unit vectors at 0, 60, 180 and 270 degrees:
    # z0 = (1, 0), z1 = (1/2, sqrt(3)/2), z2 = (-1, 0), z3 = (0, -1); labels [0, 0, 1, 1]; T = 1.
    # dot products: z0.z1 = 1/2, z0.z2 = -1, z0.z3 = 0, z1.z2 = -1/2, z1.z3 = -sqrt(3)/2, z2.z3 = 0.
    r = math.sqrt(3) / 2
    exp = math.exp
    anchor0 = -math.log(exp(0.5) / (exp(0.5) + exp(-1) + exp(0)))
    anchor1 = -math.log(exp(0.5) / (exp(0.5) + exp(-0.5) + exp(-r)))
    anchor2 = -math.log(exp(0) / (exp(-1) + exp(-0.5) + exp(0)))
    anchor3 = -math.log(exp(0) / (exp(0) + exp(-r) + exp(0)))
    want = (anchor0 + anchor1 + anchor2 + anchor3) / 4
    z = jnp.array([[1.0, 0.0], [0.5, r], [-1.0, 0.0], [0.0, -1.0]])
    got = losses.supcon_loss(z, jnp.array([0, 0, 1, 1]), temperature=1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # row 3 at weight 0: anchor 2 loses its only positive and row 3 leaves every contrast set
    anchor0 = -math.log(exp(0.5) / (exp(0.5) + exp(-1)))
    anchor1 = -math.log(exp(0.5) / (exp(0.5) + exp(-0.5)))
    got = losses.supcon_loss(z, jnp.array([0, 0, 1, 1]), jnp.array([1.0, 1.0, 1.0, 0.0]), temperature=1.0)
    np.testing.assert_allclose(got, (anchor0 + anchor1) / 2, rtol=1e-6)


def _ref_supcon(z, labels, weights, temperature):
    z = z.astype(np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    sim = z @ z.T / temperature
    per_anchor = []
    for i in range(len(z)):
        if weights[i] <= 0:
            continue
        others = [a for a in range(len(z)) if a != i and weights[a] > 0]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        log_denom = np.log(np.sum(np.exp([sim[i, a] for a in others])))
        per_anchor.append(-np.mean([sim[i, p] - log_denom for p in positives]))
    return np.mean(per_anchor) if per_anchor else 0.0


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_matches_numpy_loop(temperature):
    rng = np.random.default_rng(5)
    z = rng.normal(size=(12, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 12)
    weights = (rng.random(12) < 0.75).astype(np.float32)
    got = losses.supcon_loss(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(weights), temperature=temperature)
    np.testing.assert_allclose(got, _ref_supcon(z, labels, weights, temperature), rtol=1e-5, atol=1e-5)
    got = losses.supcon_loss(jnp.asarray(z), jnp.asarray(labels), temperature=temperature)
    np.testing.assert_allclose(got, _ref_supcon(z, labels, np.ones(12), temperature), rtol=1e-5, atol=1e-5)
    # bfloat16 embeddings are computed in float32
    assert losses.supcon_loss(jnp.asarray(z, jnp.bfloat16), jnp.asarray(labels)).dtype == jnp.float32


def test_supcon_without_positives_is_zero_with_finite_gradients():
    rng = np.random.default_rng(6)
    z = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32).at[3].set(0.0)  # a zero (padding) row too
    cases = [
        (jnp.array([0, 1, 2, 3]), None),  # every label once
        (jnp.array([0, 0, 1, 1]), jnp.array([1.0, 0.0, 1.0, 0.0])),  # the positives are padding
        (jnp.array([0, 0, 0, 0]), jnp.zeros(4)),  # nothing real
    ]
    for labels, weights in cases:
        loss, grads = jax.value_and_grad(lambda zz: losses.supcon_loss(zz, labels, weights))(z)
        assert float(loss) == 0.0
        assert np.all(np.isfinite(np.asarray(grads)))
    single = jax.grad(lambda zz: losses.supcon_loss(zz, jnp.array([0])))(z[:1])  # one row: no contrast set
    assert np.all(np.isfinite(np.asarray(single)))
    # a zero row among real ones keeps the gradient finite
    g = jax.grad(lambda zz: losses.supcon_loss(zz, jnp.array([0, 0, 1, 1])))(z)
    assert np.all(np.isfinite(np.asarray(g)))


def test_supcon_is_invariant_to_the_embeddings_scale():
    rng = np.random.default_rng(7)
    z = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.01, 100.0, (10, 1)), jnp.float32)  # per row, too
    labels = jnp.asarray(rng.integers(0, 3, 10))
    base = losses.supcon_loss(z, labels, temperature=0.2)
    np.testing.assert_allclose(losses.supcon_loss(z * 7.0, labels, temperature=0.2), base, rtol=1e-5)
    np.testing.assert_allclose(losses.supcon_loss(z * scale, labels, temperature=0.2), base, rtol=1e-5)
