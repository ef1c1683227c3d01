"""The three families: parameter counts, jit forward/backward, scanned layers, KV cache, decoding."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer_jax as tj
from transformer_jax import decoding
from transformer_jax.config import ModelConfig

NAMED_COUNTS = {
    "bert_base": 109_482_240,
    "bert_large": 335_141_888,
    "gpt2_small": 124_439_808,
    "gpt2_medium": 354_823_168,
    "t5_small": 60_506_624,
    "t5_base": 222_903_552,
}


@pytest.mark.parametrize("name,count", sorted(NAMED_COUNTS.items()))
def test_named_config_parameter_counts(name, count):
    model, abstract = tj.abstract_build(tj.load_config(f"configs/{name}.yaml"))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))  # nothing allocated
    assert tj.published_params(model, abstract) == count  # as published; count_params adds the vocab padding
    assert tj.count_params(abstract) >= count


def test_transformer_base_matches_paper_size():
    model, abstract = tj.abstract_build(tj.load_config("configs/transformer_base.yaml"))
    assert abs(tj.published_params(model, abstract) / 65e6 - 1) <= 0.03


def tiny(family, **kw):
    base = dict(family=family, vocab_size=61, model_dim=32, num_heads=4, mlp_dim=64, num_layers=2, max_len=32)
    if family == "encoder":
        base.update(type_vocab_size=2, pooler=True, heads=("mlm", "nsp"), norm_position="post", embed_norm=True)
    if family == "encoder_decoder":
        base.update(position="relative", norm="rmsnorm", activation="gated_gelu", use_bias=False, scale_attention=False)
    base.update(kw)
    return ModelConfig(**base)


def inputs(family, b=2, t=9, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(2, 61, (b, t)), jnp.int32)
    mask = jnp.asarray(np.arange(t)[None] < np.array([t, t - 3])[:, None], jnp.int32)
    kw = dict(input_ids=ids, attention_mask=mask)
    if family == "encoder_decoder":
        kw.update(decoder_input_ids=ids[:, :6], decoder_attention_mask=jnp.ones((b, 6), jnp.int32))
    return kw


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder_decoder"])
@pytest.mark.slow
def test_forward_backward_under_jit(family):
    model, params = tj.build(tiny(family), jax.random.key(0))
    kw = inputs(family)
    out = jax.jit(model.apply)(params, **kw)
    t = kw.get("decoder_input_ids", kw["input_ids"]).shape[1]
    chex.assert_shape(out.logits, (2, t, 128))  # vocab 61 padded to a multiple of 128
    chex.assert_tree_all_finite(out.logits)

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(model.apply(p, **kw, dropout_rng=jax.random.key(1)).logits)[..., 3])

    grads = jax.jit(jax.grad(loss))(params)
    chex.assert_trees_all_equal_structs(grads, params)
    chex.assert_tree_all_finite(grads)
    norms = {
        jax.tree_util.keystr(path): float(jnp.linalg.norm(g))
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
    }
    # The gradient reaches every parameter but exactly these. Off the path to `logits`: the encoder's
    # pooler and NSP head (exactly zero). Each attention key bias: q . b_key is the same for every key,
    # which the softmax cancels, so its gradient is zero up to float32 rounding (measured ~1e-11;
    # the smallest real gradient norm here is ~3e-5).
    unused = (
        {"['nsp']['kernel']", "['nsp']['bias']", "['pooler']['dense']['kernel']", "['pooler']['dense']['bias']"}
        if family == "encoder"
        else set()
    )
    stack = {"encoder": ["encoder"], "decoder": ["decoder"], "encoder_decoder": []}[family]  # T5: no biases
    key_bias = {f"['{part}']['layers'][{i}]['attention']['key']['bias']" for part in stack for i in range(2)}
    assert unused | key_bias <= set(norms)
    assert {p for p, n in norms.items() if n <= 1e-8} == unused | key_bias, norms
    assert all(norms[p] == 0.0 for p in unused)


@pytest.mark.parametrize(
    "family,position",
    [("encoder", "learned"), ("decoder", "rotary"), ("encoder_decoder", "relative"), ("encoder_decoder", "sinusoidal")],
)
@pytest.mark.slow
def test_scan_layers_matches_loop(family, position):
    cfg = tiny(family, position=position, num_kv_heads=2, remat="full")
    model, params = tj.build(cfg, jax.random.key(0))
    scanned_model, scanned_params = tj.build(tiny(family, position=position, num_kv_heads=2, scan_layers=True))
    converted = tj.scan_params(params)
    chex.assert_trees_all_equal_shapes(converted, scanned_params)
    kw = inputs(family)
    loop = jax.jit(model.apply)(params, **kw).logits
    scan = jax.jit(scanned_model.apply)(converted, **kw).logits
    np.testing.assert_allclose(scan, loop, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(tj.unscan_params(converted), params)


@pytest.mark.slow
def test_scanned_compile_time_flat_in_depth():
    def compile_seconds(layers):
        model, abstract = tj.abstract_build(
            tiny("decoder", num_layers=layers, scan_layers=True, model_dim=64, mlp_dim=128)
        )
        ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        grad = jax.jit(jax.grad(lambda p, i: jnp.mean(model.apply(p, input_ids=i).logits)))
        start = time.process_time()  # CPU time of this process: what other processes do counts less
        grad.lower(abstract, ids).compile()
        return time.process_time() - start

    compile_seconds(2)  # warm up tracing caches
    timings = [(compile_seconds(2), compile_seconds(24)) for _ in range(3)]  # interleaved: load hits both
    two, deep = min(t[0] for t in timings), min(t[1] for t in timings)
    assert deep <= 1.5 * two, (two, deep)


@pytest.mark.parametrize(
    "family,position,scan",
    [
        ("decoder", "learned", False),
        ("decoder", "rotary", True),
        ("encoder_decoder", "relative", True),
        ("encoder_decoder", "sinusoidal", False),
    ],
)
@pytest.mark.slow
def test_cached_decoding_matches_full_forward(family, position, scan):
    model, params = tj.build(tiny(family, position=position, scan_layers=scan, num_kv_heads=2), jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(2, 61, (2, 10)), jnp.int32)
    step = jax.jit(model.apply) if family == "decoder" else jax.jit(model.decode)
    if family == "decoder":
        full = model.apply(params, input_ids=ids).logits
        cache, steps = model.init_cache(2, 10), []
        for i in range(10):
            out = step(params, input_ids=ids[:, i : i + 1], cache=cache)
            cache = out.cache
            steps.append(out.logits[:, 0])
    else:
        targets = ids[:, ::-1][:, :7]
        full = model.apply(params, input_ids=ids, decoder_input_ids=targets).logits
        encoded, cache, steps = model.encode(params, ids), model.init_cache(2, 7), []
        for i in range(7):
            logits, _, cache, _ = step(params, targets[:, i : i + 1], encoded, cache=cache)
            steps.append(logits[:, 0])
    np.testing.assert_allclose(jnp.stack(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_left_padded_prompt_decodes_like_unpadded():
    model, params = tj.build(tiny("decoder", init_std=0.3), jax.random.key(2))
    prompt = jnp.array([[5, 6, 7, 8]], jnp.int32)
    padded = jnp.array([[0, 0, 5, 6, 7, 8]], jnp.int32)
    a = decoding.generate(model, params, prompt, max_new_tokens=6)
    b = decoding.generate(model, params, padded, jnp.array([[0, 0, 1, 1, 1, 1]]), max_new_tokens=6)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
@pytest.mark.slow
def test_beam_one_equals_greedy(family):
    model, params = tj.build(tiny(family, init_std=0.3), jax.random.key(3))
    prompt = jnp.asarray(np.random.default_rng(3).integers(2, 61, (3, 5)), jnp.int32)
    greedy = decoding.generate(model, params, prompt, max_new_tokens=12, eos_id=1)
    beam = decoding.beam_search(model, params, prompt, beam_size=1, alpha=0.0, max_new_tokens=12, eos_id=1)
    np.testing.assert_array_equal(beam, greedy)
    seqs, scores = decoding.beam_search(
        model, params, prompt, beam_size=4, max_new_tokens=12, eos_id=1, return_all=True
    )
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)  # sorted best first


def test_sampling_respects_top_k_and_is_seeded():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draws = decoding.sample_logits(jax.random.key(0), logits, temperature=1.0, top_k=2)
    assert set(np.unique(draws)) <= {0, 1}
    assert abs(float(jnp.mean(draws == 0)) - 0.5 / 0.8) < 0.05
    nucleus = decoding.sample_logits(jax.random.key(0), logits, temperature=1.0, top_p=0.7)
    assert set(np.unique(nucleus)) == {0, 1}
    np.testing.assert_array_equal(draws, decoding.sample_logits(jax.random.key(0), logits, temperature=1.0, top_k=2))
    assert (decoding.sample_logits(None, logits) == 0).all()


@pytest.mark.slow
def test_gqa_and_encoder_heads_shapes():
    model, params = tj.build(tiny("encoder", num_kv_heads=1, heads=("mlm", "nsp", "qa")))
    out = model.apply(params, **inputs("encoder"), token_type_ids=jnp.zeros((2, 9), jnp.int32))
    chex.assert_shape(out.pooled, (2, 32))
    chex.assert_shape(out.heads["nsp"], (2, 2))
    chex.assert_shape(out.heads["qa"]["start"], (2, 9))
    chex.assert_shape(params["encoder"]["layers"][0]["attention"]["key"]["kernel"], (32, 1, 8))


def test_bfloat16_compute_keeps_float32_params():
    model32, params = tj.build(tiny("decoder"), jax.random.key(4))
    model16, params16 = tj.build(tiny("decoder", dtype="bfloat16"), jax.random.key(4))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))  # parameters stay float32
    kw = inputs("decoder")
    out32 = jax.jit(model32.apply)(params, **kw)
    out16 = jax.jit(model16.apply)(params, **kw)
    assert out16.hidden_states.dtype == jnp.bfloat16 and out16.logits.dtype == jnp.float32  # logits: float32
    np.testing.assert_allclose(np.asarray(out16.logits, np.float32), out32.logits, atol=5e-2)
