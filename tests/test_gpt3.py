"""GPT-3 (Brown et al. 2020): the eight sizes of Table 2.1 (parameter counts, no allocation), locally
banded attention (against a masked reference in plain jnp; alternating layers; packing; the KV
cache; a train step; the one-line refusals), and `train.bench --abstract`'s per-device memory on
meshes of 256 and 1024 devices that do not exist."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer_jax as tj
from train import bench, cli, flops, memory, step_bench
from transformer_jax import attention as A
from transformer_jax import hf, sharding, tasks
from transformer_jax.config import ConfigError, ModelConfig
from transformer_jax.models import abstract_build, published_params, scan_params

from helpers import assert_same_outputs_and_grads, run_main

PAPER = {
    "small": 125e6,
    "medium": 350e6,
    "large": 760e6,
    "xl": 1.3e9,
    "2.7b": 2.7e9,
    "6.7b": 6.7e9,
    "13b": 13e9,
    "175b": 175e9,
}  # Table 2.1's n_params
V = 61


@pytest.mark.parametrize("size", sorted(PAPER))
def test_parameter_count_within_2_percent_of_the_paper(size):
    cfg = tj.load_config(f"configs/gpt3_{size}.yaml")
    model, abstract = abstract_build(cfg)  # ShapeDtypeStructs: nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    count = published_params(model, abstract)
    assert abs(count / PAPER[size] - 1) < 0.02, (size, f"{count:,}")
    m = cfg.model
    assert (m.max_len, cfg.data.seq_len, m.vocab_size, m.mlp_dim) == (2048, 2048, 50257, 4 * m.model_dim)
    assert cfg.train.batch_size * cfg.data.seq_len in (2**19, 2**20, 2**21, 1536 * 2048)
    assert (m.local_layers, m.local_window_size) == ("alternate", 256)


# ----------------------------------------------------------------------------- the band, pure function
def reference(q, k, v, window, segments=None, lengths=None):
    """softmax(QK^T / sqrt(h)) V with query i keeping keys i - window < j <= i (of its segment, not 0;
    before the row's length)."""
    t, s, n, kv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = (jnp.repeat(x, n // kv, axis=2) for x in (k, v))
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    i, j = np.arange(t)[:, None], np.arange(s)[None, :]
    keep = jnp.asarray((j <= i) & (j > i - window))[None, None]
    if segments is not None:
        keep = keep & ((segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0))[:, None]
    if lengths is not None:
        keep = keep & (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    weights = jax.nn.softmax(jnp.where(keep, scores, -jnp.inf), axis=-1)
    weights = jnp.where(jnp.any(keep, -1, keepdims=True), weights, 0.0)  # a row with no key: zeros
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 0, 0]])


@pytest.mark.parametrize("impl", [None, "xla"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.slow
def test_band_equals_a_masked_reference(impl, packed):
    """Outputs, and gradients with respect to q, k and v, within 1e-5 of the plain-jnp reference."""
    rng, window = np.random.default_rng(0), 4
    b, t = SEGMENTS.shape
    q = jnp.asarray(rng.normal(size=(b, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, 2, 8)), jnp.float32) for _ in range(2))  # grouped-query
    segments = jnp.asarray(SEGMENTS) if packed else None
    probe = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    ours = lambda q, k, v: A.dot_product_attention(
        q,
        k,
        v,
        causal=True,
        local_window=window,
        implementation=impl,
        mask=None if segments is None else A.segment_mask(segments),
    )
    theirs = lambda q, k, v: reference(q, k, v, window, segments)
    got = assert_same_outputs_and_grads(ours, theirs, q, k, v, probe)
    assert not np.allclose(got, reference(q, k, v, t + 1, segments), atol=1e-3)  # the band changed something


def test_band_with_padding_lengths_gives_zero_rows_like_the_explicit_path():
    """Padded queries past length + window - 1 have no key in their band: zeros on the fused route as on
    the explicit path (the kernel alone would average them over masked keys)."""
    impl = "xla"
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32) for _ in range(3))
    lengths = jnp.asarray([12, 4])
    got = jax.jit(
        lambda q, k, v: A.dot_product_attention(
            q, k, v, causal=True, local_window=3, kv_lengths=lengths, implementation=impl
        )
    )(q, k, v)
    want = reference(q, k, v, 3, lengths=lengths)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1, :6], want[1, :6], atol=1e-5)  # queries 4, 5 still reach key 3
    assert not np.asarray(got[1, 6:]).any()


def test_band_needs_causal_and_tpu_flash_takes_none():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="local_window=2 needs causal=True"):
        A.dot_product_attention(q, q, q, local_window=2)
    with pytest.raises(ValueError, match="tpu_flash takes no local window"):
        A.dot_product_attention(q, q, q, causal=True, local_window=2, implementation="tpu_flash")


# ----------------------------------------------------------------------------- the band, in a decoder
TINY = dict(
    vocab_size=V,
    model_dim=32,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    num_layers=4,
    max_len=32,
    local_window_size=3,
    local_layers="alternate",
)  # layers 1 and 3 banded


def tiny(**kw):
    return ModelConfig(**{"family": "decoder", **TINY, **kw})


@pytest.fixture(scope="module")
def params():
    """One set of looped-layer weights for every model of this section (scan_params for the scanned),
    drawn with NumPy: no initialiser to compile. Norm scales near 1, everything else N(0, 0.1)."""
    rng = np.random.default_rng(1)
    _, abstract = abstract_build(tiny())
    draw = lambda path, x: jnp.asarray(
        (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.1 * rng.normal(size=x.shape), x.dtype
    )
    return jax.tree_util.tree_map_with_path(draw, abstract)


def ids(t=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(2, V, (2, t)), jnp.int32)


PACKED = dict(
    segment_ids=jnp.asarray(SEGMENTS[:, :12]),
    positions=jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0]]),
)


@pytest.mark.slow
def test_alternate_layers_scanned_in_pairs_and_fused_equal_the_loop(params):
    """Two (dense, banded) pairs scanned over the layers' stacked params, explicit and xla, give the
    looped layers' logits within 1e-5, on packed segments with their positions; the attention weights
    of the odd layers vanish outside the band, the even layers' do not."""
    loop, _ = abstract_build(tiny())
    scanned, _ = abstract_build(tiny(scan_layers=True))
    fused, _ = abstract_build(tiny(scan_layers=True, attention_impl="xla"))
    inputs = dict(input_ids=ids(), **PACKED)
    want = jax.jit(lambda p: loop.apply(p, **inputs).logits)(params)
    explicit, got = jax.jit(
        lambda p: (scanned.apply(p, return_weights=True, **inputs), fused.apply(p, **inputs).logits)
    )(scan_params(params))
    for logits in (explicit.logits, got):
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
    i, j = np.arange(12)[:, None], np.arange(12)[None, :]
    outside = j <= i - 3  # causal, outside the band (and inside a segment for some queries)
    weights = np.asarray(explicit.attention_weights["decoder"]["self"])  # [L, B, N, T, S]
    mass = np.abs(weights[..., outside]).sum(axis=(1, 2, 3))
    assert list(mass == 0) == [False, True, False, True], mass
    assert [tiny(local_layers=k).layer_window(i) for k in ("all", "alternate") for i in range(4)] == [
        3,
        3,
        3,
        3,
        0,
        3,
        0,
        3,
    ]


def test_cached_decoding_keeps_the_band(params):
    """Token by token through the KV cache (the band joins the dense mask at the cache's index) equals
    the full forward."""
    model, _ = abstract_build(tiny(scan_layers=True))
    scanned, tokens = scan_params(params), ids(6, seed=3)
    step, cache, steps = jax.jit(model.apply), model.init_cache(2, 6), []
    full = jax.jit(lambda p: model.apply(p, input_ids=tokens).logits)(scanned)
    for i in range(6):
        out = step(scanned, input_ids=tokens[:, i : i + 1], cache=cache)
        cache = out.cache
        steps.append(out.logits[:, 0])
    np.testing.assert_allclose(jnp.stack(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_banded_decoder_trains_one_step(params):
    cfg = tj.load_config(
        "configs/gpt_tiny.yaml",
        [f"model.{k}={v}" for k, v in TINY.items()]
        + ["model.scan_layers=true", "data.seq_len=16", "train.batch_size=2"],
    )
    model, _ = abstract_build(cfg)
    batch = {k: jnp.asarray(v) for k, v in step_bench.synthetic_batch(cfg, np.random.default_rng(0)).items()}
    loss_fn = tasks.get("clm").loss_fn(cfg)
    grad = jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p, batch, None)[0]))
    start = scan_params(params)
    loss, grads = grad(start)
    assert abs(float(loss) - np.log(V)) < 0.5  # a fresh model: about uniform
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    after, _ = grad(jax.tree.map(lambda p, g: p - 0.5 * g, start, grads))
    assert float(after) < float(loss)


REFUSED = [  # (overrides on gpt_tiny, the key the one line names and what it says)
    (["model.local_window_size=-1", "model.local_layers=all"], "model.local_window_size: must be >= 0"),
    (["model.local_window_size=16"], "model.local_layers: none, but model.local_window_size=16"),
    (["model.local_layers=alternate"], "model.local_window_size: 0, but model.local_layers=alternate"),
    (
        ["model.local_window_size=16", "model.local_layers=all", "model.attention_impl=tpu_flash"],
        "model.local_window_size: the tpu_flash kernel takes no local window",
    ),
    (
        ["model.local_window_size=16", "model.local_layers=alternate", "model.scan_layers=true", "model.num_layers=3"],
        "model.num_layers: 3 with local_layers alternate and scan_layers true",
    ),
]


@pytest.mark.parametrize("overrides,message", REFUSED)
def test_refusals_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        tj.load_config("configs/gpt_tiny.yaml", overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_band_outside_a_decoder_and_in_a_gpt2_export_are_refused():
    with pytest.raises(
        ConfigError,
        match="^model.local_window_size: banded attention is causal self-attention of "
        "family decoder only, got family encoder$",
    ):
        tj.load_config("configs/bert_tiny.yaml", ["model.local_window_size=16", "model.local_layers=all"])
    assert (
        tj.load_config(
            "configs/gpt_tiny.yaml",
            ["model.local_window_size=16", "model.local_layers=alternate", "model.num_layers=3"],
        ).model.num_layers
        == 3
    )  # looped: odd is fine
    with pytest.raises(ValueError) as e:
        hf.config_to_hf(tj.load_config("configs/gpt3_small.yaml").model, "GPT2LMHeadModel")
    assert str(e.value) == (
        "model.local_window_size: 256 (banded attention) cannot be exported as gpt2, whose attention is dense (needs 0)"
    )
    dense = tj.load_config("configs/gpt3_small.yaml", ["model.local_layers=none", "model.local_window_size=0"])
    assert hf.config_to_hf(dense.model, "GPT2LMHeadModel")["n_positions"] == 2048


# ----------------------------------------------------------------------------- bench --abstract
def abstract_bench(monkeypatch, capsys, *args):
    """(exit code, the JSON, the stderr lines) of `python -m train.bench --abstract ...`, in process."""
    code, out, err = run_main(bench, ["--abstract", *args], monkeypatch, capsys)
    return code, json.loads(out) if out.strip() else None, err.strip().splitlines()


def gpt3_175b(monkeypatch, capsys, devices, fsdp, tensor, *more):
    return abstract_bench(
        monkeypatch,
        capsys,
        "--config",
        "configs/gpt3_175b.yaml",
        "--devices",
        str(devices),
        "--set",
        f"mesh.fsdp={fsdp}",
        "--set",
        f"mesh.tensor={tensor}",
        *more,
    )


def test_abstract_memory_of_gpt3_175b_on_256_and_1024_devices(monkeypatch, capsys):
    runs = {
        (n, f, t): gpt3_175b(monkeypatch, capsys, n, f, t)
        for n, f, t in [(256, 32, 8), (256, 16, 8), (1024, 32, 8), (1024, 128, 8)]
    }
    assert all(code == 0 and len(err) == 1 for code, _, err in runs.values())
    r = {key: out for key, (_, out, _) in runs.items()}
    for (n, f, t), out in r.items():
        per, total = out["bytes_per_device"], out["total_bytes"]
        assert out["mesh"] == {"data": n // (f * t), "fsdp": f, "sequence": 1, "tensor": t}
        assert out["params_padded"] * 4 == total["params"]  # float32
        # replicated or cut by one axis only: norm scales (19 MB), biases, positions: 26 MB at fsdp 32
        assert 0 < per["params"] - total["params"] / (f * t) < 30e6
        assert abs(per["optimizer_state"] / per["params"] - 2) < 0.001  # AdamW: mu and nu
        assert per["gradients"] == per["params"]
        assert per["total"] == sum(v for k, v in per.items() if k != "total")
        assert out["fits"] == (per["total"] <= out["device_memory_bytes"]) and out["device_memory_bytes"] == 141e9
    assert abs(r[256, 16, 8]["bytes_per_device"]["params"] / r[256, 32, 8]["bytes_per_device"]["params"] - 2) < 0.015
    assert r[1024, 32, 8]["bytes_per_device"]["params"] == r[256, 32, 8]["bytes_per_device"]["params"]
    # four times the data-parallel ways: a quarter of the micro-batch and of every activation term
    a256, a1024 = r[256, 32, 8]["activations"], r[1024, 32, 8]["activations"]
    assert (a256["micro_batch_per_device"], a1024["micro_batch_per_device"]) == (48, 12)
    assert all(a256[k] == 4 * a1024[k] for k in ("stored", "recomputed_layer", "output_layer"))
    # remat full keeps one bfloat16 [tokens, 12288] per layer: the layer input
    assert a1024["kept_per_layer"] == 2 * 12288 * 12 * 2048 and a1024["layers"] == 96
    assert "Korthikanti" in r[256, 32, 8]["activation_formula"]
    assert [r[k]["verdict"] for k in r] == ["does not fit", "does not fit", "fits", "fits"]


def test_require_fit_fails_in_one_line_and_a_bad_pairing_is_refused(monkeypatch, capsys):
    code, out, err = gpt3_175b(monkeypatch, capsys, 256, 32, 8, "--require-fit")
    assert code == 1 and out["verdict"] == "does not fit"
    assert err[-1].startswith("error: --require-fit: 268.4 GB per device does not fit in 141.0 GB")
    code, out, _ = gpt3_175b(
        monkeypatch, capsys, 256, 32, 8, "--require-fit", "--set", "train.grad_accum=8", "--device-memory-gb", "80"
    )
    assert code == 0 and out["fits"] and out["gradient_copies"] == 2 and out["device_memory_bytes"] == 80e9
    code, _, err = gpt3_175b(monkeypatch, capsys, 1024, 32, 8, "--set", "train.grad_accum=16")
    assert code == 2 and err == [
        "error: train.batch_size: micro-batches of 96 do not split over data*fsdp = 128 devices"
    ]
    code, _, err = abstract_bench(monkeypatch, capsys, "--compare", "torch")
    assert code == 2 and err == ["error: --compare: --abstract runs nothing (it estimates memory); drop one of the two"]


def test_abstract_shard_bytes_equal_real_shards_on_8_devices(params):
    """The abstract accounting against arrays placed on a real 8-device CPU mesh by the same rules (the
    kv heads, 2, do not split 4 ways: replicated over tensor, as the rules table leaves them)."""
    cfg = tj.load_config(
        "configs/gpt_tiny.yaml",
        [f"model.{k}={v}" for k, v in TINY.items()] + ["mesh.fsdp=2", "mesh.tensor=4", "data.seq_len=16"],
    )
    model, abstract = abstract_build(cfg)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    real = jax.device_put(params, sharding.tree_shardings(model.logical_axes, abstract, mesh))
    on_device0 = sum(
        s.data.nbytes for x in jax.tree.leaves(real) for s in x.addressable_shards if s.device == jax.devices()[0]
    )
    abstract_shardings = sharding.tree_shardings(model.logical_axes, abstract, memory.abstract_mesh(cfg, 8))
    assert on_device0 == memory.tree_bytes(abstract, abstract_shardings) < memory.tree_bytes(abstract) / 4
    assert memory.tree_bytes(abstract) == sum(x.nbytes for x in jax.tree.leaves(real))


def test_model_flops_count_the_band(monkeypatch, capsys):
    """A banded layer counts w*T - w^2/2 query-key pairs where a causal one counts T^2/2: GPT-3 175B's
    48 banded layers of width 256 over 2048 tokens save 48 * 12 * 12288 * (2048^2/2 - 256*2048 + 256^2/2)
    FLOPs per sequence; a band as wide as the sequence saves nothing."""
    band = tj.load_config("configs/gpt3_175b.yaml")
    dense = tj.load_config("configs/gpt3_175b.yaml", ["model.local_layers=none", "model.local_window_size=0"])
    wide = tj.load_config("configs/gpt3_175b.yaml", ["model.local_window_size=4096"])
    abstract = abstract_build(band)[1]
    counted = {
        name: flops.model_flops_per_example(c, abstract, 2048, 0)
        for name, c in (("band", band), ("dense", dense), ("wide", wide))
    }
    assert counted["dense"] - counted["band"] == 48 * 12 * 12288 * (2048**2 / 2 - (256 * 2048 - 256**2 / 2))
    assert counted["wide"] == counted["dense"]
    code, _, err = abstract_bench(monkeypatch, capsys, "--steps", "1")  # --abstract: fine, ignored
    assert code == 0
    monkeypatch.setattr(sys, "argv", ["train.bench", "--require-fit"])
    with pytest.raises(SystemExit) as e:
        cli.main(bench.main)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --require-fit needs --abstract"
