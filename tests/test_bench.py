"""train.bench and its pieces (train/flops.py, train/step_bench.py, train/torch_peer.py): the FLOP
count (causal attention at half), the peak MFU is stated against, and the comparison with the same
model in PyTorch (`--compare torch`): parameter counts, tokens/s and ratio, --min-ratio, --forward,
one-line errors. Tiny models, one timed step, in process."""

import json
import sys

import jax
import pytest

from train import bench, cli, flops, step_bench, torch_peer
from transformer_jax import sharding, tasks
from transformer_jax.config import load_config
from transformer_jax.models import abstract_build, count_params, published_params

SMALL = ["train.batch_size=2", "data.seq_len=32", "model.max_len=32", "model.num_layers=1"]


@pytest.fixture
def fake_peak(monkeypatch):
    """The 4096x4096 matmul takes seconds on 2 cores: these tests check figures, not the peak."""
    sizes = []
    monkeypatch.setattr(
        flops, "measured_matmul_peak", lambda dtype, n=flops.MATMUL_SIZE: sizes.append((dtype, n)) or 1e11
    )
    return sizes


def one_device():
    return sharding.make_mesh(None, jax.devices()[:1])


def test_causal_self_attention_counts_half():
    """Decoder (causal) and encoder (bidirectional) of the same dimensions differ by half the
    attention term, 6 * L * heads * head_dim * S^2 per example; T5's decoder self-attention is halved,
    its cross-attention is not; the forward is a third of the training step."""
    seq, attn = 64, 128
    dec = load_config("configs/gpt_tiny.yaml", [])
    enc = load_config("configs/bert_tiny.yaml", ["model.heads=[]", "model.pooler=false", "model.position=learned"])
    assert (dec.model.num_layers, dec.model.model_dim, dec.model.num_heads, dec.model.mlp_dim) == (
        enc.model.num_layers,
        enc.model.model_dim,
        enc.model.num_heads,
        enc.model.mlp_dim,
    )
    dec_flops = flops.model_flops_per_example(dec, abstract_build(dec)[1], seq, 0)
    enc_flops = flops.model_flops_per_example(enc, abstract_build(enc)[1], seq, 0)
    out_layer = 6 * dec.model.model_dim * dec.model.vocab_size * seq  # the decoder's LM head; the encoder has none
    layers = dec.model.num_layers
    assert enc_flops - (dec_flops - out_layer) == 6 * layers * attn * seq * seq
    assert flops.attention_flops(layers, attn, seq, seq, causal=False) == 12 * layers * attn * seq * seq
    assert flops.attention_flops(layers, attn, seq, seq, causal=True) == 6 * layers * attn * seq * seq
    assert flops.model_flops_per_example(dec, abstract_build(dec)[1], seq, 0, forward=True) == dec_flops / 3

    # the quadratic term in the length alone is attention: second differences isolate it
    second = lambda f, n: f(2 * n) - 2 * f(n) + f(0)
    dec_abs, enc_abs = abstract_build(dec)[1], abstract_build(enc)[1]
    assert second(lambda s: flops.model_flops_per_example(dec, dec_abs, s, 0), seq) == 2 * 6 * layers * attn * seq**2
    assert second(lambda s: flops.model_flops_per_example(enc, enc_abs, s, 0), seq) == 2 * 12 * layers * attn * seq**2
    t5 = load_config("configs/t5_tiny.yaml", [])
    t5_abs, m = abstract_build(t5)[1], t5.model
    attn5, target = m.num_heads * m.resolved_head_dim, 16
    # in the target length: the decoder's causal self-attention, at half
    assert (
        second(lambda t: flops.model_flops_per_example(t5, t5_abs, seq, t), target)
        == 2 * 6 * m.resolved_decoder_layers * attn5 * target**2
    )
    # in target x source: cross-attention, in full (the mixed difference)
    f = lambda s, t: flops.model_flops_per_example(t5, t5_abs, s, t)
    assert f(seq, target) - f(seq, 0) - f(0, target) + f(0, 0) == 12 * m.resolved_decoder_layers * attn5 * target * seq


@pytest.mark.slow
def test_mfu_is_the_hand_counted_model_flops_over_step_time_and_peak(fake_peak):
    """gpt_tiny (1 layer, d 128, MLP 512, 4 x 32 heads, vocab 2048, learned positions), batch 2 x 32
    tokens, one device: the model FLOPs per step are 6 x the matmul weights per token (q, k, v, out:
    4 d^2; the MLP: 2 d x mlp; no biases, not even the [heads, head_dim] ones of q, k, v: added, not
    multiplied) + the output layer 6 d V + the causal attention 12 * 1/2 * L * heads * head_dim * S,
    per token, counted here by hand; MFU is those over step_s over the peak (the fake measured one,
    0.1 TFLOP/s), to the rounding of the JSON's figures."""
    cfg = load_config("configs/gpt_tiny.yaml", SMALL)
    m = cfg.model
    assert (m.num_layers, m.model_dim, m.mlp_dim, m.num_heads * m.resolved_head_dim, m.vocab_size) == (
        1,
        128,
        512,
        128,
        2048,
    )
    b, s, d, mlp, vocab, layers = 2, 32, 128, 512, 2048, 1
    per_token = 6 * layers * (4 * d * d + 2 * d * mlp) + 6 * d * vocab + 12 * 0.5 * layers * d * s
    assert per_token == 2_777_088
    result = step_bench.bench(cfg, steps=1, mesh=one_device())
    assert result["model_flops_per_step"] == b * s * per_token and result["model_flops_per_token"] == per_token
    assert result["devices"] == 1 and result["peak_tflops"] == 0.1 and fake_peak == [("float32", 4096)]
    step_s = result["step_s"]  # rounded to 1e-5 s; mfu to 1e-4
    mfu = result["model_flops_per_step"] / step_s / result["devices"] / (result["peak_tflops"] * 1e12)
    tol = 0.5e-4 + mfu * 0.5e-5 / step_s
    print(f"\nstep_s {step_s}, mfu {result['mfu']}, recomputed {mfu:.6f}, tolerance {tol:.1e}")
    assert abs(result["mfu"] - mfu) <= tol and result["mfu_vs_measured_peak"] == result["mfu"]
    # step_s is off by up to 0.5e-5 s, tokens_per_sec by up to 0.05
    expected = b * s / step_s
    assert abs(result["tokens_per_sec"] - expected) <= expected * 0.5e-5 / (step_s - 0.5e-5) + 0.05


def test_peak_on_cpu_is_a_measured_large_matmul(fake_peak):
    peak = flops.peaks()
    assert peak["peak_source"] == "measured matmul 4096x4096 float32" and peak["peak"] == 1e11
    assert fake_peak == [("float32", 4096)]
    assert flops.NOMINAL_BF16_PEAK["H200"] == 989e12


@pytest.mark.parametrize(
    "config,overrides,architecture",
    [
        ("configs/gpt_tiny.yaml", ["model.vocab_size=2000"], "GPT2LMHeadModel"),
        ("configs/bert_tiny.yaml", ["model.position=learned", "model.vocab_size=2000"], "BertForPreTraining"),
        (
            "configs/bert_tiny.yaml",
            ["model.position=learned", "train.objective=mlm", "model.heads=[mlm]", "model.pooler=false"],
            "BertForMaskedLM",
        ),
        ("configs/t5_tiny.yaml", [], "T5ForConditionalGeneration"),  # untied LM head
    ],
)
def test_torch_model_has_our_published_parameter_count(config, overrides, architecture):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg = load_config(config, overrides)
    cfg = tasks.get(cfg.train.objective).with_heads(cfg)
    model, abstract = abstract_build(cfg)
    module, arch, _ = torch_peer.torch_model(cfg.model)
    assert arch == architecture
    assert torch_peer.torch_params(module) == published_params(model, abstract)
    if cfg.model.vocab_size == 2000:  # our arrays pad the vocabulary to 2048 rows; HF's do not
        assert count_params(abstract) > published_params(model, abstract)


def test_compare_torch_train_step_and_failing_min_ratio(fake_peak, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    args = [
        "--config",
        "configs/gpt_tiny.yaml",
        *cli_sets(SMALL),
        "--steps",
        "1",
        "--compare",
        "torch",
        "--min-ratio",
        "1e9",
    ]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args)
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    result = json.loads(out)
    torch_result = result["torch"]
    assert result["mode"] == "train" and result["tokens_per_sec"] > 0
    assert torch_result["architecture"] == "GPT2LMHeadModel" and torch_result["eager"]["tokens_per_sec"] > 0
    assert torch_result["params"] == result["params_published"] and torch_result["params_match"]
    assert torch_result["dropout"] == "off" and torch_result["dtype"] == "float32" and torch_result["threads"] >= 1
    assert result["speedup_vs_torch_eager"] == pytest.approx(
        result["tokens_per_sec"] / torch_result["eager"]["tokens_per_sec"], rel=0.01
    )
    assert result["speedup_vs_torch_compile"] is None
    assert "torch eager" in err and "jax" in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        next(line for line in err.splitlines() if "below --min-ratio" in line)
    ]


@pytest.mark.slow
def test_forward_compare_torch_and_without_torch(fake_peak):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    overrides = cli_sets(SMALL + ["model.position=learned", "model.heads=[]"])
    args = bench.parser().parse_args(
        [
            "--config",
            "configs/bert_tiny.yaml",
            *overrides,
            "--steps",
            "1",
            "--forward",
            "--compare",
            "torch",
            "--min-ratio",
            "1e-9",
        ]
    )
    result, failure = bench.run(args)
    assert failure is None and result["mode"] == "forward" and "loss" not in result
    assert result["torch"]["architecture"] == "BertModel" and result["torch"]["params_match"]
    assert result["torch"]["step"].startswith("forward") and result["speedup_vs_torch_eager"] > 0
    # training counts 3x the forward's model FLOPs per token, less the heads the forward lacks
    assert result["model_flops_per_token"] > 0 and result["peak_source"].startswith("measured matmul")
    # without --compare: our forward alone, on the mesh given
    plain = bench.run(
        bench.parser().parse_args(["--config", "configs/t5_tiny.yaml", *cli_sets(SMALL), "--steps", "1", "--forward"]),
        mesh=one_device(),
    )[0]
    assert "torch" not in plain and plain["tokens_per_sec"] > 0 and plain["target_len"] > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config", "configs/bert_tiny.yaml", "--compare", "torch"], "model.position: 'rotary' cannot be exported"),
        (["--config", "configs/itm_tiny.yaml", "--compare", "torch"], "has no Hugging Face counterpart"),
        (["--compile"], "--compile needs --compare torch"),
        (["--compare", "torch", "--hide-torch"], "needs torch and transformers"),
    ],
)
def test_one_line_errors(argv, message, capsys, monkeypatch):
    if "--hide-torch" in argv:
        argv = [a for a in argv if a != "--hide-torch"]
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    else:
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(lambda: bench.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err
    if "needs torch" in message:
        assert "[hf]" in err


def cli_sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_pipeline_alone_beside_the_step(fake_peak, tokenizer_path, tmp_path):
    """--pipeline: the train pipeline's tokens/s (span corruption, 1 worker process), the step's
    beside it, and which one bounds the run."""
    overrides = cli_sets(
        SMALL + [f"data.tokenizer={tokenizer_path}", "model.vocab_size=512", "data.workers=1", "data.max_documents=40"]
    )
    args = bench.parser().parse_args(
        ["--config", "configs/t5_tiny.yaml", *overrides, "--steps", "1", "--pipeline", "10", "--workdir", str(tmp_path)]
    )
    result, _ = bench.run(args, mesh=one_device())
    data = result["pipeline"]
    assert data["workers"] == 1 and data["batches"] == 10 and data["tokens_per_sec"] > 0
    assert data["bottleneck"] == (
        "pipeline" if data["tokens_per_sec"] < data["step_tokens_per_sec_per_process"] else "step"
    )
    assert "the " + data["bottleneck"] + " is the bottleneck" in bench.summary(result)
    with pytest.raises(step_bench.BenchError, match="--pipeline: times train.pretrain's text pipeline"):
        bench.run(
            bench.parser().parse_args(
                [
                    "--config",
                    "configs/itm_tiny.yaml",
                    "--steps",
                    "1",
                    "--pipeline",
                    "2",
                    "--workdir",
                    str(tmp_path / "itm"),
                ]
            ),
            mesh=one_device(),
        )


@pytest.mark.slow
def test_vision_family_has_null_model_flops_and_workdir_gets_the_json(fake_peak, capsys, tmp_path):
    """itm_tiny (vision_language): the registry's batch shapes feed the step; the FLOPs formula does not
    cover vision, so model FLOPs and MFU are null with a note (no number made up, no peak measured);
    --workdir gets the JSON as bench.json. The forward runs on the vision inputs too."""
    tiny = cli_sets(
        [
            "model.model_dim=32",
            "model.num_heads=2",
            "model.mlp_dim=64",
            "model.num_layers=1",
            "model.projection_dim=16",
            "model.image_size=16",
            "train.batch_size=8",
        ]
    )
    bench.main(["--config", "configs/itm_tiny.yaml", *tiny, "--steps", "1", "--workdir", str(tmp_path)])
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["model_flops_per_step"] is None and result["model_flops_per_token"] is None
    assert result["mfu"] is None and "vision_language" in result["model_flops_note"] and fake_peak == []
    assert result["xla_flops_per_step"] > 0 and result["tokens_per_sec"] > 0 and "MFU n/a" in err
    with open(tmp_path / "bench.json") as f:
        assert json.load(f) == result
    forward, _ = bench.run(
        bench.parser().parse_args(["--config", "configs/itm_tiny.yaml", *tiny, "--steps", "1", "--forward"]),
        mesh=one_device(),
    )
    assert forward["mode"] == "forward" and forward["mfu"] is None and forward["step_s"] > 0
