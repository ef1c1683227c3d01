"""The ring KV cache of banded layers (`banded.ring_attention_inputs`, `Model.init_cache`): a banded
layer keeps w slots, and decoding through it gives the tokens and scores of decoding with no cache
(`use_cache=False`, the reference), local_layers all and alternate, scanned and looped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_ring_positions_follow_the_index():
    assert list(banded.ring_positions(jnp.int32(0), 4)) == [-4, -3, -2, -1]
    assert list(banded.ring_positions(jnp.int32(6), 4)) == [4, 5, 2, 3]
    assert list(banded.ring_positions(jnp.int32(3), 8)) == [0, 1, 2, -5, -4, -3, -2, -1]


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
def test_greedy_through_the_ring_equals_decoding_without_a_cache(params, local_layers, scan, layers):
    """4 * w new tokens after prompts of 6 (one left-padded to 3 real tokens): the prefill is longer than
    the ring. Greedy tokens equal, and each step's logits within 1e-4 (the scores)."""
    cfg = tiny(local_layers=local_layers, scan_layers=scan, num_layers=layers)
    model, _ = abstract_build(cfg)
    p = jax.tree.map(lambda a: a, params)
    p["decoder"]["layers"] = {i: params["decoder"]["layers"][i] for i in range(layers)}
    p = scan_params(p) if scan else p
    prompt = jnp.asarray(np.random.default_rng(1).integers(2, V, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [0, 0, 0, 1, 1, 1]], jnp.int32)
    run = lambda use_cache: decoding.generate(model, p, prompt, mask, max_new_tokens=4 * W, use_cache=use_cache)
    cached, reference = run(True), run(False)
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
