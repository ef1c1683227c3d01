"""Shape checks at the public boundaries: a wrong input is one ValueError naming the argument.

The checks look at static shapes only, so they run before any weights are touched: abstract
params (`abstract_build`) are enough and nothing here allocates a model.
"""

import jax
import jax.numpy as jnp
import pytest

import transformer_jax as tj
from transformer_jax import attention as A
from transformer_jax.config import ModelConfig

TINY = dict(vocab_size=61, model_dim=32, num_heads=4, mlp_dim=64, num_layers=1, max_len=32)


def abstract(family, **kw):
    return tj.abstract_build(ModelConfig(family=family, **TINY, **kw))


IDS = jnp.ones((2, 5), jnp.int32)


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder_decoder"])
def test_input_ids_of_rank_1_is_refused(family):
    model, params = abstract(family)
    with pytest.raises(ValueError, match=r"input_ids: expected rank 2 \[batch, length\]"):
        model.apply(params, input_ids=jnp.ones((5,), jnp.int32))


def test_float_input_ids_are_refused():
    model, params = abstract("decoder")
    with pytest.raises(ValueError, match="input_ids: expected integer token ids"):
        model.apply(params, input_ids=jnp.ones((2, 5), jnp.float32))


def test_attention_mask_of_rank_3_is_refused():
    model, params = abstract("encoder")
    with pytest.raises(ValueError, match=r"attention_mask: expected rank 2 \[batch, length\]"):
        model.apply(params, input_ids=IDS, attention_mask=jnp.ones((2, 5, 5), jnp.int32))


def test_masks_and_ids_must_agree():
    model, params = abstract("encoder", type_vocab_size=2)
    with pytest.raises(ValueError, match=r"attention_mask: shape \(2, 4\) differs from input_ids's \(2, 5\)"):
        model.apply(params, input_ids=IDS, attention_mask=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="token_type_ids"):
        model.apply(params, input_ids=IDS, token_type_ids=jnp.zeros((3, 5), jnp.int32))
    model, params = abstract("encoder_decoder")
    with pytest.raises(ValueError, match="decoder_input_ids: expected rank 2"):
        model.apply(params, input_ids=IDS, decoder_input_ids=jnp.ones((2, 3, 1), jnp.int32))
    with pytest.raises(ValueError, match="decoder_attention_mask: shape"):
        model.apply(params, input_ids=IDS, decoder_input_ids=IDS[:, :3], decoder_attention_mask=IDS)


def test_a_cached_decoder_mask_covers_the_cache():
    """With a KV cache the decoder's attention_mask spans the cache's slots: only the batch must agree."""
    model, params = abstract("decoder")
    cache = jax.eval_shape(lambda: model.init_cache(2, 8))
    check = lambda mask: jax.eval_shape(
        lambda p, c: model.apply(p, input_ids=IDS[:, :1], attention_mask=mask, cache=c), params, cache
    )
    check(jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask: batch 3 differs from input_ids's 2"):
        check(jnp.ones((3, 8), jnp.int32))


def test_checks_run_at_trace_time_under_jit():
    model, params = abstract("decoder")
    with pytest.raises(ValueError, match="input_ids"):
        jax.eval_shape(lambda p: model.apply(p, input_ids=jnp.ones((2, 5, 1), jnp.int32)), params)


def test_pixels_of_rank_3_are_refused():
    model, params = abstract("dual_encoder", image_size=8, patch_size=4, num_channels=3)
    with pytest.raises(ValueError, match=r"pixels: expected rank 4 \[batch, height, width, channels\]"):
        model.apply(params, pixels=jnp.zeros((8, 8, 3), jnp.uint8), input_ids=IDS)


def test_build_refuses_a_batch_of_keys():
    with pytest.raises(ValueError, match="rng: expected an int seed or one PRNG key"):
        tj.build(ModelConfig(family="decoder", **TINY), jax.random.split(jax.random.key(0), 2))


def test_dot_product_attention_names_the_bad_argument():
    q, kv = jnp.zeros((2, 3, 4, 8)), jnp.zeros((2, 5, 2, 8))
    with pytest.raises(ValueError, match=r"q \(query\): expected rank 4 \[batch, length, heads, head_dim\]"):
        A.dot_product_attention(jnp.zeros((2, 3, 8)), kv, kv)
    with pytest.raises(ValueError, match=r"v \(value\): expected rank 4"):
        A.dot_product_attention(q, kv, jnp.zeros((2, 5, 16)))
    with pytest.raises(ValueError, match=r"k \(key\): batch 1 differs from q \(query\)'s 2"):
        A.dot_product_attention(q, kv[:1], kv[:1])
    with pytest.raises(ValueError, match=r"k \(key\): head_dim 4 differs from q \(query\)'s 8"):
        A.dot_product_attention(q, kv[..., :4], kv[..., :4])
    with pytest.raises(ValueError, match=r"v \(value\): shape"):
        A.dot_product_attention(q, kv, kv[:, :4])


def test_multi_head_attention_names_the_bad_argument():
    params = {
        "query": {"kernel": jnp.zeros((8, 2, 4))},
        "key": {"kernel": jnp.zeros((8, 2, 4))},
        "value": {"kernel": jnp.zeros((8, 2, 4))},
        "out": {"kernel": jnp.zeros((2, 4, 8))},
    }
    with pytest.raises(ValueError, match=r"inputs_q: expected rank 3 \[batch, length, model_dim\]"):
        A.multi_head_attention(params, jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="inputs_kv: batch 1 differs from inputs_q's 2"):
        A.multi_head_attention(params, jnp.zeros((2, 3, 8)), jnp.zeros((1, 5, 8)))
