"""Banded attention computed blockwise (`banded.banded_attention`, reached through
`attention.dot_product_attention` on the explicit and xla routes): equal to the masked dense path in
outputs and gradients, dropout over the band, and compiled memory linear in the length.

    python tests/test_banded.py    # prints the compiled memory figures of docs/performance.md
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer_jax as tj
from transformer_jax import attention as A
from transformer_jax.models import abstract_build

from helpers import assert_same_outputs_and_grads

CASES = [  # (T, w, packed, lengths): T a multiple of w or not, T < w, packed documents, padding lengths
    (16, 4, False, False),
    (13, 4, True, True),
    (11, 5, False, True),
    (3, 8, True, False),
    (9, 9, True, True),
]


def dense_reference(q, k, v, window, segments, lengths):
    """Today's masked dense path: every [T, S] mask built and combined, the explicit einsums."""
    t = q.shape[1]
    mask = A.combine_masks(
        A.causal_mask(t),
        A.band_mask(t, t, window),
        None if segments is None else A.segment_mask(segments),
        None if lengths is None else A.padding_mask(lengths=lengths, max_len=t),
    )
    return A.dot_product_attention(q, k, v, mask=mask)


def inputs(t, packed, lengths, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32) for _ in range(2))  # grouped-query
    cut = rng.integers(1, t + 1, (2, 2))
    segments = jnp.asarray((np.arange(t) >= cut[:, :1]) + 1 - (np.arange(t) >= t - 1), jnp.int32) if packed else None
    return q, k, v, segments, (jnp.asarray([t, max(t // 2, 1)]) if lengths else None)


@pytest.mark.parametrize("impl", [None, "xla"])
@pytest.mark.parametrize("t,window,packed,lengths", CASES)
def test_blockwise_band_equals_the_masked_dense_path(impl, t, window, packed, lengths):
    """Outputs and the gradients of <out, probe> with respect to q, k and v within 1e-5."""
    q, k, v, segments, kv_lengths = inputs(t, packed, lengths)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    ours = lambda q, k, v: A.dot_product_attention(
        q, k, v, causal=True, local_window=window, segment_ids=segments, kv_lengths=kv_lengths, implementation=impl
    )
    theirs = lambda q, k, v: dense_reference(q, k, v, window, segments, kv_lengths)
    got = assert_same_outputs_and_grads(ours, theirs, q, k, v, probe)
    if t > window:
        assert not np.allclose(got, dense_reference(q, k, v, t, segments, kv_lengths), atol=1e-3)  # the band bites
    jaxpr = str(jax.make_jaxpr(ours)(q, k, v))
    assert f"{t},{t}]" not in jaxpr.replace(" ", "")  # no [T, T] array anywhere


@pytest.mark.slow
def test_dropout_drops_band_weights_and_keeps_the_expectation():
    """Inverted dropout over the block scores: seeded, it changes the output, and its mean over 2000
    draws is the output without dropout."""
    q, k, v, segments, _ = inputs(12, True, False)
    attend = lambda rate, rng: A.dot_product_attention(
        q, k, v, causal=True, local_window=4, segment_ids=segments, dropout_rate=rate, dropout_rng=rng
    )
    plain = attend(0.0, None)
    key = jax.random.key(0)
    one = jax.jit(attend, static_argnums=0)(0.3, key)
    np.testing.assert_allclose(one, attend(0.3, key), atol=1e-5)
    assert not np.allclose(one, plain, atol=1e-2)
    mean = jax.jit(jax.vmap(lambda r: attend(0.3, r)))(jax.random.split(key, 2000)).mean(0)
    np.testing.assert_allclose(mean, plain, atol=0.08)
    with pytest.raises(ValueError, match="needs the explicit path"):
        A.dot_product_attention(q, k, v, causal=True, local_window=4, dropout_rate=0.1, implementation="xla")


def test_segment_ids_in_the_dense_forms_are_the_segment_mask():
    """Off the band (dense layers, weights asked for) segment_ids are `segment_mask(segment_ids)`;
    cross-attention takes none."""
    q, k, v, segments, _ = inputs(10, True, False)
    want = A.dot_product_attention(q, k, v, causal=True, mask=A.segment_mask(segments))
    for kw in ({}, {"implementation": "xla"}):
        got = A.dot_product_attention(q, k, v, causal=True, segment_ids=segments, **kw)
        np.testing.assert_allclose(got, want, atol=1e-6)
    _, weights = A.dot_product_attention(
        q, k, v, causal=True, local_window=3, segment_ids=segments, return_weights=True
    )
    assert (
        weights.shape == (2, 4, 10, 10)
        and not np.asarray(weights[..., np.tril_indices(10, -3)[0], np.tril_indices(10, -3)[1]]).any()
    )
    with pytest.raises(ValueError, match="segment_ids: self-attention only"):
        A.dot_product_attention(q, k[:, :5], v[:, :5], segment_ids=segments)


def temp_bytes(t, impl="xla", layers=1, window=256, local_layers="all", dim=64, packed=True):
    """Compiled temporary bytes of a gradient step of a gpt_tiny-shaped decoder, batch 1 (XLA's memory
    analysis: nothing runs)."""
    cfg = tj.load_config(
        "configs/gpt_tiny.yaml",
        [
            f"model.num_layers={layers}",
            f"model.model_dim={dim}",
            f"model.mlp_dim={4 * dim}",
            f"model.local_layers={local_layers}",
            f"model.local_window_size={window if local_layers != 'none' else 0}",
            f"model.attention_impl={impl}",
            f"model.max_len={t}",
        ],
    )
    model, abstract = abstract_build(cfg)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(p, ids):
        segments = 1 + (jnp.arange(t) >= t // 3)[None]  # two packed documents
        out = model.apply(p, input_ids=ids, segment_ids=segments if packed else None)
        return jnp.mean(jax.nn.logsumexp(out.logits, -1))

    return jax.jit(jax.grad(loss)).lower(abstract, ids).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "explicit"])
def test_compiled_memory_of_a_banded_step_grows_linearly(impl):
    """2k, 4k and 8k tokens, one banded layer of w 256, packed: 2x and 4x the 2k bytes (dense causal
    attention: about 15x at 8k)."""
    mem = {t: temp_bytes(t, impl) for t in (2048, 4096, 8192)}
    print({t: f"{b / 2**20:.1f} MiB" for t, b in mem.items()})
    assert mem[4096] / mem[2048] <= 2.3 and mem[8192] / mem[2048] <= 4.6, mem
    dense = temp_bytes(8192, impl, local_layers="none") / temp_bytes(2048, impl, local_layers="none")
    assert dense > 10, dense  # the measure sees a quadratic term where there is one


if __name__ == "__main__":
    for impl in ("xla", "explicit"):
        for local_layers in ("all", "none"):
            figures = {
                t: temp_bytes(t, impl, layers=2, dim=128, local_layers=local_layers, packed=False)
                for t in (2048, 4096, 8192)
            }
            print(impl, local_layers, {t: f"{b / 2**20:.1f} MiB" for t, b in figures.items()}, flush=True)
