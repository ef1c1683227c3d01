"""train.generate: its tokens are tj.decoding.generate's (our workdir) and transformers' (a Hugging Face
GPT-2 directory), sampling is seeded, an encoder-decoder's beam is tj.decoding.beam_search's, and bad
input is one line on stderr. Tiny random-weight models are made here; the program runs in process."""

import contextlib
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer_jax as tj
from train import cli, generate
from transformer_jax import checkpoint, decoding, runs
from transformer_jax.config import load_config, save_config
from transformer_jax.data.tokenizer import Tokenizer

from helpers import run_program

PROMPTS = ["def main(", "import sys"]  # 8 tokens each with the test tokenizer: one compiled decode serves both
N = 8  # new tokens
BAND = ("model.local_window_size=4", "model.local_layers=all")  # a banded model: a ring of 4 positions


def make_workdir(path, config, tokenizer_path, *overrides, std=0.3):
    """A workdir of ours with random weights N(0, std) (norm scales 1 + N(0, std)): config.yaml, params/
    (checkpoint.save_params), tokenizer.model."""
    cfg = load_config(
        f"configs/{config}.yaml",
        [
            "model.model_dim=32",
            "model.mlp_dim=64",
            "model.num_heads=2",
            "model.num_layers=1",
            "model.vocab_size=512",
            "data.seq_len=32",
            f"data.tokenizer={tokenizer_path}",
            *overrides,
        ],
    )
    _, abstract = tj.abstract_build(cfg)  # weights drawn in NumPy: faster than tj.build's first run
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(("scale" in jax.tree_util.keystr(p)) + std * rng.standard_normal(x.shape), x.dtype),
        abstract,
    )
    os.makedirs(path)
    save_config(cfg, os.path.join(path, "config.yaml"))
    checkpoint.save_params(os.path.join(path, "params"), params)
    shutil.copy(tokenizer_path, os.path.join(path, "tokenizer.model"))
    return str(path), params


@pytest.fixture(scope="module")
def gpt(tmp_path_factory, tokenizer_path):
    return make_workdir(tmp_path_factory.mktemp("w") / "gpt", "gpt_tiny", tokenizer_path, "model.max_len=32")


@pytest.fixture(scope="module")
def t5(tmp_path_factory, tokenizer_path):
    return make_workdir(tmp_path_factory.mktemp("w") / "t5", "t5_tiny", tokenizer_path, "model.head_dim=16")


@pytest.fixture(scope="module", autouse=True)
def one_model_per_directory():
    """The program opens each directory once here: a Model is a static argument of the jitted decoders
    (hashed by identity), so the references below reuse the program's compiled functions."""
    opened = {}

    def open_model(directory, overrides=()):
        key = (directory, tuple(overrides))
        if key not in opened:
            opened[key] = runs.open_model(directory, overrides)
        return opened[key]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(generate, "open_model", open_model)
        yield open_model


def run(*argv, stdin=""):
    """The program as `python -m train.generate` runs it (cli.main), in process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(err):
            cli.main(lambda: generate.main(list(argv), stdin=io.StringIO(stdin), stdout=out))
    except SystemExit as e:
        code = e.code
    return code, out.getvalue(), err.getvalue()


def records(*argv, stdin=""):
    code, out, err = run(*argv, "--json", stdin=stdin)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def cut(tokens, eos):
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.slow
def test_greedy_is_decoding_generate_on_our_workdir(gpt, tokenizer_path, one_model_per_directory):
    path, saved = gpt
    opened = one_model_per_directory(path)
    model, params, tok = opened.model, opened.params, Tokenizer(tokenizer_path)
    assert opened.source == "workdir" and opened.eos_id == tok.eos_id
    jax.tree.map(np.testing.assert_array_equal, params, saved)
    got = records("--checkpoint", path, "--max_new_tokens", str(N), stdin="\n".join(PROMPTS) + "\n")
    assert [r["prompt"] for r in got] == PROMPTS
    for r in got:
        ids = tok.encode(r["prompt"])
        ref = decoding.generate(model, params, jnp.asarray([ids]), max_new_tokens=N, eos_id=tok.eos_id)
        assert r["prompt_ids"] == ids and r["token_ids"] == cut(np.asarray(ref)[0], tok.eos_id)
        assert len(set(r["token_ids"])) > 1  # not one token repeated: the comparison means something
        assert r["text"] == tok.decode(ids + [t for t in r["token_ids"] if t != tok.eos_id])[len(r["prompt"]) :]
        assert len(r["scores"]) == len(r["token_ids"]) and max(r["scores"]) <= 0  # checked against torch below
    code, out, _ = run("--checkpoint", path, "--max_new_tokens", str(N), *[a for p in PROMPTS for a in ("--prompt", p)])
    assert code == 0 and out == "".join(r["text"] + "\n" for r in got)  # the text mode prints the same texts


@pytest.mark.slow
def test_a_banded_model_holds_a_ring_cache(gpt, tmp_path, tokenizer_path, one_model_per_directory):
    """cache_bytes: keys and values of every layer and position, float32, plus the int32 index; a banded
    layer (local window 4) keeps 4 positions of the 16, and decodes as the reference without a cache."""
    banded, _ = make_workdir(tmp_path / "banded", "gpt_tiny", tokenizer_path, "model.max_len=32", *BAND)
    flags = ("--max_new_tokens", str(N), "--prompt", PROMPTS[0])
    (dense,), (ring,) = records("--checkpoint", gpt[0], *flags), records("--checkpoint", banded, *flags)
    positions = len(dense["prompt_ids"]) + N
    assert dense["cache_bytes"] == 2 * positions * 2 * 16 * 4 + 4  # [L=1, B=1, S, K=2, H=16] twice
    assert ring["cache_bytes"] == 2 * 4 * 2 * 16 * 4 + 4 < dense["cache_bytes"]
    opened = one_model_per_directory(banded)
    ref = decoding.generate(
        opened.model, opened.params, jnp.asarray([ring["prompt_ids"]]), max_new_tokens=N, use_cache=False
    )
    assert ring["token_ids"] == cut(np.asarray(ref)[0], opened.eos_id)


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy(gpt, one_model_per_directory):
    opened = one_model_per_directory(gpt[0])
    flags = ("--checkpoint", gpt[0], "--max_new_tokens", str(N), "--prompt", PROMPTS[0])
    greedy = records(*flags)[0]
    assert records(*flags, "--top_k", "1", "--seed", "5")[0]["token_ids"] == greedy["token_ids"]
    sampled = records(*flags, "--temperature", "1.5", "--seed", "3")[0]
    assert records(*flags, "--temperature", "1.5", "--seed", "3")[0] == sampled
    ref = decoding.generate(
        opened.model,
        opened.params,
        jnp.asarray([sampled["prompt_ids"]]),
        max_new_tokens=N,
        rng=jax.random.fold_in(jax.random.key(3), 0),
        temperature=1.5,
        eos_id=opened.eos_id,
    )
    assert sampled["token_ids"] == cut(np.asarray(ref)[0], opened.eos_id)


@pytest.mark.slow
def test_beam_search_on_an_encoder_decoder_is_decoding_beam_search(t5, tokenizer_path, one_model_per_directory):
    opened = one_model_per_directory(t5[0])
    tok = Tokenizer(tokenizer_path)
    got = records(
        "--checkpoint",
        t5[0],
        "--beam",
        "3",
        "--alpha",
        "0.6",
        "--max_new_tokens",
        str(N),
        "--prompt",
        "Enter a valid email address.",
    )[0]
    ids = jnp.asarray([tok.encode("Enter a valid email address.") + [tok.eos_id]])
    assert got["prompt_ids"] == ids[0].tolist()
    seqs, scores = decoding.beam_search(
        opened.model, opened.params, ids, beam_size=3, alpha=0.6, max_new_tokens=N, eos_id=tok.eos_id, return_all=True
    )  # [b, beam, n] best first
    assert got["token_ids"] == cut(np.asarray(seqs)[0, 0], tok.eos_id)
    assert len(set(got["token_ids"])) > 1
    assert got["score"] == pytest.approx(float(scores[0, 0]))
    assert got["text"] == tok.decode([t for t in got["token_ids"] if t != tok.eos_id])


# ----------------------------------------------------------------------------- a Hugging Face directory
@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A tiny random GPT-2 with a byte-level BPE tokenizer (vocab.json + merges.txt), saved by transformers."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    path = tmp_path_factory.mktemp("hf") / "gpt2"
    corpus = path.parent / "corpus.txt"
    corpus.write_text("\n".join(["def main(): return 0", "import os, sys", "the quick brown fox jumps"] * 20))
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    os.makedirs(path)
    bpe.save_model(str(path))
    eot = bpe.token_to_id("<|endoftext|>")
    model = tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=bpe.get_vocab_size(),
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=32,
            bos_token_id=eot,
            eos_token_id=eot,
        )
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that greedy choices are far from ties
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if "ln_" in name and name.endswith("weight")
                else 0.5 * torch.randn(p.shape, generator=g)
            )
    model.eval().save_pretrained(path)
    return str(path), model, eot


@pytest.mark.slow
def test_greedy_on_a_hugging_face_directory_is_transformers_generate(hf_gpt2, one_model_per_directory):
    import torch

    path, torch_model, eot = hf_gpt2
    opened = one_model_per_directory(path)
    assert opened.source == "hf" and opened.eos_id == eot and opened.max_len == 32
    r = records("--checkpoint", path, "--max_new_tokens", str(N), "--prompt", PROMPTS[0])[0]
    ids = opened.tokenizer.encode(r["prompt"])
    ours = decoding.generate(opened.model, opened.params, jnp.asarray([ids]), max_new_tokens=N, eos_id=eot)
    with torch.no_grad():
        ref = torch_model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=int),
            do_sample=False,
            num_beams=1,
            max_new_tokens=N,
            eos_token_id=eot,
            pad_token_id=eot,
        )
    assert r["prompt_ids"] == ids
    assert r["token_ids"] == cut(np.asarray(ours)[0], eot) == ref[0, len(ids) :].tolist()
    assert len(set(r["token_ids"])) > 1
    assert r["text"] == opened.tokenizer.decode(ids + [t for t in r["token_ids"] if t != eot])[len(r["prompt"]) :]
    # scores: log p(token | everything before it) under the model; greedy took the likeliest token each time
    with torch.no_grad():
        logp = torch.log_softmax(torch_model(torch.tensor([ids + r["token_ids"]])).logits[0, len(ids) - 1 : -1], -1)
    tokens = r["token_ids"]
    np.testing.assert_allclose(r["scores"], logp[np.arange(len(tokens)), tokens].numpy(), atol=1e-4)
    assert tokens == logp.argmax(-1).tolist()


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bert(tmp_path_factory, tokenizer_path):
    return make_workdir(tmp_path_factory.mktemp("w") / "bert", "bert_tiny", tokenizer_path)[0]


@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("missing", ["--checkpoint", "{tmp}/nowhere"], "--checkpoint: {tmp}/nowhere does not exist"),
        ("top_p 0", ["--checkpoint", "{gpt}", "--top_p", "0"], "--top_p: must be in (0, 1], got 0.0"),
        ("top_p 1.5", ["--checkpoint", "{gpt}", "--top_p", "1.5"], "--top_p: must be in (0, 1], got 1.5"),
        ("top_k", ["--checkpoint", "{gpt}", "--top_k", "-1"], "--top_k: must be >= 0"),
        ("temperature", ["--checkpoint", "{gpt}", "--temperature", "-0.5"], "--temperature: must be >= 0"),
        ("greedy + seed", ["--checkpoint", "{gpt}", "--temperature", "0", "--seed", "1"], "--seed: sampling options"),
        (
            "prompt > max_len",
            ["--checkpoint", "{gpt}", "--prompt", "x", "--prompt", "{long}", "--max_new_tokens", "4"],
            "prompt 2: {n_long} tokens, longer than the model takes (model.max_len 32)",
        ),
        (
            "prompt + new > max_len",
            ["--checkpoint", "{gpt}", "--prompt", "{mid}", "--max_new_tokens", "16"],
            "prompt 1: {n_mid} prompt tokens + --max_new_tokens 16 = {n_mid16} > model.max_len 32 (learned positions)",
        ),
        (
            "t5 prompt > seq_len",
            ["--checkpoint", "{t5}", "--prompt", "{long}"],
            "longer than the model takes (data.seq_len 32)",
        ),
        ("beam on a decoder", ["--checkpoint", "{gpt}", "--beam", "2"], "--beam: beam search is for encoder-decoder"),
        ("sampling on t5", ["--checkpoint", "{t5}", "--top_p", "0.9"], "--top_p: sampling is for decoder models"),
        ("encoder-only", ["--checkpoint", "{bert}"], "holds an encoder-only model, which cannot generate"),
        ("empty prompt", ["--checkpoint", "{gpt}", "--prompt", ""], "prompt 1: empty"),
        ("architecture key", ["--checkpoint", "{gpt}", "--set", "model.num_layers=2"], "model.num_layers: fixed by"),
        ("misspelt key", ["--checkpoint", "{tmp}/nowhere", "--set", "translate.beam=2"], "translate.beam"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, flags, message, gpt, t5, bert, tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    long, mid = "for " * 20, "for " * 10
    n_long, n_mid = len(tok.encode(long)), len(tok.encode(mid))
    assert n_long > 32 and 16 < n_mid <= 32
    values = dict(
        tmp=str(tmp_path),
        gpt=gpt[0],
        t5=t5[0],
        bert=bert,
        long=long,
        mid=mid,
        n_long=n_long,
        n_mid=n_mid,
        n_mid16=n_mid + 16,
    )
    code, out, err = run(*[f.format(**values) for f in flags])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message.format(**values) in err, err


@pytest.mark.slow
def test_the_program_runs_as_a_module_and_fails_in_one_line(tmp_path):
    result = run_program("train.generate", ["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"], timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: --checkpoint: {tmp_path / 'nowhere'} does not exist (or is not a directory)\n"
