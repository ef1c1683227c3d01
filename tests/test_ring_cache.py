"""The ring KV cache of banded layers (`banded.ring_attention_inputs`, `Model.init_cache`): a banded
layer keeps w slots, and decoding through it gives the tokens and scores of decoding with no cache
(`use_cache=False`, the reference), local_layers all and alternate, scanned and looped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import attention as A
from transformer_jax import banded, decoding
from transformer_jax.config import ModelConfig
from transformer_jax.models import abstract_build, scan_params

V, W = 61, 4


def tiny(**kw):
    base = dict(family="decoder", vocab_size=V, model_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64, num_layers=4)
    return ModelConfig(**{**base, "max_len": 64, "local_window_size": W, "local_layers": "all", **kw})


@pytest.fixture(scope="module")
def params():
    """Looped-layer weights drawn with NumPy (scan_params for the scanned): norm scales near 1, the rest
    N(0, 0.3), sharp enough that the band changes the greedy tokens."""
    rng = np.random.default_rng(0)
    _, abstract = abstract_build(tiny())
    draw = lambda path, x: jnp.asarray(
        (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.3 * rng.normal(size=x.shape), x.dtype
    )
    return jax.tree_util.tree_map_with_path(draw, abstract)


def test_the_ring_gives_its_keys_in_position_order():
    """Positions 0..5 written into 4 slots (a step of 3, then 1, then 2): each step sees the ring's
    slots as positions index - 4 .. index - 1 (negative: never written) and then its own keys."""
    cache = {"key": jnp.zeros((1, 4, 1, 1)), "value": jnp.zeros((1, 4, 1, 1)), "index": jnp.int32(0)}
    seen = []
    for start, stop in ((0, 3), (3, 4), (4, 6)):
        new = jnp.arange(start, stop, dtype=jnp.float32).reshape(1, -1, 1, 1) + 100
        cache, keys, _, positions = banded.ring_attention_inputs(cache, new, new)
        written = np.asarray(positions) >= 0
        np.testing.assert_array_equal(np.asarray(keys)[0, written, 0, 0], np.asarray(positions)[written] + 100)
        seen.append(list(np.asarray(positions)))
    assert seen == [[-4, -3, -2, -1, 0, 1, 2], [-1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert list(np.asarray(cache["key"])[0, :, 0, 0]) == [104, 105, 102, 103] and int(cache["index"]) == 6


def test_cache_shapes_keep_w_slots_in_banded_layers():
    shapes = lambda **kw: jax.tree.map(lambda a: a.shape, abstract_build(tiny(**kw))[0].init_cache(2, 40))
    assert shapes()["key"] == (4, 2, W, 2, 8) and shapes()["index"] == (4,)
    alternate = shapes(local_layers="alternate", num_layers=3)
    assert alternate["key"] == (2, 2, 40, 2, 8) and alternate["local"]["value"] == (1, 2, W, 2, 8)
    assert shapes(local_layers="none", local_window_size=0)["key"] == (4, 2, 40, 2, 8)
    assert abstract_build(tiny())[0].init_cache(1, 3)["key"].shape[2] == 3  # never more slots than positions


CASES = [  # (local_layers, scan_layers, num_layers)
    ("all", False, 2),
    ("all", True, 2),
    ("alternate", False, 3),
    ("alternate", True, 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("local_layers,scan,layers", CASES)
def test_greedy_through_the_ring_equals_decoding_without_a_cache(params, local_layers, scan, layers, monkeypatch):
    """4 * w new tokens after prompts of 6 (one left-padded to 3 real tokens): the prefill is longer than
    the ring (computed blockwise). Greedy tokens equal, and each step's logits within 1e-4 (the scores)."""
    calls = []
    blockwise = banded.banded_attention
    monkeypatch.setattr(
        banded, "banded_attention", lambda q, k, *a, **kw: calls.append(k.shape) or blockwise(q, k, *a, **kw)
    )
    cfg = tiny(local_layers=local_layers, scan_layers=scan, num_layers=layers)
    model, _ = abstract_build(cfg)
    p = jax.tree.map(lambda a: a, params)
    p["decoder"]["layers"] = {i: params["decoder"]["layers"][i] for i in range(layers)}
    p = scan_params(p) if scan else p
    prompt = jnp.asarray(np.random.default_rng(1).integers(2, V, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [0, 0, 0, 1, 1, 1]], jnp.int32)
    run = lambda use_cache: decoding.generate(model, p, prompt, mask, max_new_tokens=4 * W, use_cache=use_cache)
    cached = run(True)
    assert (2, W + 6, 2, 8) in calls  # the prompt over [ring ; its keys], blockwise
    reference = run(False)
    np.testing.assert_array_equal(cached, reference)
    logits = lambda use_cache: _step_logits(model, p, prompt, mask, cached, use_cache)
    np.testing.assert_allclose(logits(True), logits(False), atol=1e-4, rtol=0)
    dense, _ = abstract_build(tiny(local_layers="none", local_window_size=0, scan_layers=scan, num_layers=layers))
    assert not np.array_equal(decoding.generate(dense, p, prompt, mask, max_new_tokens=4 * W), cached)


def _step_logits(model, params, prompt, mask, tokens, use_cache):
    """The logits each step of decoding saw, feeding it `tokens` [b, n]: [b, n, V]."""
    logits, cache, step = decoding._prepare(model, params, prompt, mask, tokens.shape[1], 0, use_cache)
    out = [logits]
    for i in range(tokens.shape[1] - 1):
        logits, cache = jax.jit(step)(tokens[:, i], cache, i)
        out.append(logits)
    return jnp.stack(out, 1)


@pytest.mark.slow
def test_beam_search_through_the_ring_equals_beam_search_without_a_cache(params):
    """_gather_beams reorders the rings like any cache: the same beams and scores (alternate, scanned)."""
    model, _ = abstract_build(tiny(local_layers="alternate", scan_layers=True))
    prompt = jnp.asarray(np.random.default_rng(2).integers(2, V, (2, 5)), jnp.int32)
    run = lambda use_cache: decoding.beam_search(
        model,
        scan_params(params),
        prompt,
        beam_size=3,
        max_new_tokens=3 * W,
        eos_id=V,
        return_all=True,
        use_cache=use_cache,
    )
    (seqs, scores), (want_seqs, want_scores) = run(True), run(False)
    np.testing.assert_array_equal(seqs, want_seqs)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4, rtol=0)
    assert len({tuple(s) for s in np.asarray(seqs)[0]}) == 3  # three different beams


@pytest.mark.slow
def test_a_long_prompt_fills_the_ring_in_linear_memory():
    """Compiled temporary bytes of the prefill (forward over an empty cache) of 2k and 8k tokens, every
    layer banded at w 256: 4x, not 16x."""
    model, abstract = abstract_build(tiny(local_window_size=256, max_len=8192, num_layers=1))

    def temp(t):
        prefill = lambda p, ids: model.apply(p, input_ids=ids, cache=model.init_cache(1, t)).logits
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
        return jax.jit(prefill).lower(abstract, ids).compile().memory_analysis().temp_size_in_bytes

    assert temp(8192) / temp(2048) <= 4.6


def test_what_a_ring_cannot_take_is_refused_in_one_line():
    rng = np.random.default_rng(0)
    proj = lambda *shape: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}
    params = {"query": proj(8, 2, 4), "key": proj(8, 1, 4), "value": proj(8, 1, 4), "out": proj(2, 4, 8)}
    x, cache = jnp.ones((1, 3, 8)), A.init_kv_cache(1, W, 1, 4)
    attend = lambda **kw: A.multi_head_attention(params, x, kv_cache=cache, local_window=W, **{"causal": True, **kw})
    assert attend().kv_cache["key"].shape == (1, W, 1, 4)
    with pytest.raises(ValueError, match="^local_window=4 needs causal=True"):
        attend(causal=False)
    for kw in ({"bias": jnp.zeros((1, 2, 3, 7))}, {"segment_ids": jnp.ones((1, 3))}, {"kv_lengths": jnp.asarray([3])}):
        with pytest.raises(ValueError, match="^a ring KV cache .* takes no bias, segment_ids or kv_lengths"):
            attend(**kw)
