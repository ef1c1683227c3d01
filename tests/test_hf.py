"""Hugging Face import/export against `transformers`' own PyTorch models, built with random weights
here (nothing is downloaded): outputs on padded inputs, greedy generation, exact round trips,
sharded checkpoints, placement on a mesh, errors, the convert program, tokenizers."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import transformer_jax as tj  # noqa: E402
from transformer_jax import decoding, hf, sharding  # noqa: E402
from transformer_jax.config import MeshConfig  # noqa: E402

from helpers import REPO, run_program  # noqa: E402

TOL = 1e-4
B, T = 2, 11

BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
)
GPT2 = dict(
    vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=98, eos_token_id=98, pad_token_id=0
)
T5 = dict(
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    decoder_start_token_id=0,
)
T5_VARIANTS = {
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
BERT_ARCHS = ["BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"]
DIFFS = {}  # max abs differences measured, printed at the end (pytest -s)


def randomize(model, std, seed=0):
    """Every weight N(0, std) (large enough that greedy choices are far from ties); norm scales 1 + N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            is_norm = any(s in name for s in ("LayerNorm", "layer_norm", "ln_"))
            p.copy_(
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if is_norm and name.endswith("weight")
                else std * torch.randn(p.shape, generator=g)
            )
    return model.eval()


def make_bert(arch):
    return randomize(getattr(tf, arch)(tf.BertConfig(**BERT, num_labels=3)), 0.2)


def make_gpt2():
    return randomize(tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2)), 0.5)


def make_t5(variant):
    model = tf.T5ForConditionalGeneration(tf.T5Config(**T5, **T5_VARIANTS[variant]))
    if variant == "v1_1":  # transformers 5 ties lm_head unless the checkpoint holds a different one
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(T5["vocab_size"], T5["d_model"]))
    return randomize(model, 0.2, seed=1)


def make_mt5():
    """mT5 / Flan-T5 shapes: heads * d_kv != d_model, gated-gelu, decoder outputs never scaled."""
    config = tf.MT5Config(**dict(T5, d_kv=16, num_decoder_layers=2), feed_forward_proj="gated-gelu")
    return randomize(tf.MT5ForConditionalGeneration(config), 0.2, seed=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Each HF model saved once: {name: (torch model, directory)}."""
    root = tmp_path_factory.mktemp("hf")
    models = {arch: make_bert(arch) for arch in BERT_ARCHS}
    models["gpt2"] = make_gpt2()
    models.update({f"t5_{v}": make_t5(v) for v in T5_VARIANTS})
    models["mt5"] = make_mt5()
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        out[name] = (model, str(root / name))
    return out


def padded_inputs(seed=0, t=T):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 98, (B, t))
    mask = np.ones((B, t), np.int64)
    mask[1, -4:] = 0  # right padding on the second row
    return ids, mask, rng


def maxdiff(a, b, where=None):
    a = a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)
    d = np.abs(a - np.asarray(b))
    return float((d[where] if where is not None else d).max())


def record(name, **diffs):
    DIFFS.setdefault(name, {}).update(diffs)
    for key, value in diffs.items():
        assert value <= TOL, f"{name} {key}: max abs difference {value:.3g} > {TOL}"


def teardown_module():
    for name, diffs in DIFFS.items():
        print(f"\n{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()), end="")


# ----------------------------------------------------------------------------- outputs match
@pytest.mark.parametrize("arch", BERT_ARCHS)
@pytest.mark.slow
def test_bert_outputs_match(dirs, arch):
    torch_model, path = dirs[arch]
    model, params = hf.from_pretrained(path)
    assert model.cfg.family == "encoder" and model.cfg.norm_eps == 1e-12 and model.cfg.activation == "gelu"
    assert (
        set(model.cfg.heads)
        == {
            "BertModel": set(),
            "BertForMaskedLM": {"mlm"},
            "BertForPreTraining": {"mlm", "nsp"},
            "BertForSequenceClassification": {"classification"},
        }[arch]
    )
    ids, mask, rng = padded_inputs()
    types = rng.integers(0, 2, (B, T))
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
            output_hidden_states=True,
        )
    out = jax.jit(model.apply)(
        params, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types)
    )
    diffs = {"hidden": maxdiff(ref.hidden_states[-1], out.hidden_states)}
    vocab = model.cfg.vocab_size  # our token logits are padded to padded_vocab_size (masked columns)
    if arch == "BertModel":
        diffs["pooler"] = maxdiff(ref.pooler_output, out.pooled)
    elif arch == "BertForPreTraining":
        assert out.logits.shape[-1] == model.cfg.padded_vocab_size == 128 and (out.logits[..., vocab:] == -1e9).all()
        diffs.update(
            mlm_logits=maxdiff(ref.prediction_logits, out.logits[..., :vocab]),
            nsp_logits=maxdiff(ref.seq_relationship_logits, out.heads["nsp"]),
        )
    else:
        logits = out.logits[..., :vocab] if arch == "BertForMaskedLM" else out.logits
        assert logits.shape == ref.logits.shape
        diffs["logits"] = maxdiff(ref.logits, logits)
    record(arch, **diffs)


def test_gpt2_outputs_match(dirs):
    torch_model, path = dirs["gpt2"]
    model, params = hf.from_pretrained(path)
    assert model.cfg.activation == "gelu_tanh" and model.cfg.tie_embeddings and model.cfg.norm_eps == 1e-5
    table = np.asarray(params["embed"]["token"]["embedding"])  # 99 real rows, zeros up to the padded 128
    assert model.cfg.vocab_size == 99 and table.shape == (128, 32) and not table[99:].any() and table[98].any()
    ids, mask, _ = padded_inputs()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    out = jax.jit(model.apply)(params, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)  # right padding: only real positions are defined
    record(
        "GPT2LMHeadModel",
        logits=maxdiff(ref.logits, out.logits[..., : model.cfg.vocab_size], real),
        hidden=maxdiff(ref.hidden_states[-1], out.hidden_states, real),
    )


@pytest.mark.parametrize("variant", list(T5_VARIANTS) + ["mt5"])
def test_t5_outputs_match(dirs, variant):
    torch_model, path = dirs["mt5" if variant == "mt5" else f"t5_{variant}"]
    model, params = hf.from_pretrained(path)
    cfg = model.cfg
    assert not cfg.scale_attention and cfg.position == "relative" and cfg.norm == "rmsnorm" and not cfg.use_bias
    if variant == "v1_0":
        assert cfg.activation == "relu" and cfg.tie_embeddings and cfg.tied_logits_scale
    elif variant == "v1_1":
        assert cfg.activation == "gated_gelu" and not cfg.tie_embeddings and not cfg.tied_logits_scale
        head = np.asarray(params["lm_head"]["kernel"])  # untied: [m, padded vocab], zero columns past 99
        assert head.shape == (32, 128) and not head[:, 99:].any() and head[:, 98].any()
    else:
        assert cfg.activation == "gated_gelu" and cfg.head_dim == 16 and not cfg.tied_logits_scale
    assert cfg.resolved_decoder_layers == (2 if variant == "mt5" else 3)
    ids, mask, rng = padded_inputs()
    dec = rng.integers(2, 98, (B, 7))
    dec_mask = np.ones((B, 7), np.int64)
    dec_mask[0, -2:] = 0
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dec_mask),
            output_hidden_states=True,
        )
    out = jax.jit(model.apply)(
        params,
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.asarray(mask),
        decoder_input_ids=jnp.asarray(dec),
        decoder_attention_mask=jnp.asarray(dec_mask),
    )
    record(
        "MT5ForConditionalGeneration" if variant == "mt5" else f"T5ForConditionalGeneration {variant}",
        logits=maxdiff(ref.logits, out.logits[..., : cfg.vocab_size]),
        decoder_hidden=maxdiff(ref.decoder_hidden_states[-1], out.hidden_states),
        encoder_hidden=maxdiff(ref.encoder_last_hidden_state, out.encoder_hidden_states),
    )


# ----------------------------------------------------------------------------- greedy generation
def test_gpt2_greedy_generation_matches_hf(dirs):
    torch_model, path = dirs["gpt2"]
    model, params = hf.from_pretrained(path)
    rng = np.random.default_rng(3)
    ids = rng.integers(2, 98, (B, 6))
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # a left-padded prompt
    with torch.no_grad():
        ref = torch_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            num_beams=1,
            max_new_tokens=20,
            eos_token_id=None,
            pad_token_id=0,
        )
    ref = ref[:, ids.shape[1] :].numpy()
    ours = np.asarray(decoding.generate(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=20))
    assert ref.shape == (B, 20)
    np.testing.assert_array_equal(ours, ref)
    assert len(set(ref.ravel().tolist())) > 3  # a real sequence, not one repeated token


@pytest.mark.parametrize("variant", list(T5_VARIANTS))
@pytest.mark.slow
def test_t5_greedy_generation_matches_hf(dirs, variant):
    torch_model, path = dirs[f"t5_{variant}"]
    model, params = hf.from_pretrained(path)
    ids, mask, _ = padded_inputs(seed=4)
    with torch.no_grad():
        ref = torch_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            num_beams=1,
            max_new_tokens=20,
            use_cache=False,
        )  # HF's cache assumes
    ref = ref.numpy()  # num_decoder_layers == num_layers
    assert (ref[:, 0] == 0).all()  # decoder start = pad 0
    ref = ref[:, 1:]
    ours = np.asarray(
        decoding.generate(
            model,
            params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            max_new_tokens=20,
            eos_id=1,
            pad_id=0,
            decoder_start_id=0,
        )
    )
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert len(set(ref.ravel().tolist())) > 3


# ----------------------------------------------------------------------------- round trips
def assert_same_state_dict(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "name", ["BertForPreTraining", "BertForSequenceClassification", "BertModel", "gpt2", "t5_v1_0", "t5_v1_1", "mt5"]
)
def test_round_trip_gives_identical_tensors(dirs, tmp_path, name):
    torch_model, path = dirs[name]
    model, params = hf.from_pretrained(path)
    out = hf.to_pretrained(model, params, tmp_path / "out")
    assert set(os.listdir(out)) == {"model.safetensors", "config.json"}
    cls = tf.T5ForConditionalGeneration if name == "mt5" else type(torch_model)  # we write T5 for mT5
    back = cls.from_pretrained(out)
    assert type(back).__name__ == json.load(open(os.path.join(out, "config.json")))["architectures"][0]
    assert_same_state_dict(torch_model, back)
    if name == "t5_v1_1":
        assert back.lm_head.weight.data_ptr() != back.shared.weight.data_ptr()
    if name.startswith("t5") or name == "mt5":  # same outputs too: decoder output scaling survives the trip
        ids, mask, _ = padded_inputs()
        kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(ids))
        with torch.no_grad():
            assert torch.equal(back(**kw).logits, torch_model(**kw).logits)


def test_export_other_architecture_and_scanned_params(dirs, tmp_path):
    """A BertForPreTraining import exported as BertModel; scanned params export like looped ones."""
    torch_model, path = dirs["BertForPreTraining"]
    model, params = hf.from_pretrained(path, scan_layers=True)
    assert model.cfg.scan_layers and params["encoder"]["layers"]["attention"]["query"]["kernel"].shape == (2, 32, 4, 8)
    hf.to_pretrained(model, params, tmp_path / "base", architecture="BertModel")
    back = tf.BertModel.from_pretrained(tmp_path / "base")
    for key, value in back.state_dict().items():
        assert torch.equal(value, torch_model.state_dict()["bert." + key]), key
    with pytest.raises(ValueError, match="architecture: GPT2LMHeadModel needs model.family=decoder"):
        hf.to_pretrained(model, params, tmp_path / "x", architecture="GPT2LMHeadModel")


def test_sharded_safetensors_and_pytorch_bin_load(dirs, tmp_path):
    torch_model, path = dirs["t5_v1_1"]
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    _, reference = hf.from_pretrained(path)
    _, sharded = hf.from_pretrained(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, sharded, reference)
    # pytorch_model.bin (torch) and a bfloat16 safetensors file
    os.makedirs(tmp_path / "bin")
    torch.save(torch_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    json.dump(json.load(open(os.path.join(path, "config.json"))), open(tmp_path / "bin" / "config.json", "w"))
    _, from_bin = hf.from_pretrained(tmp_path / "bin")
    jax.tree.map(np.testing.assert_array_equal, from_bin, reference)
    torch_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    torch_model.to(torch.float32)
    _, bf16 = hf.from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    leaf = bf16["encoder"]["layers"][0]["mlp"]["wi"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(leaf, np.float32),
        np.asarray(jnp.asarray(reference["encoder"]["layers"][0]["mlp"]["wi"]["kernel"], jnp.bfloat16), np.float32),
    )


def test_placement_on_a_mesh_follows_the_rules(dirs):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, path = dirs["t5_v1_1"]
    model, params = hf.from_pretrained(path, mesh=mesh)
    _, reference = hf.from_pretrained(path)
    expected = sharding.tree_shardings(model.logical_axes, params, mesh)
    split = 0
    for (p, x), want, ref in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected), jax.tree.leaves(reference)
    ):
        assert x.sharding.is_equivalent_to(want, x.ndim), (jax.tree_util.keystr(p), x.sharding, want)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
        split += any(s is not None for s in want.spec)
        if x.ndim and any(s is not None for s in want.spec):
            assert x.addressable_shards[0].data.size < x.size  # no device holds a full copy
    assert split > 10
    query = params["encoder"]["layers"][0]["attention"]["query"]["kernel"]  # [embed, heads, kv]
    assert query.sharding.spec[:2] == ("fsdp", "tensor")


# ----------------------------------------------------------------------------- errors
def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported architecture 'LlamaForCausalLM'"):
        hf.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_parameter(dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = dirs["BertForMaskedLM"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    key = "bert.encoder.layer.1.attention.self.query.weight"
    tensors[key] = tensors[key][:, :31].copy()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.attention\.self\.query\.weight: shape \(32, 31\)"):
        hf.from_pretrained(tmp_path)
    del tensors["bert.encoder.layer.0.output.dense.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.output\.dense\.bias: missing"):
        hf.from_pretrained(tmp_path)


def test_hub_name_asks_for_a_local_directory(tmp_path):
    for name in ("bert-base-uncased", "google/t5-v1_1-small"):
        with pytest.raises(ValueError, match="not a local directory.*never downloads"):
            hf.from_pretrained(name)
        with pytest.raises(ValueError, match="not a local directory"):
            hf.load_tokenizer(name)
    with pytest.raises(ValueError, match="no config.json"):
        hf.from_pretrained(tmp_path)


@pytest.mark.slow
def test_convert_cli_hub_name_exits_2_with_one_line(tmp_path):
    r = run_program("train.convert", ["--from-hf", "bert-base-uncased", "--workdir", str(tmp_path / "w")], timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "local directory" in lines[0], r.stderr


@pytest.mark.slow
def test_imports_and_loads_without_torch_and_transformers(dirs):
    _, path = dirs["gpt2"]
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import transformer_jax as tj, transformer_jax.hf\n"
        f"model, params = tj.hf.from_pretrained({path!r})\n"
        "assert model.cfg.family == 'decoder'; print('ok')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ----------------------------------------------------------------------------- train.convert
@pytest.mark.parametrize("name", ["BertForPreTraining", "t5_v1_1"])
@pytest.mark.slow
def test_convert_round_trip(dirs, tmp_path, name):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from train import convert

    torch_model, path = dirs[name]
    hf_dir = tmp_path / "hf"
    torch_model.save_pretrained(hf_dir)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))

    convert.main(["--from-hf", str(hf_dir), "--workdir", str(tmp_path / "work"), "--set", "train.steps=7"])
    cfg = tj.load_config(tmp_path / "work" / "config.yaml")
    want = {"BertForPreTraining": ("encoder", "mlm_nsp"), "t5_v1_1": ("encoder_decoder", "span_corruption")}[name]
    assert (cfg.model.family, cfg.train.objective, cfg.train.steps) == (*want, 7)
    assert os.path.isdir(tmp_path / "work" / "params") and os.path.isfile(tmp_path / "work" / "tokenizer.json")

    convert.main(["--checkpoint", str(tmp_path / "work"), "--to-hf", str(tmp_path / "back")])
    back = type(torch_model).from_pretrained(tmp_path / "back")
    assert_same_state_dict(torch_model, back)
    assert hf.load_tokenizer(tmp_path / "back").encode("hello world") == [1, 2]
    # the older spellings (--to, --from) still work; the weights fix the architecture: refused in one line
    convert.main(["--from", str(tmp_path / "work"), "--to-hf", str(tmp_path / "again")])
    assert_same_state_dict(torch_model, type(torch_model).from_pretrained(tmp_path / "again"))
    for argv, message in [
        (
            ["--checkpoint", str(tmp_path / "work"), "--to-hf", str(tmp_path / "x"), "--set", "model.num_layers=1"],
            "model.num_layers: fixed by the model of --checkpoint",
        ),
        (
            ["--from-hf", str(hf_dir), "--workdir", str(tmp_path / "x"), "--set", "model.mlp_dim=8"],
            "model.mlp_dim: fixed by the model of --from-hf",
        ),
        (["--checkpoint", str(tmp_path / "work")], "--checkpoint needs --to-hf HF_DIR"),
        (["--from-hf", str(hf_dir)], "--from-hf needs --workdir"),
    ]:
        with pytest.raises(ValueError, match=message):
            convert.main(argv)
    assert not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------- tokenizers
def write_corpus(tmp_path):
    text = ["the quick brown fox jumps over the lazy dog", "hello world, the dog says hello"] * 20
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text))
    return corpus


def test_load_tokenizer_from_vocab_files_and_tokenizer_json(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    corpus = write_corpus(tmp_path)

    (tmp_path / "bert").mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "hello", "world", "##s", ","]
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab))
    bert = hf.load_tokenizer(tmp_path / "bert")
    assert bert.kind == "wordpiece" and bert.encode("The quick fox, hello worlds") == [5, 6, 8, 12, 9, 10, 11]
    assert bert.token_to_id("[MASK]") == 4

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=300, min_frequency=1)
    (tmp_path / "gpt2").mkdir()
    bpe.save_model(str(tmp_path / "gpt2"))
    gpt2 = hf.load_tokenizer(tmp_path / "gpt2")
    assert gpt2.kind == "bpe" and gpt2.encode("hello the dog") == bpe.encode("hello the dog").ids
    assert gpt2.decode(gpt2.encode(" lazy fox")) == " lazy fox"

    (tmp_path / "json").mkdir()
    bpe.save(str(tmp_path / "json" / "tokenizer.json"))
    (tmp_path / "json" / "vocab.txt").write_text("ignored: tokenizer.json comes first")
    fast = hf.load_tokenizer(tmp_path / "json")
    assert fast.kind == "tokenizers" and fast.encode("quick brown") == bpe.encode("quick brown").ids
    assert fast.vocab_size == bpe.get_vocab_size()

    with pytest.raises(ValueError, match="no tokenizer"):
        hf.load_tokenizer(tmp_path)


def test_load_tokenizer_from_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = write_corpus(tmp_path)
    (tmp_path / "t5").mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "t5" / "spiece"),
        vocab_size=34,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    t5 = hf.load_tokenizer(tmp_path / "t5")
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "t5" / "spiece.model"))
    assert t5.kind == "sentencepiece" and t5.encode("the lazy dog") == reference.encode("the lazy dog")
    assert t5.decode(t5.encode("the lazy dog")) == "the lazy dog" and t5.vocab_size == 34
    assert t5.token_to_id("</s>") == 1
