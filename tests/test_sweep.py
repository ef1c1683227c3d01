"""train.sweep: trials of the shared train loop, pruned on their eval loss, in a study a second
invocation continues; the reports (the table's command reproduces the best trial); one line for a bad
space. And the trainer's on_eval hook the pruning rides on: a pruned trial stops at its eval, with a
checkpoint there it resumes from."""

import csv
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import warnings

import optuna
import pytest

from train import cli, sweep
from transformer_jax.config import load_config

from helpers import FAST_COMPILE, REPO, checkpoint_steps, sets

STEPS = 12
SPACE = """\
train.learning_rate: {low: 1.0e-4, high: 3.0e-2, log: true}
model.dropout_rate: {low: 0.0, high: 0.3}
train.warmup_steps: {low: 0, high: 10, step: 2}   # an int key: integers
"""


def tiny(tokenizer_path):
    return [
        "model.num_layers=1",
        "model.model_dim=32",
        "model.mlp_dim=64",
        "data.seq_len=32",
        "train.batch_size=8",
        "data.max_documents=60",
        "data.eval_documents=4",
        f"train.steps={STEPS}",
        "train.eval_every=3",
        "train.eval_steps=1",
        "train.log_every=1",
        "train.checkpoint_every=100",
        f"data.tokenizer={tokenizer_path}",
        "model.vocab_size=512",
    ]


@pytest.fixture(scope="module")
def env():
    """One CPU device and cheap compiles (optimisation level 0: each trial's learning rate and dropout are
    constants of its step, so every trial compiles one); the sweep and the reproducing run alike."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    return env


def run(module, args, env):
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tokenizer_path, env):
    """6 trials (pruning from the third on), and the state of the study right after them."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "space.yaml").write_text(SPACE)
    argv = [
        "--config",
        "configs/gpt_tiny.yaml",
        "--space",
        str(root / "space.yaml"),
        "--workdir",
        str(root / "w"),
        "--prune-after",
        "2",
        *sets(tiny(tokenizer_path)),
    ]
    out = run("train.sweep", [*argv, "--trials", "6"], env).stdout
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{root / 'w' / 'study.db'}")
    return root / "w", argv, out, study.get_trials()


def logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def table(workdir):
    """{trial number: (state, eval loss, command)} of trials.md, in its order."""
    rows = {}
    for line in (workdir / "trials.md").read_text().splitlines():
        m = re.match(r"\| (\d+) \| (\w+)[^|]* \| ([\d.]*) \|.*`(python -m [^`]+)` \|$", line)
        if m:
            rows[int(m.group(1))] = (m.group(2), float(m.group(3)) if m.group(3) else None, m.group(4))
    return rows


@pytest.mark.slow
def test_trials_finish_and_the_pruned_stop_early(swept):
    workdir, _, out, trials = swept
    S = optuna.trial.TrialState
    assert [t.number for t in trials] == list(range(6))
    assert {t.state for t in trials} <= {S.COMPLETE, S.PRUNED}, [t.state for t in trials]
    pruned = [t for t in trials if t.state == S.PRUNED]
    assert pruned and any(t.state == S.COMPLETE for t in trials)
    for t in pruned:  # stopped at the eval that pruned it: its metrics and its one checkpoint end there
        records = logged(workdir / f"trial_{t.number}")
        last = max(t.intermediate_values)
        assert records[-1]["step"] == last < STEPS and records[-1]["eval_loss"] == pytest.approx(
            t.intermediate_values[last]
        )
        assert checkpoint_steps(workdir / f"trial_{t.number}") == [last]
    for t in trials:  # every eval was reported
        evals = {r["step"]: r["eval_loss"] for r in logged(workdir / f"trial_{t.number}") if "eval_loss" in r}
        assert evals == pytest.approx(t.intermediate_values)
        assert {p for p in t.params} == {"train.learning_rate", "model.dropout_rate", "train.warmup_steps"}
        assert isinstance(t.params["train.warmup_steps"], int) and t.params["train.warmup_steps"] % 2 == 0
    lines = [line for line in out.splitlines() if line.startswith("trial ")]  # one line a trial
    assert len(lines) == 6 and all("train.learning_rate=" in line for line in lines)
    assert sum("pruned at step" in line for line in lines) == len(pruned)


def test_reports(swept):
    workdir, _, _, trials = swept
    S = optuna.trial.TrialState
    best = min((t for t in trials if t.state == S.COMPLETE), key=lambda t: t.value)
    rows = table(workdir)
    assert list(rows)[0] == best.number and rows[best.number][1] == pytest.approx(best.value, rel=1e-5)
    assert set(rows) == {t.number for t in trials}
    with open(workdir / "trials.csv") as f:
        records = list(csv.DictReader(f))
    assert [int(r["number"]) for r in records] == list(rows)
    assert float(records[0]["eval_loss"]) == pytest.approx(best.value)
    assert float(records[0]["train.learning_rate"]) == best.params["train.learning_rate"]
    assert load_config(workdir / "best.yaml") == load_config(workdir / f"trial_{best.number}" / "config.yaml")
    for png in ("loss_curves.png", "params.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_table_reproduces_the_best_trial(swept, env, tmp_path):
    workdir, _, _, _ = swept
    number, (_, loss, command) = next(iter(table(workdir).items()))
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "train.pretrain"]
    run("train.pretrain", [*args[3:], "--workdir", str(tmp_path / "again")], env)
    final = logged(tmp_path / "again")[-1]
    assert final["step"] == STEPS and final["eval_loss"] == pytest.approx(loss, rel=1e-5), (number, final, loss)


@pytest.mark.slow
def test_running_again_continues_the_study(swept, env):
    """After a killed worker (a RUNNING trial whose heartbeat stopped): the same command runs --trials more in the
    same study, numbered on, and the killed trial is marked FAIL."""
    workdir, argv, _, _ = swept
    url = f"sqlite:///{workdir / 'study.db'}"
    with warnings.catch_warnings():  # heartbeats are experimental, and meant for Study.optimize
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=sweep.HEARTBEAT_S)
        killed = optuna.load_study(study_name="w", storage=storage).ask()
        storage.record_heartbeat(killed._trial_id)
    with sqlite3.connect(workdir / "study.db") as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00.000000'")
    out = run("train.sweep", [*argv, "--trials", "1"], env).stdout
    trials = optuna.load_study(study_name="w", storage=url).get_trials()
    S = optuna.trial.TrialState
    assert [t.number for t in trials] == list(range(8)) and trials[6].state == S.FAIL
    assert trials[7].state in (S.COMPLETE, S.PRUNED) and (workdir / "trial_7" / "metrics.jsonl").exists()
    assert "7 trials so far" in out and "trial 7: " in out
    assert set(table(workdir)) == set(range(8))


@pytest.mark.parametrize(
    "space,key",
    [
        ("train.learning_rat: {low: 1.0e-4, high: 1.0e-3}", "train.learning_rat"),  # unknown key
        ("train.learning_rate: {low: 1.0e-2, high: 1.0e-3}", "train.learning_rate"),  # low above high
        ("train.learning_rate: {low: 0.0, high: 1.0e-3, log: true}", "train.learning_rate"),  # log from 0
        ("train.warmup_steps: {low: 0.5, high: 10}", "train.warmup_steps"),  # not an int
        ("train.warmup_steps: {low: 0, high: 25, step: 10}", "train.warmup_steps"),  # not whole steps
        ("train.batch_size: {choices: [8, sixteen]}", "train.batch_size"),  # a choice of the wrong type
        ("train.schedule: {low: 0, high: 1}", "train.schedule"),  # a range on a string key
        ("model.dropout_rate: {low: 0.0, high: 1.0}", "model.dropout_rate"),  # high makes the config invalid
        ("model.dropout_rate: {lo: 0.0, high: 0.3}", "model.dropout_rate"),  # unknown field
        ("train.steps: {choices: [10, 20]}", "train.steps"),  # also fixed by --set
        ("train.eval_every: {choices: [0, 3]}", "train.eval_every"),  # a trial with no eval
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(space, key, tmp_path, monkeypatch, capsys):
    (tmp_path / "space.yaml").write_text(space + "\n")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train.sweep",
            "--space",
            str(tmp_path / "space.yaml"),
            "--trials",
            "1",
            "--workdir",
            str(tmp_path / "w"),
            "--set",
            "train.steps=12",
        ],
    )
    with pytest.raises(SystemExit) as exit:
        cli.main(sweep.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and key in err[0], err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_pruned_trial_resumes_exactly_where_it_stopped(swept, env, tmp_path):
    """trainer.run(on_eval=...) stopped the pruned trial with a checkpoint of its last logged step: its
    table command on (a copy of) its workdir resumes there and runs on to train.steps, each step logged once."""
    workdir, _, _, trials = swept
    pruned = next(t for t in trials if t.state == optuna.trial.TrialState.PRUNED)
    copy = tmp_path / "trial"
    shutil.copytree(workdir / f"trial_{pruned.number}", copy)
    args = shlex.split(table(workdir)[pruned.number][2])
    out = run("train.pretrain", [*args[3:], "--workdir", str(copy)], env).stdout
    assert f"resuming from checkpoint {max(pruned.intermediate_values)}" in out
    assert [r["step"] for r in logged(copy)] == list(range(1, STEPS + 1))
    assert checkpoint_steps(copy)[-1] == STEPS
