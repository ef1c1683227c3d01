"""Attention visualisation: the weights are the forward pass's own (ModelOutput.attention_weights of
the same call that gives the logits), rows sum to 1 and respect the masks, PNGs and one HTML page
are written, for encoder-only, decoder-only and encoder-decoder checkpoints (train.visualize)."""

from __future__ import annotations

import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import viz
from transformer_jax.config import Config, DataConfig, ModelConfig, TrainConfig, save_config
from transformer_jax.models import Model, build

FAMILIES = {"encoder": "mlm", "decoder": "clm", "encoder_decoder": "translate"}


def _model(family, **kw):
    cfg = ModelConfig(
        family=family,
        vocab_size=400,
        model_dim=32,
        num_heads=2,
        mlp_dim=64,
        num_layers=2,
        position="sinusoidal",
        init_std=0.3,
        **kw,
    )
    return build(cfg, 0)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.slow
def test_weights_come_from_the_forward_pass_and_rows_sum_to_one(family, monkeypatch):
    model, params = _model(family)
    ids = np.array([5, 9, 17, 3, 40, 41], np.int32)
    dec = np.array([0, 7, 8, 9], np.int32) if family == "encoder_decoder" else None
    calls = []
    real_apply = Model.apply

    def spy(self, p, **inputs):  # every forward pass viz runs
        out = real_apply(self, p, **inputs)
        calls.append((inputs, out))
        return out

    monkeypatch.setattr(Model, "apply", spy)
    maps = viz.attention_maps(model, params, input_ids=ids, decoder_input_ids=dec)
    assert len(calls) == 1 and calls[0][0]["return_weights"] is True  # one pass: its weights, its outputs
    inputs, out = calls[0]
    # the real vocabulary (400): viz cuts the padded logit columns off
    final = lambda o: np.asarray(o.logits[0, :, :400] if o.logits is not None else o.hidden_states[0])
    np.testing.assert_array_equal(maps.outputs, final(out))
    expected = {
        "encoder": ["encoder_self"],
        "decoder": ["decoder_self"],
        "encoder_decoder": ["encoder_self", "decoder_self", "cross"],
    }[family]
    assert sorted(maps.weights) == sorted(expected)
    where = {"encoder_self": ("encoder", "self"), "decoder_self": ("decoder", "self"), "cross": ("decoder", "cross")}
    for kind, w in maps.weights.items():
        a, b = where[kind]
        np.testing.assert_array_equal(w, np.asarray(out.attention_weights[a][b])[:, 0])  # the pass's own arrays
        assert w.shape[:2] == (2, 2) and np.all(w >= 0)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)  # every query's row is a distribution
    if "decoder_self" in maps.weights:  # causal: nothing above the diagonal
        w = maps.weights["decoder_self"]
        assert np.all(np.triu(w, k=1) == 0) and w.shape[-1] == w.shape[-2]
    monkeypatch.setattr(Model, "apply", real_apply)
    # and that pass is the model's ordinary forward: same outputs as without weights
    plain = model.apply(params, **{k: v for k, v in inputs.items() if k != "return_weights"})
    np.testing.assert_allclose(maps.outputs, final(plain), rtol=1e-5, atol=1e-5)


def test_weights_are_the_models_softmax_of_its_own_queries_and_keys(monkeypatch):
    """An independent check on layer 0 of an encoder: softmax(q k^T / sqrt(d)) from the layer's own
    projections of its input, computed here in NumPy float64, equals the returned map."""
    from transformer_jax import layers

    model, params = _model("encoder", norm_position="post", norm="layernorm")
    ids = np.array([[5, 9, 17, 3, 40]], np.int32)
    maps = viz.attention_maps(model, params, input_ids=ids[0])
    captured = []
    real_call = layers.MultiHeadAttention.__call__

    def capture(self, x, *a, **k):  # the first attention called is layer 0's: record its input
        captured.append((self, np.asarray(x, np.float64)))
        return real_call(self, x, *a, **k)

    monkeypatch.setattr(layers.MultiHeadAttention, "__call__", capture)
    model.apply(params, input_ids=jnp.asarray(ids), attention_mask=jnp.ones_like(ids))
    monkeypatch.setattr(layers.MultiHeadAttention, "__call__", real_call)
    mha, x = captured[0]
    x = x[0]

    def project(dense):
        p = {k: np.asarray(v, np.float64) for k, v in dense.params().items()}
        return np.einsum("tm,mhd->thd", x, p["kernel"]) + p.get("bias", 0.0)

    q, k = project(mha.query), project(mha.key)
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert ref.max() > 0.5  # peaked enough that a wrong map would show
    np.testing.assert_allclose(maps.weights["encoder_self"][0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_heatmaps_and_index_page(tmp_path):
    model, params = _model("encoder_decoder")
    maps = viz.attention_maps(model, params, input_ids=np.array([5, 6, 7, 1]), decoder_input_ids=np.array([0, 8, 9]))
    tokens = {"source": ["▁a", "▁b", "c", "</s>"], "target": ["<start>", "▁x", "y"]}
    files = viz.save_heatmaps(maps, tokens, str(tmp_path))
    assert len(files) == 3 * 2 * 2  # kinds x layers x heads
    for h in files:
        with open(h.path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = viz.write_index(files, str(tmp_path / "index.html"), texts={"text": "a b c <&>"})
    content = open(page).read()
    assert set(re.findall(r"src='([^']+)'", content)) == {os.path.basename(h.path) for h in files}
    assert "&lt;&amp;&gt;" in content
    with pytest.raises(ValueError, match="labels"):
        viz.plot_heatmap(maps.weights["cross"][0, 0], ["x"], ["y"], str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="layer 5 out of range"):
        viz.save_heatmaps(maps, tokens, str(tmp_path), layers=[5])


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from transformer_jax.data.tokenizer import train_sentencepiece

    words = "the quick brown fox jumps over a lazy dog der schnelle braune fuchs springt".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 8)) for _ in range(300)]
    d = tmp_path_factory.mktemp("tok")
    train_sentencepiece(texts, 400, str(d / "tokenizer"), num_sentinels=0)
    return str(d / "tokenizer.model")


def _checkpoint(tmp_path, family, tok_path) -> str:
    """A workdir as our programs leave it: config.yaml, tokenizer.model, params/."""
    import shutil

    from transformer_jax.checkpoint import save_params

    workdir = tmp_path / family
    workdir.mkdir()
    mcfg = ModelConfig(
        family=family,
        vocab_size=400,
        model_dim=32,
        num_heads=2,
        mlp_dim=64,
        num_layers=2,
        position="sinusoidal",
        init_std=0.3,
    )
    cfg = Config(model=mcfg, train=TrainConfig(objective=FAMILIES[family]), data=DataConfig(seq_len=16))
    save_config(cfg, str(workdir / "config.yaml"))
    shutil.copy(tok_path, workdir / "tokenizer.model")
    save_params(str(workdir / "params"), build(mcfg, 0)[1])
    return str(workdir)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.slow
def test_visualize_program_for_each_family(tmp_path, tok_path, family, monkeypatch, capsys):
    from train import cli, visualize

    workdir = _checkpoint(tmp_path, family, tok_path)
    outdir = tmp_path / "out"
    # one text for every run that reaches the model: the same shapes, so the greedy translation (a
    # jitted generate) and the eager forward pass compile once, not once per text
    text = "the quick brown fox"
    result = visualize.visualize(workdir, text, outdir=str(outdir))
    n_kinds = 3 if family == "encoder_decoder" else 1
    assert len(result["pngs"]) == n_kinds * 2 * 2 and all(os.path.isfile(p) for p in result["pngs"])
    assert os.path.isfile(outdir / "index.html")
    for kind, w in result["maps"].weights.items():
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        rows, cols = viz.KINDS[kind][:2] if family == "encoder_decoder" else ("source", "source")
        assert w.shape[2:] == (len(result["tokens"][rows]), len(result["tokens"][cols]))
    if family == "encoder_decoder":  # the model's own greedy translation, or a given target
        given = visualize.visualize(
            workdir, text, target="der schnelle fuchs", outdir=str(tmp_path / "given"), layers=[1], heads=[0]
        )
        assert len(given["pngs"]) == 3 and given["tokens"]["target"][0] == "<start>"

    # the command line: one line on success; a mistake is one line on stderr and exit 2
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "visualize",
            "--checkpoint",
            workdir,
            "--text",
            text,
            "--workdir",
            str(tmp_path / "cli"),
            "--layers",
            "1",
            "--heads",
            "1",
        ],
    )
    cli.main(visualize.main)
    assert "heatmaps; open" in capsys.readouterr().out and os.path.isfile(tmp_path / "cli" / "index.html")
    errors = [
        (["--text", text, "--layers", "9"], "layer 9 out of range"),  # found after the forward pass
        (["--text", "x", "--heads", "a,b"], "--heads: expected"),
        (["--text", "  "], "--text: empty"),
    ]
    if family == "decoder":  # --set: runtime keys on top of the checkpoint's config; no architecture, no --config
        short = visualize.visualize(
            workdir, "the quick brown fox jumps", outdir=str(tmp_path / "short"), overrides=["data.seq_len=3"]
        )
        assert len(short["tokens"]["source"]) == 3
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "visualize",
                "--checkpoint",
                workdir,
                "--text",
                "a lazy dog",
                "--outdir",
                str(tmp_path / "old"),
                "--set",
                "model.dtype=bfloat16",
            ],
        )  # the older --outdir
        cli.main(visualize.main)
        assert "heatmaps; open" in capsys.readouterr().out and os.path.isfile(tmp_path / "old" / "index.html")
        errors += [
            (["--text", "x", "--set", "model.num_layers=1"], "model.num_layers: fixed by the model of --checkpoint"),
            (["--text", "x", "--set", "model.num_head=1"], "model.num_head: unknown key"),
            (["--text", "x", "--config", "configs/gpt_tiny.yaml"], "--config: with --checkpoint"),
            (["--text", "x", "--set", "data.seq_len=4", "--max_len", "4"], "--max_len: also given"),
        ]
    for argv, message in errors:
        monkeypatch.setattr(sys, "argv", ["visualize", "--checkpoint", workdir, *argv, "--outdir", str(tmp_path / "e")])
        with pytest.raises(SystemExit) as e:
            cli.main(visualize.main)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
