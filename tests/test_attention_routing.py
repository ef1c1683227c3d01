"""Attention routing: causality reaches the fused kernel as `is_causal`, padding as lengths; a
dense mask only where nothing else says it (packed segments, a KV cache); same numbers as the
explicit path; dropout on the fused route is refused, not quietly rerouted."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer_jax as tj
from transformer_jax import attention as A
from transformer_jax.config import ConfigError, ModelConfig

B, T, V = 2, 8, 61


def tiny(family, **kw):
    base = dict(family=family, vocab_size=V, model_dim=32, num_heads=4, mlp_dim=64, num_layers=1, max_len=32)
    if family == "encoder":
        base.update(type_vocab_size=2, heads=("mlm",), norm_position="post", embed_norm=True)
    if family == "encoder_decoder":
        base.update(position="relative", norm="rmsnorm", activation="gated_gelu", use_bias=False, scale_attention=False)
    base.update(kw)
    return ModelConfig(**base)


def padded(lengths, t=T):
    return jnp.asarray(np.arange(t)[None] < np.asarray(lengths)[:, None], jnp.int32)


def ids(seed=0, t=T):
    return jnp.asarray(np.random.default_rng(seed).integers(2, V, (B, t)), jnp.int32)


CASES = {  # name: (family, inputs)
    "causal": ("decoder", lambda: dict(input_ids=ids())),
    "causal_padded": ("decoder", lambda: dict(input_ids=ids(), attention_mask=padded([T, 5]))),
    "packed": (
        "decoder",
        lambda: dict(
            input_ids=ids(),
            segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 2, 2]], jnp.int32),
            positions=jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]]),
        ),
    ),
    "bidirectional_padded": ("encoder", lambda: dict(input_ids=ids(), attention_mask=padded([T, 3]))),
    "cross_padded": (
        "encoder_decoder",
        lambda: dict(
            input_ids=ids(),
            attention_mask=padded([6, T]),
            decoder_input_ids=ids(1, 5),
            decoder_attention_mask=padded([5, 3], 5),
        ),
    ),
}


@pytest.fixture
def spy(monkeypatch):
    """Every call that reaches jax.nn.dot_product_attention, with the shapes it was given."""
    calls, real = [], jax.nn.dot_product_attention

    def recording(q, k, v, bias=None, mask=None, **kw):
        calls.append(
            dict(
                q=q.shape,
                k=k.shape,
                mask=None if mask is None else mask.shape,
                is_causal=kw.get("is_causal"),
                kv_lengths=kw.get("key_value_seq_lengths") is not None,
            )
        )
        return real(q, k, v, bias, mask, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("case", ["causal_padded", "bidirectional_padded", "cross_padded"])
def test_no_dense_mask_reaches_the_kernel_for_unpacked_batches(spy, case):
    family, make = CASES[case]
    model, params = tj.build(tiny(family, attention_impl="xla"), jax.random.key(0))
    jax.eval_shape(lambda p: model.apply(p, **make()), params)
    assert spy, "the fused route was never taken"
    for call in spy:
        assert call["mask"] is None, f"a dense mask {call['mask']} reached the kernel"
        assert call["kv_lengths"], "padding did not travel as lengths"
    self_calls = [c for c in spy if c["q"][1] == c["k"][1] and c["is_causal"]]
    assert (len(self_calls) > 0) == (family != "encoder")  # causality as a flag, not a mask


def test_packed_segments_build_a_mask_without_heads(spy):
    family, make = CASES["packed"]
    model, params = tj.build(tiny(family, attention_impl="xla"), jax.random.key(0))
    jax.eval_shape(lambda p: model.apply(p, **make()), params)
    assert spy and all(c["mask"] == (B, 1, T, T) and c["is_causal"] for c in spy)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_fused_route_equals_explicit_path(case):
    """Outputs and gradients of the whole model within 1e-5 (float32)."""
    family, make = CASES[case]
    explicit = tiny(family)
    model, params = tj.build(explicit, jax.random.key(0))
    fused, _ = tj.build(dataclasses.replace(explicit, attention_impl="xla"), jax.random.key(0))
    inputs = make()

    def loss(p, m):
        logits = m.apply(p, **inputs).logits[..., :V]
        return jnp.sum(jnp.tanh(logits)), logits

    @jax.jit
    def both(p):
        return [jax.value_and_grad(loss, has_aux=True)(p, m) for m in (model, fused)]

    ((_, want), g_want), ((_, got), g_got) = both(params)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_lengths_match_dense_masks_in_the_pure_function():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, 2, 8)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([T, 0])  # an all-padding row gives zeros on both paths
    for causal in (False, True):
        want = A.dot_product_attention(q, k, v, causal=causal, mask=A.padding_mask(lengths=lengths, max_len=T))
        for impl in (None, "xla"):
            got = A.dot_product_attention(q, k, v, causal=causal, kv_lengths=lengths, implementation=impl)
            np.testing.assert_allclose(got, want, atol=1e-6)
        assert not np.asarray(want[1]).any()


@pytest.mark.slow
def test_tpu_flash_kernel_matches_explicit_path_in_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(1)
    t, d = 128, 128  # the kernel's smallest blocks
    q = jnp.asarray(rng.normal(size=(1, t, 2, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, t, 1, d)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([100])
    want = A.dot_product_attention(q, k, v, causal=True, kv_lengths=lengths)
    with pltpu.force_tpu_interpret_mode():
        got = A.dot_product_attention(q, k, v, causal=True, kv_lengths=lengths, implementation="tpu_flash")
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="tpu_flash takes causality and padding, not a dense mask"):
        A.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, t, t), bool), implementation="tpu_flash")


def test_fused_attention_with_dropout_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="model.attention_dropout_rate: 0.1 needs attention_impl explicit"):
        tj.load_config("configs/gpt_tiny.yaml", ["model.attention_impl=xla", "model.attention_dropout_rate=0.1"])


def test_left_padded_attention_mask_is_refused_outside_jit():
    model, params = tj.build(tiny("decoder"), jax.random.key(0))
    left = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * T], jnp.int32)
    with pytest.raises(ValueError, match="attention_mask: padding must come after the real tokens"):
        model.apply(params, input_ids=ids(), attention_mask=left)
