"""Vocabulary padding (`model.vocab_multiple`): vocab-sized parameters have padded_vocab_size rows
so tensor parallelism splits them; the padded ids never win and take no loss mass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer_jax as tj
from transformer_jax import decoding, losses, sharding
from transformer_jax.config import MeshConfig, ModelConfig

V = 100  # not a multiple of 128: padded to 128


@pytest.mark.parametrize("multiple", [128, 1])
def test_gpt2_vocab_is_split_over_tensor_only_when_padded(multiple):
    """GPT-2's 50257 is odd: unpadded, a tensor-parallel mesh cannot split the vocabulary (the
    largest arrays stay replicated); padded to 50304 it can. Nothing is allocated."""
    cfg = ModelConfig(
        family="decoder",
        vocab_size=50257,
        vocab_multiple=multiple,
        model_dim=64,
        num_heads=4,
        mlp_dim=128,
        num_layers=1,
        max_len=32,
        tie_embeddings=False,
    )
    model, abstract = tj.abstract_build(cfg)
    assert abstract["embed"]["token"]["embedding"].shape == (cfg.padded_vocab_size, 64)
    assert abstract["lm_head"]["kernel"].shape == (64, cfg.padded_vocab_size)
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=2))
    shardings = sharding.tree_shardings(model.logical_axes, abstract, mesh)
    split = "tensor" if multiple == 128 else None
    assert tuple(shardings["embed"]["token"]["embedding"].spec) == (split, None)
    assert tuple(shardings["lm_head"]["kernel"].spec) == (None, split)
    padding = tj.count_params(abstract) - tj.published_params(model, abstract)
    assert padding == (50304 - 50257) * 64 * 2 if multiple == 128 else padding == 0  # embedding and lm_head


def test_gpt2_small_counts_published_and_padded():
    model, abstract = tj.abstract_build(tj.load_config("configs/gpt2_small.yaml"))
    assert tj.published_params(model, abstract) == 124_439_808  # GPT-2 small as Hugging Face counts it
    assert tj.count_params(abstract) == 124_439_808 + (50304 - 50257) * 768  # tied: the embedding's 47 padded rows


def _decoder(tie: bool, multiple: int):
    return ModelConfig(
        family="decoder",
        vocab_size=V,
        vocab_multiple=multiple,
        model_dim=32,
        num_heads=4,
        mlp_dim=64,
        num_layers=1,
        max_len=32,
        init_std=0.3,
        tie_embeddings=tie,
    )


def _padded_params(params, tie: bool):
    """The vocab_multiple=1 params padded to 128 with columns that would win if not masked: padded id
    V is 1000 x real id 7's output vector, V + 1 is -1000 x it (one of the two beats every real logit)."""

    def pad(a, axis):
        a = np.asarray(a)
        row = np.take(a, 7, axis=axis)
        fill = np.stack([1000 * row, -1000 * row] + [np.zeros_like(row)] * (128 - V - 2), axis=axis)
        return jnp.asarray(np.concatenate([a, fill], axis=axis))

    out = jax.tree.map(lambda x: x, params)
    out["embed"]["token"]["embedding"] = pad(params["embed"]["token"]["embedding"], 0)
    if not tie:
        out["lm_head"]["kernel"] = pad(params["lm_head"]["kernel"], 1)
    return out


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.slow
def test_padded_ids_never_win_and_take_no_loss(tie):
    model1, params1 = tj.build(_decoder(tie, 1), jax.random.key(0))
    model, _ = tj.build(_decoder(tie, 128), jax.random.key(0))
    params = _padded_params(params1, tie)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, V, (2, 6)), jnp.int32)
    out, out1 = model.apply(params, input_ids=ids), model1.apply(params1, input_ids=ids)
    assert out.logits.shape == (2, 6, 128) and out.logits.dtype == jnp.float32
    np.testing.assert_array_equal(out.logits[..., V:], -1e9)
    np.testing.assert_allclose(out.logits[..., :V], out1.logits, rtol=1e-5, atol=1e-5)
    # unmasked, a padded id would win everywhere (the test can fail)
    table = params["embed"]["token"]["embedding"].T if tie else params["lm_head"]["kernel"]
    assert (jnp.argmax(out.hidden_states @ table, -1) >= V).all()

    if tie:  # greedy, sampled (top-k wider than the real vocabulary, top-p) and beam search (compiles: once)
        kw = dict(max_new_tokens=8)
        assert (np.asarray(decoding.generate(model, params, ids, **kw)) < V).all()
        sampled = decoding.generate(
            model, params, ids, rng=jax.random.key(1), temperature=2.0, top_k=120, top_p=0.999, **kw
        )
        assert (np.asarray(sampled) < V).all() and len(np.unique(np.asarray(sampled))) > 4
        seqs, _ = decoding.beam_search(model, params, ids, beam_size=4, eos_id=1, return_all=True, **kw)
        assert (np.asarray(seqs) < V).all()

    # the loss (label smoothing, z-loss) and distillation equal the unpadded model's
    targets = jnp.roll(ids, -1, axis=1)
    for ls, z in ((0.0, 0.0), (0.1, 1e-3)):
        (a, aux), (b, aux1) = (
            losses.cross_entropy(o.logits, targets, label_smoothing=ls, z_loss=z) for o in (out, out1)
        )
        np.testing.assert_allclose(a, b, rtol=1e-5)
        np.testing.assert_allclose(aux["accuracy"], aux1["accuracy"])
    student = out.logits + jnp.where(jnp.arange(128) < V, 0.5 * jnp.sin(jnp.arange(128.0)), 0.0)
    np.testing.assert_allclose(
        losses.distillation_loss(student, out.logits, temperature=2.0),
        losses.distillation_loss(student[..., :V], out1.logits, temperature=2.0),
        rtol=1e-4,
    )


@pytest.mark.slow
def test_mlm_head_masks_padded_ids():
    cfg = ModelConfig(
        family="encoder",
        vocab_size=V,
        model_dim=32,
        num_heads=4,
        mlp_dim=64,
        num_layers=1,
        max_len=16,
        heads=("mlm",),
        norm_position="post",
        embed_norm=True,
    )
    model, params = tj.build(cfg, jax.random.key(0))
    assert params["mlm"]["bias"].shape == (128,)
    params["mlm"]["bias"] = params["mlm"]["bias"].at[V:].set(1e6)  # would win everywhere unmasked
    logits = model.apply(params, input_ids=jnp.arange(3, 15)[None]).logits
    assert logits.shape == (1, 12, 128) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits[..., V:], -1e9)
    assert (jnp.argmax(logits, -1) < V).all()
