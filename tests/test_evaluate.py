"""train.evaluate: the latest checkpoint of a tiny GPT run scored by the trainer's own eval gives the
eval_loss the run logged at that step, on one device and on 8 (the session's fake CPU devices);
another data source through --set; one-line errors (missing checkpoint, misspelt key, another
architecture)."""

import json
import os

import jax
import pytest

from train import evaluate, pretrain, trainer
from transformer_jax import sharding
from transformer_jax.config import load_config

from helpers import REPO, run_main

STEPS = 3
TINY = [
    "model.model_dim=64",
    "model.mlp_dim=128",
    "model.num_layers=1",
    "data.seq_len=32",
    "train.batch_size=8",
    "data.max_documents=60",
    "data.eval_documents=4",
    "train.log_every=1",
    "model.vocab_size=512",
    f"train.steps={STEPS}",
    f"train.eval_every={STEPS}",
    f"train.checkpoint_every={STEPS}",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_path):
    """A gpt_tiny workdir trained for STEPS steps on one device, with an eval at the last step; the
    record metrics.jsonl holds for that step."""
    workdir = str(tmp_path_factory.mktemp("gpt"))
    cfg = load_config(os.path.join(REPO, "configs", "gpt_tiny.yaml"), TINY + [f"data.tokenizer={tokenizer_path}"])
    cfg, task = pretrain.make_task(cfg, workdir)
    trainer.run(cfg, workdir, task, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]), quiet=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    return workdir, next(r for r in logged if r["step"] == STEPS and "eval_loss" in r)


def cli_run(capsys, monkeypatch, *args):
    """`python -m train.evaluate ARGS` in this process: (exit code, stdout, stderr)."""
    return run_main(evaluate, args, monkeypatch, capsys)


@pytest.mark.slow
def test_one_device_gives_the_logged_eval(run):
    workdir, logged = run
    result = evaluate.evaluate_checkpoint(workdir, devices=jax.devices()[:1])
    assert result["step"] == STEPS and result["objective"] == "clm"
    assert result["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)
    assert result["eval_perplexity"] == pytest.approx(logged["eval_perplexity"], rel=1e-6)
    assert result["eval_lm_accuracy"] == pytest.approx(logged["eval_lm_accuracy"], rel=1e-6)


def test_eight_devices_from_the_command_line(run, tmp_path, capsys, monkeypatch):
    assert jax.device_count() == 8  # tests/conftest.py
    workdir, logged = run
    code, out, err = cli_run(capsys, monkeypatch, "--checkpoint", workdir, "--workdir", str(tmp_path / "out"))
    assert code == 0, err
    result = json.loads(out)  # stdout is exactly one JSON object
    assert result["step"] == STEPS
    assert result["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)
    assert result["eval_lm_accuracy"] == pytest.approx(logged["eval_lm_accuracy"], rel=1e-6)
    with open(tmp_path / "out" / "eval.json") as f:
        assert json.load(f) == result
    assert not os.path.exists(os.path.join(workdir, "eval.json"))


def test_another_data_source(run, tmp_path):
    workdir, logged = run
    text = tmp_path / "text"
    text.mkdir()
    for i in range(12):  # 12 documents: 1 held out for eval
        (text / f"{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i} + len('{i}')\n" * 20)
    result = evaluate.evaluate_checkpoint(
        workdir, overrides=["data.source=files", f"data.paths=[{text}]"], eval_steps=1, devices=jax.devices()[:1]
    )
    assert result["step"] == STEPS and result["data_source"] == "files" and result["eval_steps"] == 1
    assert result["eval_loss"] > 0 and result["eval_loss"] != pytest.approx(logged["eval_loss"], rel=1e-3)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--checkpoint", "/nonexistent/run"], "--checkpoint: /nonexistent/run does not exist"),
        ([], "--checkpoint: required"),
        (["--set", "model.num_layrs=2"], "model.num_layrs: unknown key (did you mean model.num_layers?)"),
        (["--set", "model.num_layers=2"], "model.num_layers: 2 here, 1 in the checkpoint"),
    ],
)
def test_user_errors_are_one_line(run, capsys, monkeypatch, args, needle):
    workdir, _ = run
    if args[:1] != ["--checkpoint"]:
        args = (["--checkpoint", workdir] if needle != "--checkpoint: required" else []) + args
    code, out, err = cli_run(capsys, monkeypatch, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err, err
