"""Tests for transformer_jax.attention against independent references.

References: a NumPy float64 implementation of softmax(Q K^T / sqrt(d_k) + bias) V written here
(own GQA handling by repeating kv heads, own masking), and `jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from transformer_jax import attention as A

TOL = 1e-5
SEEDS = (0, 1, 2)
VARIANTS = ("mask", "bias", "causal", "all")


def enable_x64():
    """float64 inside a `with` block: `jax.enable_x64` where it exists (it does in jax 0.10), else the
    older `jax.experimental.enable_x64`."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # pragma: no cover - older jax

    return legacy()


# ----------------------------------------------------------------------------- NumPy reference
def ref_attention(q, k, v, mask=None, bias=None, causal=False, scale=None):
    """float64 softmax(q k^T * scale + bias) v. q [b,t,h,d], k/v [b,s,kv,d]; mask True = attend.

    Returns (out [b,t,h,d], weights [b,h,t,s], allowed [b,h,t,s]); a row with no allowed key
    gets zero weights and a zero output.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    assert h % kv == 0
    # GQA: query head i reads kv head i // (h // kv).
    k = np.repeat(k, h // kv, axis=2)
    v = np.repeat(v, h // kv, axis=2)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    allowed = np.ones((b, h, t, s), bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask).astype(bool), (b, h, t, s))
    if causal:
        allowed &= np.tril(np.ones((t, s), bool))[None, None]
    masked = np.where(allowed, logits, -np.inf)
    row_max = masked.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(allowed, np.exp(masked - row_max), 0.0)
    denom = e.sum(axis=-1, keepdims=True)
    weights = e / np.where(denom > 0, denom, 1.0)
    out = np.einsum("bhts,bshd->bthd", weights, v)
    return out, weights, allowed


def ref_mha(params, xq, xkv=None, mask=None, causal=False):
    """float64 multi-head attention with the projections done here."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xq = np.asarray(xq, np.float64)
    xkv = xq if xkv is None else np.asarray(xkv, np.float64)

    def proj(name, x, spec):
        y = np.einsum(spec, x, p[name]["kernel"])
        return y + p[name]["bias"] if "bias" in p[name] else y

    q = proj("query", xq, "btm,mhd->bthd")
    k = proj("key", xkv, "bsm,mkd->bskd")
    v = proj("value", xkv, "bsm,mkd->bskd")
    o, w, _ = ref_attention(q, k, v, mask=mask, causal=causal)
    return proj("out", o, "bthd,hdm->btm"), w


# ----------------------------------------------------------------------------- cases
def shapes_for(seed):
    rng = np.random.default_rng(3000 + seed)
    kv = int(rng.integers(1, 4))
    g = int(rng.integers(1, 4))
    return dict(
        b=int(rng.integers(1, 4)),
        t=int(rng.integers(1, 8)),
        s=int(rng.integers(2, 10)),
        h=kv * g,
        kv=kv,
        d=int(rng.choice([4, 8, 16])),
    )


def make_case(seed, variant, *, fully_masked_rows=True):
    """Random q, k, v (float32 numpy) and the mask / bias / causal flags of one variant."""
    sh = shapes_for(seed)
    b, t, s, h, kv, d = (sh[n] for n in "b t s h kv d".split())
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, kv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kv, d)).astype(np.float32)
    mask = bias = None
    causal = variant in ("causal", "all")
    if variant in ("mask", "all"):
        # "mask" uses [b,h,t,s], [b,1,1,s], [b,1,t,s] over seeds 0-2; "all" uses [b,1,t,s], [t,s], [b,h,t,s]
        mask_shape = [(b, h, t, s), (b, 1, 1, s), (b, 1, t, s), (t, s)][(seed + 2 * (variant == "all")) % 4]
        mask = rng.random(mask_shape) < 0.7
        if fully_masked_rows:  # some query rows with no key at all
            if mask.ndim == 2:
                mask[-1, :] = False
            elif mask_shape[2] == 1:
                mask[0] = False
            else:
                mask[-1, 0, -1, :] = False
        else:  # every row keeps key 0 (which causal also keeps)
            mask[..., 0] = True
    if variant in ("bias", "all"):
        bias_shape = [(1, h, t, s), (b, h, t, s), (b, 1, 1, s)][seed % 3]
        bias = rng.normal(size=bias_shape).astype(np.float32)
    return q, k, v, mask, bias, causal


def as_jnp(x):
    return None if x is None else jnp.asarray(x)


# One compile per shape and flag set: much cheaper on CPU than eager op-by-op for new shapes.
dpa = jax.jit(
    A.dot_product_attention, static_argnames=("causal", "dropout_rate", "implementation", "return_weights", "scale")
)


def test_seed_shapes_cover_gqa_mha_and_ragged_lengths():
    shapes = [shapes_for(s) for s in SEEDS]
    assert len({tuple(sh.values()) for sh in shapes}) == len(SEEDS)
    assert any(sh["h"] > sh["kv"] > 1 for sh in shapes)  # grouped-query attention
    assert any(sh["h"] == sh["kv"] for sh in shapes)  # plain multi-head
    assert any(sh["kv"] == 1 and sh["h"] > 1 for sh in shapes)  # multi-query
    assert any(sh["t"] < sh["s"] for sh in shapes) and any(sh["t"] > sh["s"] for sh in shapes)


def test_reference_is_the_textbook_formula():
    """Sanity check of the reference itself on a single head without masks."""
    rng = np.random.default_rng(7)
    q, k, v = rng.normal(size=(1, 3, 1, 4)), rng.normal(size=(1, 5, 1, 4)), rng.normal(size=(1, 5, 1, 4))
    logits = q[0, :, 0] @ k[0, :, 0].T / 2.0
    w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    out, weights, _ = ref_attention(q, k, v)
    np.testing.assert_allclose(weights[0, 0], w, atol=1e-12)
    np.testing.assert_allclose(out[0, :, 0], w @ v[0, :, 0], atol=1e-12)


# ----------------------------------------------------------------------------- 1. vs NumPy
@functools.cache
def seed_results(seed):
    """Every variant of one seed through every path, in ONE jit (one compile per seed keeps the
    file fast). Keys (variant, fully_masked_rows). With fully-masked rows: (explicit out, explicit
    weights, our "xla" route out). Without: (explicit out, jax.nn.dot_product_attention out)."""
    cases = {(var, dead): make_case(seed, var, fully_masked_rows=dead) for var in VARIANTS for dead in (True, False)}
    arrays = {key: tuple(as_jnp(x) for x in c[:5]) for key, c in cases.items()}

    def run(arrays):
        res = {}
        for (var, dead), (q, k, v, mask, bias) in arrays.items():
            causal = cases[(var, dead)][5]
            kw = dict(mask=mask, bias=bias, causal=causal)
            if dead:
                out, w = A.dot_product_attention(q, k, v, return_weights=True, **kw)
                res[(var, dead)] = (out, w, A.dot_product_attention(q, k, v, implementation="xla", **kw))
            else:
                b, t, h, _ = q.shape
                s = k.shape[1]
                full_mask = None if mask is None else jnp.broadcast_to(mask, (b, h, t, s))
                full_bias = None if bias is None else jnp.broadcast_to(bias, (b, h, t, s))
                ref = jax.nn.dot_product_attention(
                    q, k, v, bias=full_bias, mask=full_mask, is_causal=causal, implementation=None
                )
                res[(var, dead)] = (A.dot_product_attention(q, k, v, **kw), ref)
        return res

    return cases, jax.device_get(jax.jit(run)(arrays))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_numpy_reference(seed, variant):
    cases, results = seed_results(seed)
    q, k, v, mask, bias, causal = cases[(variant, True)]
    out, w, _ = results[(variant, True)]
    want_out, want_w, allowed = ref_attention(q, k, v, mask=mask, bias=bias, causal=causal)
    b, t, h, d = q.shape
    s = k.shape[1]
    chex.assert_shape(out, (b, t, h, d))
    chex.assert_shape(w, (b, h, t, s))
    assert out.dtype == np.float32 and w.dtype == np.float32
    assert np.isfinite(out).all() and np.isfinite(w).all()
    err_out = np.abs(out - want_out).max()
    err_w = np.abs(w - want_w).max()
    assert err_out <= TOL, err_out
    assert err_w <= TOL, err_w
    # Rows sum to 1, or are all zeros when nothing may be attended to.
    has_key = allowed.any(-1)
    np.testing.assert_allclose(w.sum(-1), has_key.astype(np.float32), atol=TOL)
    assert (w[~allowed] == 0).all()  # masked keys get exactly zero weight
    if variant in ("mask", "all"):
        assert (~has_key).any()  # the case does contain fully-masked rows ...
        dead_q = ~has_key.transpose(0, 2, 1)  # [b, t, h]
        assert (out[dead_q] == 0).all()  # ... and they give zeros


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_scale_argument_and_out_only_call(seed):
    q, k, v, mask, bias, _ = make_case(seed, "all")
    want, _, _ = ref_attention(q, k, v, mask=mask, bias=bias, scale=0.37)
    out = dpa(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=as_jnp(mask), bias=as_jnp(bias), scale=0.37)
    assert not isinstance(out, tuple)
    np.testing.assert_allclose(np.asarray(out), want, atol=TOL)


def test_heads_not_multiple_of_kv_heads_raises():
    q = jnp.zeros((1, 2, 3, 4))
    kv = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="multiple"):
        A.dot_product_attention(q, kv, kv)


@pytest.mark.parametrize("return_weights", [False, True])
def test_unknown_implementation_raises(return_weights):
    x = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="implementation"):
        A.dot_product_attention(x, x, x, implementation="flash", return_weights=return_weights)


# ----------------------------------------------------------------------------- 2. vs jax.nn
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_jax_nn(seed, variant):
    """jax.nn.dot_product_attention averages fully-masked rows, so these cases have none."""
    cases, results = seed_results(seed)
    q, k, v, mask, bias, causal = cases[(variant, False)]
    ours, want = results[(variant, False)]
    chex.assert_equal_shape([ours, want, q])
    err = np.abs(ours - want).max()
    assert err <= TOL, err
    assert np.abs(ours - ref_attention(q, k, v, mask=mask, bias=bias, causal=causal)[0]).max() <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_xla_route_equals_explicit_path(seed, variant):
    cases, results = seed_results(seed)
    q, k, v, mask, bias, causal = cases[(variant, True)]  # with fully-masked rows
    explicit, _, fused = results[(variant, True)]
    want, _, allowed = ref_attention(q, k, v, mask=mask, bias=bias, causal=causal)
    err = np.abs(fused - explicit).max()
    assert err <= TOL, err
    assert np.abs(fused - want).max() <= TOL
    dead_q = ~allowed.any(-1).transpose(0, 2, 1)
    assert (fused[dead_q] == 0).all() and (explicit[dead_q] == 0).all()


def test_integer_mask_accepted_by_both_paths():
    """A 0/1 integer mask (e.g. a tokenizer's attention_mask) means the same as a boolean one."""
    q, k, v, mask, _, _ = make_case(0, "mask")
    want, _, _ = ref_attention(q, k, v, mask=mask)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    int_mask = jnp.asarray(mask.astype(np.int32))
    for impl in (None, "xla"):
        out = dpa(*args, mask=int_mask, implementation=impl)
        np.testing.assert_allclose(np.asarray(out), want, atol=TOL)


def test_xla_route_falls_back_for_weights():
    q, k, v, mask, bias, causal = make_case(1, "all")
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    out, w = dpa(*args, mask=as_jnp(mask), bias=as_jnp(bias), causal=causal, implementation="xla", return_weights=True)
    want_out, want_w, _ = ref_attention(q, k, v, mask=mask, bias=bias, causal=causal)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=TOL)
    np.testing.assert_allclose(np.asarray(w), want_w, atol=TOL)


def test_xla_route_gradients_match_explicit_path():
    q, k, v, mask, bias, causal = make_case(0, "all")
    rng = np.random.default_rng(5)
    cot = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))

    def loss(q, k, v, bias, impl):
        out = A.dot_product_attention(q, k, v, mask=as_jnp(mask), bias=bias, causal=causal, implementation=impl)
        return jnp.sum(out * cot)

    args = tuple(jnp.asarray(x) for x in (q, k, v, bias))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    g_explicit = grad(*args, None)
    g_fused = grad(*args, "xla")
    for a, b in zip(g_explicit, g_fused):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


# ----------------------------------------------------------------------------- 3. gradients
@pytest.mark.parametrize("seed,variant", [(0, "all"), (1, "all")])
def test_numerical_gradients_float64(seed, variant):
    q, k, v, mask, bias, causal = make_case(seed, variant)
    if bias is None:
        bias = np.random.default_rng(seed).normal(size=(1, q.shape[2], q.shape[1], k.shape[1]))
    with enable_x64():
        args = tuple(jnp.asarray(x, jnp.float64) for x in (q, k, v, bias))
        jmask = as_jnp(mask)

        @jax.jit
        def f(q, k, v, bias):
            return A.dot_product_attention(q, k, v, mask=jmask, bias=bias, causal=causal)

        assert f(*args).dtype == jnp.float64
        check_grads(f, args, order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_float64_inputs_stay_float64():
    """Float64 inputs must not be demoted to float32 (the softmax is float32 *at least*)."""
    q, k, v, mask, bias, causal = make_case(2, "all")
    want_out, want_w, _ = ref_attention(q, k, v, mask=mask, bias=bias, causal=causal)
    with enable_x64():
        out, w = dpa(
            *(jnp.asarray(x, jnp.float64) for x in (q, k, v)),
            mask=as_jnp(mask),
            bias=jnp.asarray(bias, jnp.float64),
            causal=causal,
            return_weights=True,
        )
        assert out.dtype == jnp.float64 and w.dtype == jnp.float64
        err = max(np.abs(np.asarray(out) - want_out).max(), np.abs(np.asarray(w) - want_w).max())
    assert err <= 1e-12, err


# ----------------------------------------------------------------------------- 4. bfloat16
U_BF16 = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits, round to nearest
W_F32 = 1e-6  # float32 softmax weights against float64 on the same inputs (measured ~4e-8)


def abs_weighted(w_bhts, v_bskd):
    """sum_s w[b,h,t,s] |v[b,s,h,:]| -> [b,t,h,d], kv heads repeated for GQA: the scale of every
    rounding error in an attention output."""
    h, kv = w_bhts.shape[1], v_bskd.shape[2]
    return np.einsum("bhts,bshd->bthd", w_bhts, np.abs(np.repeat(np.asarray(v_bskd, np.float64), h // kv, axis=2)))


@pytest.mark.parametrize("seed", [2])  # the longest key sequence of the seeds
def test_bfloat16_inputs(seed):
    """bfloat16 q, k, v: logits and softmax in float32, the weights rounded to bfloat16 for the value
    matmul (float32 accumulation), the output rounded to bfloat16. So against the float64 reference
    on the bfloat16-rounded inputs each output element is off by at most 2u(1 + u) sum_s w_s |v_s|
    (u = 2^-8: one rounding of each weight, one of the result). Against the float32 run on the
    unrounded inputs, rounding q and k moves each logit by at most delta = (2u + u^2) scale
    sum_d |q_d k_d|, so each weight by a factor within exp(+-2 delta), and rounding v adds u |v|."""
    q, k, v, mask, bias, causal = make_case(seed, "all")
    f32 = [jnp.asarray(x) for x in (q, k, v)]
    bf16 = [x.astype(jnp.bfloat16) for x in f32]

    @jax.jit
    def run(f32, bf16, mask, bias):
        kw = dict(mask=mask, bias=bias, causal=causal)
        return (
            A.dot_product_attention(*f32, return_weights=True, **kw),
            A.dot_product_attention(*bf16, return_weights=True, **kw),
            A.dot_product_attention(*bf16, implementation="xla", **kw),
        )

    (out32, w32), (out16, w16), fused = run(f32, bf16, as_jnp(mask), as_jnp(bias))
    assert out16.dtype == jnp.bfloat16 and fused.dtype == jnp.bfloat16
    assert w16.dtype == jnp.float32  # softmax in float32
    out16, fused = (np.asarray(x.astype(jnp.float32)) for x in (out16, fused))
    out32, w16 = np.asarray(out32), np.asarray(w16)
    u = U_BF16
    rounded = [np.asarray(x, np.float64) for x in bf16]
    want, want_w, allowed = ref_attention(*rounded, mask=mask, bias=bias, causal=causal)
    err_w = np.abs(w16 - want_w).max()  # the float32 softmax: float32-accurate on the rounded inputs (below)
    slack = W_F32 * np.abs(rounded[2]).sum(1).max()  # what weights off by W_F32 can move an output by
    bound = 2 * u * (1 + u) * abs_weighted(want_w, rounded[2]) + slack
    ratio = (np.abs(out16 - want) / bound).max()
    print(f"\nbf16 out vs f64 on rounded inputs: max err {np.abs(out16 - want).max():.2e}, max err / bound {ratio:.3f}")
    assert ratio <= 1.0, ratio
    # the fused route is handed the bias in the inputs' dtype (_fused): its reference rounds it too
    bias16 = np.asarray(jnp.asarray(bias).astype(jnp.bfloat16), np.float64)
    want_f, want_fw, _ = ref_attention(*rounded, mask=mask, bias=bias16, causal=causal)
    ratio_f = (np.abs(fused - want_f) / (2 * u * (1 + u) * abs_weighted(want_fw, rounded[2]) + slack)).max()
    assert ratio_f <= 1.0, ratio_f
    # against float32 on the unrounded inputs
    scale = 1.0 / np.sqrt(q.shape[-1])
    h, kv = q.shape[2], k.shape[2]
    qk = np.einsum("bthd,bshd->bhts", np.abs(q.astype(np.float64)), np.abs(np.repeat(k.astype(np.float64), h // kv, 2)))
    delta = ((2 * u + u * u) * scale * np.where(allowed, qk, 0.0).max(-1)).transpose(0, 2, 1)[..., None]  # [b,t,h,1]
    _, exact_w, _ = ref_attention(q, k, v, mask=mask, bias=bias, causal=causal)
    # weights moved (expm1(2 delta)) times |v'| <= (1 + u)|v|; v rounded (u); the bf16 computation on the
    # rounded inputs (2u(1 + u) times sum_s w'|v'|, w' <= exp(2 delta) w); out32's own error (TOL)
    per_mag = np.expm1(2 * delta) * (1 + u) + u + 2 * u * (1 + u) ** 2 * np.exp(2 * delta)
    bound32 = per_mag * abs_weighted(exact_w, v) + slack + TOL
    err32 = np.abs(out16 - out32)
    ratio32 = (err32 / bound32).max()
    print(
        f"bf16 vs f32: max err {err32.max():.2e} (max |out32| {np.abs(out32).max():.2f}), max err / bound {ratio32:.3f}"
    )
    assert ratio32 <= 1.0, ratio32
    assert (np.abs(w16 - np.asarray(w32)) <= np.expm1(2 * delta.transpose(0, 2, 1, 3)) * np.asarray(w32) + 1e-6).all()
    assert err_w <= W_F32, err_w
    # Logits and softmax in float32 (err_w: the weights match the float64 reference on the
    # bf16-rounded inputs), rows normalised to float32 precision; a bfloat16 softmax would be off by
    # ~1e-3 and its weights would all be bfloat16-representable.
    has_key = allowed.any(-1)
    np.testing.assert_allclose(w16.sum(-1), has_key.astype(np.float32), atol=1e-5)
    inner = w16[(w16 > 0) & (w16 < 1)]
    assert inner.size and (inner != np.asarray(jnp.asarray(inner).astype(jnp.bfloat16), np.float32)).mean() > 0.5
    assert np.isfinite(out16).all() and np.isfinite(fused).all()


# ----------------------------------------------------------------------------- 5. dropout
def _identity_value_case(p_seed=0):
    """v = identity over keys, so the output rows ARE the (dropped) attention weights."""
    b, t, h, kv, s = 2, 3, 4, 2, 6
    rng = np.random.default_rng(p_seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, s)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(b, s, kv, s)).astype(np.float32))
    v = jnp.broadcast_to(jnp.eye(s, dtype=jnp.float32)[None, :, None, :], (b, s, kv, s))
    return q, k, v


def test_dropout_needs_rng():
    q, k, v = _identity_value_case()
    with pytest.raises(ValueError, match="dropout_rng"):
        jax.eval_shape(lambda q, k, v: A.dot_product_attention(q, k, v, dropout_rate=0.1), q, k, v)


def test_fused_route_refuses_dropout():
    """The fused kernels have no dropout: asking for it is one line, not a quiet explicit path."""
    q, k, v = _identity_value_case()
    for impl in ("xla", "cudnn", "tpu_flash"):
        with pytest.raises(ValueError, match=f"attention dropout \\(0.1\\) needs the explicit path: the {impl}"):
            jax.eval_shape(
                lambda q, k, v: A.dot_product_attention(
                    q, k, v, dropout_rate=0.1, implementation=impl, dropout_rng=jax.random.key(0)
                ),
                q,
                k,
                v,
            )


def test_dropout_deterministic_per_key_and_inverted_scaling():
    rate = 0.5
    q, k, v = _identity_value_case()

    @jax.jit  # one compile (threefry is slow to compile on CPU); called with several keys
    def run(key):
        drop = dict(dropout_rate=rate, dropout_rng=key)
        return dict(
            plain=A.dot_product_attention(q, k, v, return_weights=True),
            dropped=A.dot_product_attention(q, k, v, **drop),
            with_weights=A.dot_product_attention(q, k, v, return_weights=True, **drop),
            rate0=A.dot_product_attention(q, k, v, dropout_rate=0.0, dropout_rng=key),
        )

    r = jax.device_get(run(jax.random.key(0)))
    r_again = jax.device_get(run(jax.random.key(0)))
    r_other = jax.device_get(run(jax.random.key(1)))
    plain, w = r["plain"]
    # with v = I the output is the weights, transposed to [b, t, h, s]
    np.testing.assert_allclose(plain, w.transpose(0, 2, 1, 3), atol=1e-6)
    w = plain
    out_a, out_b = r["dropped"], r_other["dropped"]
    np.testing.assert_array_equal(out_a, r_again["dropped"])  # same key, same dropout mask
    assert not np.array_equal(out_a, out_b)  # another key, another mask
    for out in (out_a, out_b):
        kept = out != 0
        # every entry is dropped (0) or kept and scaled by 1 / (1 - rate)
        np.testing.assert_allclose(out[kept], w[kept] / (1 - rate), rtol=1e-6)
        assert 0.3 < kept.mean() < 0.7
    # dropout with return_weights: the same dropped output, and the pre-dropout weights
    out_w, w_drop = r["with_weights"]
    np.testing.assert_array_equal(out_w, out_a)
    np.testing.assert_allclose(w_drop.transpose(0, 2, 1, 3), w, atol=1e-6)
    # dropout_rate=0 with a key is no dropout
    np.testing.assert_array_equal(r["rate0"], plain)


# ----------------------------------------------------------------------------- 6. masks
def test_padding_mask_from_ids():
    ids = jnp.array([[5, 6, 0, 0], [7, 0, 8, 9]])
    m = A.padding_mask(ids)
    chex.assert_shape(m, (2, 1, 1, 4))
    assert m.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(m)[:, 0, 0], [[1, 1, 0, 0], [1, 0, 1, 1]])
    m = A.padding_mask(ids, pad_id=7)
    np.testing.assert_array_equal(np.asarray(m)[:, 0, 0], [[1, 1, 1, 1], [0, 1, 1, 1]])


def test_padding_mask_from_lengths():
    m = A.padding_mask(lengths=jnp.array([0, 2, 4]), max_len=4)
    chex.assert_shape(m, (3, 1, 1, 4))
    np.testing.assert_array_equal(np.asarray(m)[:, 0, 0], [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError):
        A.padding_mask(lengths=jnp.array([1]))
    with pytest.raises(ValueError):
        A.padding_mask()
    with pytest.raises(ValueError):
        A.padding_mask(jnp.ones((1, 2)), lengths=jnp.array([1]), max_len=2)


def test_key_mask():
    m = A.key_mask(jnp.array([[1, 1, 0], [1, 0, 0]]))
    chex.assert_shape(m, (2, 1, 1, 3))
    assert m.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(m)[:, 0, 0], [[1, 1, 0], [1, 0, 0]])


def test_causal_mask():
    np.testing.assert_array_equal(np.asarray(A.causal_mask(3))[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    m = A.causal_mask(2, 5, offset=2)
    chex.assert_shape(m, (1, 1, 2, 5))
    np.testing.assert_array_equal(np.asarray(m)[0, 0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    # a traced offset (decoding under jit)
    m = jax.jit(lambda o: A.causal_mask(1, 4, offset=o))(jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(m)[0, 0], [[1, 1, 0, 0]])


def test_segment_mask():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    m = A.segment_mask(seg)
    chex.assert_shape(m, (1, 1, 5, 5))
    want = np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(m)[0, 0], want)
    # cross segments (queries vs a different key sequence)
    m = A.segment_mask(jnp.array([[1, 2]]), jnp.array([[2, 1, 1, 0]]))
    np.testing.assert_array_equal(np.asarray(m)[0, 0], [[0, 1, 1, 0], [1, 0, 0, 0]])


def test_packed_segments_never_attend_across():
    rng = np.random.default_rng(11)
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    b, t, h, d = 1, 6, 2, 4
    q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
    mask = A.combine_masks(A.segment_mask(jnp.asarray(seg)), A.causal_mask(t))
    out = np.asarray(dpa(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask))
    # each document equals attention over that document alone
    for lo, hi in ((0, 3), (3, 5)):
        alone, _, _ = ref_attention(*(x[:, lo:hi] for x in (q, k, v)), causal=True)
        np.testing.assert_allclose(out[:, lo:hi], alone, atol=TOL)
    np.testing.assert_array_equal(out[:, 5], 0.0)  # padding query
    # changing document 2 and the padding leaves document 1 untouched
    k2, v2 = k.copy(), v.copy()
    k2[:, 3:] += 10.0
    v2[:, 3:] -= 5.0
    out2 = np.asarray(dpa(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), mask=mask))
    np.testing.assert_array_equal(out2[:, :3], out[:, :3])
    assert np.abs(out2[:, 3:5] - out[:, 3:5]).max() > 1.0


def test_combine_masks():
    assert A.combine_masks() is None
    assert A.combine_masks(None, None) is None
    a = jnp.array([[1, 0, 1]])  # int, [1, 3]
    b = jnp.array([[True], [False]])  # [2, 1]
    m = A.combine_masks(a, None, b)
    assert m.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(m), [[1, 0, 1], [0, 0, 0]])
    single = A.combine_masks(None, jnp.array([2, 0]))
    assert single.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(single), [True, False])
    pad = A.padding_mask(lengths=jnp.array([2, 3]), max_len=3)
    both = A.combine_masks(pad, A.causal_mask(3))
    chex.assert_shape(both, (2, 1, 3, 3))
    np.testing.assert_array_equal(np.asarray(both)[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(both)[1, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


# ----------------------------------------------------------------------------- 7. multi-head
def make_params(rng, m, h, kv, d, use_bias):
    def dense(shape_in, shape_out, bias_shape):
        p = {"kernel": (rng.normal(size=shape_in + shape_out) / np.sqrt(np.prod(shape_in))).astype(np.float32)}
        if use_bias:
            p["bias"] = rng.normal(size=bias_shape).astype(np.float32) * 0.1
        return p

    return {
        "query": dense((m,), (h, d), (h, d)),
        "key": dense((m,), (kv, d), (kv, d)),
        "value": dense((m,), (kv, d), (kv, d)),
        "out": dense((h, d), (m,), (m,)),
    }


def to_jnp(tree):
    return jax.tree.map(jnp.asarray, tree)


@pytest.mark.parametrize("h,kv,use_bias,cross", [(4, 4, True, False), (4, 2, False, False), (6, 2, True, True)])
def test_multi_head_matches_numpy(h, kv, use_bias, cross):
    rng = np.random.default_rng(h * 10 + kv)
    b, t, s, m, d = 2, 5, (7 if cross else 5), 12, 4
    params = make_params(rng, m, h, kv, d, use_bias)
    xq = rng.normal(size=(b, t, m)).astype(np.float32)
    xkv = rng.normal(size=(b, s, m)).astype(np.float32) if cross else None
    mask = rng.random((b, 1, t, s)) < 0.8
    mask[0, 0, 1] = False  # a fully-masked query row
    causal = not cross
    want, want_w = ref_mha(params, xq, xkv, mask=mask, causal=causal)

    @jax.jit
    def run(params, xq, xkv, mask):
        kw = dict(mask=mask, causal=causal)
        return (
            A.multi_head_attention(params, xq, xkv, num_heads=h, num_kv_heads=kv, return_weights=True, **kw),
            A.multi_head_attention(params, xq, xkv, **kw),
        )

    res, res_no_weights = run(to_jnp(params), jnp.asarray(xq), as_jnp(xkv), jnp.asarray(mask))
    assert isinstance(res, A.AttentionOutput) and res.kv_cache is None
    chex.assert_shape(res.out, (b, t, m))
    chex.assert_shape(res.weights, (b, h, t, s))
    err = np.abs(np.asarray(res.out) - want).max()
    assert err <= TOL, err
    np.testing.assert_allclose(np.asarray(res.weights), want_w, atol=TOL)
    assert res_no_weights.weights is None
    np.testing.assert_array_equal(np.asarray(res_no_weights.out), np.asarray(res.out))


def test_multi_head_rotary_hook_applies_to_queries_and_keys():
    rng = np.random.default_rng(21)
    b, t, m, h, kv, d = 1, 4, 8, 2, 1, 4
    params = make_params(rng, m, h, kv, d, use_bias=False)
    x = rng.normal(size=(b, t, m)).astype(np.float32)
    seen = []

    def rotary(y, which):  # scales q by 2 and k by 3: the same as scale * 6
        seen.append((which, y.shape))
        return y * {"q": 2.0, "k": 3.0}[which]

    @jax.jit
    def run(params, x):
        return (
            A.multi_head_attention(params, x, rotary=rotary).out,
            A.multi_head_attention(params, x, scale=6.0 / np.sqrt(d)).out,
        )

    out, want = run(to_jnp(params), jnp.asarray(x))
    assert seen == [("q", (b, t, h, d)), ("k", (b, t, kv, d))]
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=TOL)


@pytest.mark.parametrize("kw", [dict(num_heads=3), dict(num_kv_heads=4), dict(num_heads=4, num_kv_heads=1)])
def test_multi_head_wrong_head_count_raises(kw):
    params = to_jnp(make_params(np.random.default_rng(0), 8, 4, 2, 2, use_bias=False))
    with pytest.raises(ValueError, match="heads"):
        A.multi_head_attention(params, jnp.zeros((1, 3, 8)), **kw)


def test_kv_cache_decoding_matches_full_causal_forward():
    h, kv = 4, 2  # grouped-query
    rng = np.random.default_rng(6)
    b, T, S, m, d = 2, 6, 8, 12, 4
    params = to_jnp(make_params(rng, m, h, kv, d, use_bias=True))
    x = jnp.asarray(rng.normal(size=(b, T, m)).astype(np.float32))
    chunks = [(0, 2)] + [(i, i + 1) for i in range(2, T)]  # a prefill chunk of 2 tokens, then one at a time

    @jax.jit  # the whole decode, unrolled, in one compile
    def run(params, x):
        full = A.multi_head_attention(params, x, causal=True).out
        cache = cache_c = A.init_kv_cache(b, S, kv, d)
        outs, outs_c, indices = [], [], []
        for lo, hi in chunks:
            mask = A.causal_mask(hi - lo, S, offset=lo)  # causal over the cache slots
            res = A.multi_head_attention(params, x[:, lo:hi], kv_cache=cache, mask=mask)
            cache = res.kv_cache
            outs.append(res.out)
            indices.append(cache["index"])
            # the same, letting causal=True place the queries at the (traced) cache index
            res_c = A.multi_head_attention(params, x[:, lo:hi], kv_cache=cache_c, causal=True)
            cache_c = res_c.kv_cache
            outs_c.append(res_c.out)
        return full, outs, outs_c, indices, cache

    empty = A.init_kv_cache(b, S, kv, d)
    chex.assert_shape([empty["key"], empty["value"]], (b, S, kv, d))
    assert int(empty["index"]) == 0
    full, outs, outs_c, indices, cache = run(params, x)
    want, _ = ref_mha(jax.tree.map(np.asarray, params), np.asarray(x), causal=True)
    np.testing.assert_allclose(np.asarray(full), want, atol=TOL)
    assert [int(i) for i in indices] == [hi for _, hi in chunks]
    decoded = jnp.concatenate(outs, axis=1)
    chex.assert_shape(decoded, (b, T, m))
    err = float(jnp.abs(decoded - full).max())
    assert err <= TOL, err
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs_c, axis=1)), np.asarray(full), atol=TOL)
    # the cache holds the projected keys / values in the written slots and zeros after them
    k_full = A.project(params["key"], x, "bsm,mkd->bskd")
    v_full = A.project(params["value"], x, "bsm,mkd->bskd")
    np.testing.assert_allclose(np.asarray(cache["key"][:, :T]), np.asarray(k_full), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache["value"][:, :T]), np.asarray(v_full), atol=1e-6)
    assert not np.asarray(cache["key"][:, T:]).any()
