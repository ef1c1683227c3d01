"""Eval on any number of processes: two real processes (jax.distributed over gloo, two CPU devices
each) log the eval loss and the translation BLEU that one process computes for the same parameters.

Each 2-process run trains a few steps and evaluates at its last one; the reference restores that
run's parameters (`runs.load_run`) in this process onto a mesh of 4 of its devices (the same
mesh shape) and evaluates them through the same path (`trainer.evaluate` on the program's task).
Every process reads the whole eval set and keeps its rows of each global batch
(`pipeline.process_rows`), so the global eval batches are the one-process ones; BLEU decodes with
the parameters sharded where they are, the batch split over the mesh, every process getting every
hypothesis.
"""

import json
import os

import jax
import numpy as np
import pytest
import yaml
from test_distributed import OVERRIDES as GPT_OVERRIDES
from test_translate import TINY, synthetic_pairs

from train import pretrain, trainer
from transformer_jax import runs
from transformer_jax import sharding as sh
from transformer_jax.data import pipeline
from transformer_jax.tasks import translation

import multiprocess
from helpers import REPO, sets

RTOL = 1e-6


def last_eval(workdir) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return next(r for r in reversed(records) if "eval_loss" in r)


def one_process_eval(task, cfg, workdir, batches=None) -> dict:
    """The eval figures of the run's latest parameters, on 4 of this process's devices."""
    run = runs.load_run(str(workdir), need_tokenizer=False)
    mesh = sh.make_mesh(cfg.mesh, jax.devices()[:4])
    params = jax.device_put(run.params, sh.tree_shardings(task.model.logical_axes, run.params, mesh))
    if batches is not None:
        task.eval_batches = batches
    eval_step = jax.jit(trainer.make_eval_step(task))
    return trainer.evaluate(task, eval_step, params, mesh, cfg.train.eval_steps)


def rel(a, b):
    return abs(a - b) / abs(b)


def test_process_rows_split_each_global_batch():
    batches = [{"x": np.arange(8) + 10 * i, "y": np.arange(16).reshape(8, 2)} for i in range(2)]
    parts = [list(pipeline.process_rows(batches, i, 4)) for i in range(4)]
    for b, batch in enumerate(batches):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[b][key] for p in parts]), batch[key])
    assert parts[1][0]["x"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="8 rows does not split over 3"):
        next(pipeline.process_rows(batches, 0, 3))


@pytest.mark.slow
def test_two_process_eval_loss_matches_one_process(tokenizer_path, tmp_path):
    workdir = tmp_path / "run"
    overrides = [
        *GPT_OVERRIDES,
        f"data.tokenizer={tokenizer_path}",
        "train.steps=3",
        "train.eval_every=3",
        "train.eval_steps=8",
        "data.max_documents=80",
    ]
    multiprocess.run(
        "train.pretrain",
        ["--config", os.path.join(REPO, "configs", "gpt_tiny.yaml"), "--workdir", str(workdir), *sets(overrides)],
        tmp_path,
        processes=2,
        devices_per_process=2,
    )
    logged = last_eval(workdir)
    assert logged["step"] == 3

    cfg = runs.load_run(str(workdir), need_tokenizer=False).cfg
    cfg, task = pretrain.make_task(cfg, str(workdir))
    batches = list(task.eval_batches())
    assert len(batches) >= 2
    reference = one_process_eval(task, cfg, workdir)
    print(f"\neval_loss: 2 processes {logged['eval_loss']:.8f}, 1 process {reference['eval_loss']:.8f}")
    assert {k for k in logged if k.startswith("eval_")} == set(reference)
    for key in ("eval_loss", "eval_lm_accuracy", "eval_lm_weight"):
        assert rel(logged[key], reference[key]) <= RTOL, key

    # the comparison sees which rows were read: the first half of each batch twice is another figure
    first_halves = lambda: (
        {k: np.concatenate([v, v]) for k, v in half.items()} for half in pipeline.process_rows(batches, 0, 2)
    )
    other = one_process_eval(task, cfg, workdir, batches=first_halves)
    assert rel(other["eval_loss"], reference["eval_loss"]) > 1e-3


@pytest.mark.slow
def test_two_process_bleu_matches_one_process(tmp_path):
    (tmp_path / "pairs.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in zip(*synthetic_pairs(424))))
    data = {k: v for k, v in TINY["data"].items() if k != "eval_split"}  # dev pairs held out by source
    config = dict(
        TINY,
        data=dict(data, paths=[str(tmp_path / "pairs.tsv")]),
        train=dict(
            TINY["train"],
            steps=80,
            learning_rate=1e-2,
            warmup_steps=10,
            log_every=40,
            eval_every=80,
            checkpoint_every=80,
        ),
        translate=dict(TINY["translate"], eval_examples=24, eval_greedy=True),
    )
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    workdir = tmp_path / "run"
    multiprocess.run(
        "train.translate",
        ["--config", str(tmp_path / "tiny.yaml"), "--workdir", str(workdir)],
        tmp_path,
        processes=2,
        devices_per_process=2,
    )
    logged = last_eval(workdir)
    assert logged["step"] == 80 and logged["best_step"] == 80 and logged["best_eval_bleu"] == logged["eval_bleu"]

    cfg = runs.load_run(str(workdir)).cfg
    prepared = translation.prepare(cfg, str(workdir))
    reference = one_process_eval(prepared.task, prepared.cfg, workdir)
    print(
        f"\n2 processes: { {k: round(v, 4) for k, v in logged.items() if k.startswith('eval_')} }"
        f"\n1 process:   { {k: round(v, 4) for k, v in reference.items()} }"
    )
    assert logged["eval_bleu"] > 1.0  # trained: equal BLEUs are not two zeros
    for key in ("eval_bleu", "eval_chrf", "eval_greedy_bleu", "eval_greedy_chrf"):
        assert logged[key] == pytest.approx(reference[key], rel=RTOL, abs=1e-9), key
    assert rel(logged["eval_loss"], reference["eval_loss"]) <= RTOL
