"""Pod-grade training, tried on real processes as a pod would try it.

Two processes x two CPU devices (gloo) resume each process's own data past the first shuffle
window, bitwise; a SIGTERM to one process or a time limit stops both at the same step with one
checkpoint; a checkpoint of 2 processes refuses 1 in one line. One process: a SIGKILL during an
async save, a corrupt or half-written latest step, a failed write, a changed config on resume,
early-stopping state and spike skipping.
"""

import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from train import optimizer, pretrain, trainer
from transformer_jax import config as config_lib
from transformer_jax import sharding as sh
from transformer_jax.checkpoint import Checkpointer, CheckpointError
from transformer_jax.config import ConfigError

import multiprocess
from helpers import REPO, checkpoint_steps, run_program, sets

# 41 documents: 4 held out, 37 train, so the two processes' shards differ in size (19 and 18);
# 8 rows per process per step and a 16-row shuffle window: the window is passed at step 2.
SMALL = (
    "model.num_layers=1",
    "model.model_dim=64",
    "model.num_heads=4",
    "model.mlp_dim=128",
    "model.vocab_size=512",
    "model.max_len=32",
    "data.seq_len=32",
    "data.max_documents=41",
    "data.shuffle_window=16",
    "train.batch_size=16",
    "train.eval_every=0",
    "train.log_every=1",
    "train.warmup_steps=0",
    "train.schedule=constant",
    "train.seed=0",
    "train.stop_check_every=5",
    "train.checkpoint_every=8",
)
CONFIGS = {"clm": "gpt_tiny.yaml", "mlm_nsp": "bert_tiny.yaml"}
STEPS = 24


def program_args(objective, workdir, tokenizer, *extra):
    return [
        "--config",
        os.path.join(REPO, "configs", CONFIGS[objective]),
        "--workdir",
        str(workdir),
        *sets([*SMALL, f"train.steps={STEPS}", f"data.tokenizer={tokenizer}", *extra]),
    ]


def logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(workdir):
    return {r["step"]: r["loss"] for r in logged(workdir)}


def batch_hashes(directory, process):
    with open(os.path.join(directory, f"batches_{process}.jsonl")) as f:
        return [(r["step"], r["hash"]) for r in map(json.loads, f)]


def two_processes(objective, workdir, tokenizer, log_dir, *extra, env=None, check=True):
    os.makedirs(log_dir, exist_ok=True)
    return multiprocess.run(
        "train.pretrain",
        program_args(objective, workdir, tokenizer, *extra),
        log_dir,
        processes=2,
        devices_per_process=2,
        env={"TJ_TEST_BATCH_HASHES": str(log_dir), **(env or {})},
        check=check,
    )


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """41 documents of 300 to 1,200 characters (a JSONL file): next-sentence pairs use up a
    document within a few steps, so the processes' positions part early."""
    from transformer_jax.data import corpus

    docs = corpus.embedded_corpus()
    path = tmp_path_factory.mktemp("short_documents") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(41):
            f.write(json.dumps({"text": docs[i][: 300 + (97 * i) % 900]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data_args(short_documents):
    return {"clm": (), "mlm_nsp": ("data.source=files", f"data.paths={short_documents}")}


@pytest.fixture(scope="module")
def straight(tokenizer_path, data_args, tmp_path_factory):
    """straight(objective) -> the directory of an uninterrupted 2-process run (workdir/, hashes)."""
    cache = {}

    def get(objective):
        if objective not in cache:
            root = tmp_path_factory.mktemp(f"straight_{objective}")
            two_processes(objective, root / "workdir", tokenizer_path, root, *data_args[objective])
            cache[objective] = root
        return cache[objective]

    return get


def assert_positions_differ(root, step):
    """The state in which per-process positions matter: the two processes' saved positions differ."""
    saved = [
        open(root / "workdir" / "checkpoints" / str(step) / "data" / f"process_{i}-of-2.json").read() for i in range(2)
    ]
    assert saved[0] != saved[1]


def assert_resumed_like_straight(straight_root, root, stopped_at):
    reference = losses(straight_root / "workdir")
    resumed = losses(root / "workdir")
    assert sorted(resumed) == list(range(1, STEPS + 1))  # each step logged once
    assert stopped_at < STEPS
    mismatched = [s for s in reference if resumed[s] != reference[s]]
    assert not mismatched, f"losses differ at steps {mismatched}"
    for process in range(2):
        seen = batch_hashes(root, process)
        assert [s for s, _ in seen] == list(range(1, STEPS + 1)), "a batch was drawn twice or skipped"
        assert seen == batch_hashes(straight_root, process)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_resumes_bitwise(straight, tokenizer_path, tmp_path):
    root = tmp_path
    # process 1 (not the one that writes metrics) gets SIGTERM while drawing step 7's batch; the
    # processes agree at step 10 (stop_check_every 5), between the checkpoints of steps 8 and 16
    procs = two_processes("clm", root / "workdir", tokenizer_path, root, env={"TJ_TEST_SIGNAL": "7:1:TERM"})
    sent = float(next(line for line in procs[1].output.splitlines() if "sends itself SIGTERM" in line).split()[-1])
    stop_seconds = max(p.ended for p in procs) - sent
    print(f"\nSIGTERM to process 1 at step 7: both processes exited 0 {stop_seconds:.1f} s later")
    assert stop_seconds < 60
    for p in procs:
        assert "stop requested (signal) at step 10" in p.output
    assert checkpoint_steps(root / "workdir") == [8, 10]
    assert_positions_differ(root, 10)
    two_processes("clm", root / "workdir", tokenizer_path, root)
    assert_resumed_like_straight(straight("clm"), root, stopped_at=10)

    # the same checkpoint on one process: refused in one line naming both counts
    cfg, task = pretrain.make_task(
        config_lib.load_config(
            os.path.join(REPO, "configs", "gpt_tiny.yaml"),
            [*SMALL, f"train.steps={STEPS}", f"data.tokenizer={tokenizer_path}"],
        ),
        str(root / "workdir"),
    )
    with pytest.raises(CheckpointError) as error:
        trainer.run(cfg, str(root / "workdir"), task, mesh=sh.make_mesh(cfg.mesh, jax.devices()[:2]), quiet=True)
    message = str(error.value)
    assert "\n" not in message and "holds the input positions of 2 processes, this run has 1" in message


@pytest.mark.slow
def test_prepared_shards_in_worker_processes_resume_bitwise_on_two_processes(tokenizer_path, tmp_path):
    """data.source prepared, read by data.workers=2 grain workers on each of 2 processes: each process
    reads its documents from the shards, its checkpointed position holds its workers' states, and
    SIGTERM to one process + a resume see exactly the batches (and losses) of an uninterrupted run
    with the same worker count on the same shards."""
    from train import prepare

    shards = str(tmp_path / "shards")
    prepare.prepare(
        config_lib.load_config(
            os.path.join(REPO, "configs", "gpt_tiny.yaml"), [*SMALL, f"data.tokenizer={tokenizer_path}"]
        ),
        shards,
        quiet=True,
    )
    source = ("data.source=prepared", f"data.path={shards}", "data.workers=2")
    straight_root, root = tmp_path / "straight", tmp_path / "stopped"
    two_processes("clm", straight_root / "workdir", tokenizer_path, straight_root, *source)
    procs = two_processes("clm", root / "workdir", tokenizer_path, root, *source, env={"TJ_TEST_SIGNAL": "7:1:TERM"})
    for p in procs:
        assert "stop requested (signal) at step 10" in p.output
    assert_positions_differ(root, 10)
    saved = json.load(open(root / "workdir" / "checkpoints" / "10" / "data" / "process_1-of-2.json"))
    assert "iterators_in_use_states" in json.dumps(saved)  # the workers' own positions
    two_processes("clm", root / "workdir", tokenizer_path, root, *source)
    assert_resumed_like_straight(straight_root, root, stopped_at=10)


@pytest.mark.slow
def test_time_limit_on_two_processes_stops_both_and_resumes_bitwise(straight, data_args, tokenizer_path, tmp_path):
    root, data = tmp_path, data_args["mlm_nsp"]
    # the first step compiles for longer than the limit: both stop at the first agreement, step 5
    procs = two_processes("mlm_nsp", root / "workdir", tokenizer_path, root, *data, "train.time_limit_s=0.5")
    for p in procs:
        assert "time limit 0.5s reached at step 5" in p.output
    assert_positions_differ(root, 5)
    two_processes("mlm_nsp", root / "workdir", tokenizer_path, root, *data)
    assert_resumed_like_straight(straight("mlm_nsp"), root, stopped_at=5)


# ----------------------------------------------------------------------------- one process
# dropout on: a resumed run must also continue the dropout RNG stream
ONE = (*SMALL, "train.checkpoint_every=4", "train.steps=12", "data.max_documents=40", "model.dropout_rate=0.1")


def one_process_config(tokenizer, *extra):
    return config_lib.load_config(
        os.path.join(REPO, "configs", "gpt_tiny.yaml"), [*ONE, f"data.tokenizer={tokenizer}", *extra]
    )


def train_here(workdir, tokenizer, *extra, task_hook=None):
    cfg, task = pretrain.make_task(one_process_config(tokenizer, *extra), str(workdir))
    if task_hook:
        task_hook(task)
    _, state = trainer.run(cfg, str(workdir), task, mesh=sh.make_mesh(cfg.mesh, jax.devices()[:1]), quiet=True)
    return state


@pytest.fixture(scope="module")
def reference(tokenizer_path, tmp_path_factory):
    """An uninterrupted 12-step run: checkpoints 4, 8, 12."""
    workdir = tmp_path_factory.mktemp("reference") / "workdir"
    train_here(workdir, tokenizer_path)
    assert checkpoint_steps(workdir) == [4, 8, 12]
    return workdir


def one_process_args(workdir, tokenizer):
    return [
        "--config",
        os.path.join(REPO, "configs", "gpt_tiny.yaml"),
        "--workdir",
        str(workdir),
        *sets([*ONE, f"data.tokenizer={tokenizer}"]),
    ]


@pytest.fixture(scope="module")
def reference_program(tokenizer_path, tmp_path_factory):
    """The same run as `reference` through the program in its own process: runs of the program are
    compared with it (the pytest process's 8-device XLA may round a loss differently)."""
    workdir = tmp_path_factory.mktemp("reference_program") / "workdir"
    result = run_program("train.pretrain", one_process_args(workdir, tokenizer_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def array_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state" / "d") for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated_array", "metadata_deleted"])
@pytest.mark.slow
def test_unreadable_latest_checkpoint_falls_back(reference, tokenizer_path, tmp_path, capsys, damage):
    workdir = tmp_path / "workdir"
    shutil.copytree(reference, workdir)
    latest = workdir / "checkpoints" / "12"
    if damage == "truncated_array":
        path = array_file(latest)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        os.remove(latest / "state" / "_METADATA")

    strict = tmp_path / "strict"
    shutil.copytree(workdir, strict)
    with pytest.raises(CheckpointError, match=r"checkpoints/12 cannot be read .*train.resume=strict") as e:
        train_here(strict, tokenizer_path, "train.resume=strict")
    assert "\n" not in str(e.value)

    capsys.readouterr()
    train_here(workdir, tokenizer_path)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoints/12 cannot be read" in warnings[0], warnings
    assert (workdir / "checkpoints.broken" / "12" / "state").is_dir()  # set aside, not deleted
    assert losses(workdir) == losses(reference)  # steps 9-12 again, bitwise
    assert [r["step"] for r in logged(workdir)] == list(range(1, 13))


@pytest.mark.slow
def test_kill_during_async_save_resumes_from_the_last_committed_step(reference_program, tokenizer_path, tmp_path):
    workdir = tmp_path / "workdir"
    args = one_process_args(workdir, tokenizer_path)
    procs = multiprocess.launch(
        "train.pretrain", args, tmp_path, processes=1, coordinator=False, env={"TJ_TEST_SLOW_SAVE": "8"}
    )
    deadline = time.monotonic() + 120
    while not (
        "stalls before its commit" in procs[0].output
        and any(
            ".orbax-checkpoint-tmp" in name
            for name in os.listdir(workdir / "checkpoints")
            if (workdir / "checkpoints").is_dir()
        )
    ):
        assert procs[0].popen.poll() is None and time.monotonic() < deadline, procs[0].output[-3000:]
        time.sleep(0.1)
    procs[0].popen.send_signal(signal.SIGKILL)
    procs[0].popen.wait()

    result = run_program("train.pretrain", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint 4" in result.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]  # the tmp directory is gone
    assert losses(workdir) == losses(reference_program)


@pytest.mark.slow
def test_write_error_names_the_path_and_keeps_earlier_checkpoints(reference_program, tokenizer_path, tmp_path):
    workdir = tmp_path / "workdir"
    args = one_process_args(workdir, tokenizer_path)
    procs = multiprocess.run(
        "train.pretrain", args, tmp_path, processes=1, coordinator=False, env={"TJ_TEST_SAVE_ERROR": "8"}, check=False
    )
    assert procs[0].returncode == 3, procs[0].output[-3000:]
    error = [line for line in procs[0].output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "cannot write checkpoint to" in error[0] and str(workdir / "checkpoints") in error[0]
    assert "No space left on device" in error[0]

    result = run_program("train.pretrain", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint 4" in result.stdout
    assert losses(workdir) == losses(reference_program)


def test_resume_checks_the_config(reference, tokenizer_path, tmp_path, capsys):
    workdir = tmp_path / "workdir"
    shutil.copytree(reference, workdir)
    with pytest.raises(ConfigError, match=r"^model.num_layers: 1 in the checkpointed run, 2 now"):
        train_here(workdir, tokenizer_path, "model.num_layers=2")
    saved = open(workdir / "config.yaml").read()
    assert "num_layers: 1" in saved  # untouched by the refused run

    capsys.readouterr()
    train_here(workdir, tokenizer_path, "train.steps=14")  # more steps: accepted, and said
    assert "train.steps 12 -> 14" in capsys.readouterr().out
    assert "steps: 14" in open(workdir / "config.yaml").read()
    assert [r["step"] for r in logged(workdir)] == list(range(1, 15))


@pytest.mark.slow
def test_early_stopping_state_survives_a_resume(tokenizer_path, tmp_path):
    workdir = tmp_path / "workdir"
    evaluated = ("train.eval_every=2", "train.eval_steps=1", "train.early_stopping_patience=50")
    train_here(workdir, tokenizer_path, *evaluated, "train.steps=6")
    before = logged(workdir)[-1]
    cfg, task = pretrain.make_task(one_process_config(tokenizer_path, *evaluated, "train.steps=6"), str(workdir))
    tx, _ = optimizer.make_optimizer(cfg.train)
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    try:
        _, restored = trainer.init_state(task, tx, sh.make_mesh(cfg.mesh, jax.devices()[:1]), 0, checkpointer)
    finally:
        checkpointer.close()
    assert (
        restored["loop"]["best_step"] == before["best_step"]
        and restored["loop"]["best_value"] == before["best_eval_loss"]
    )
    train_here(workdir, tokenizer_path, *evaluated, "train.steps=8")
    after = logged(workdir)[-1]
    assert after["best_step"] in (before["best_step"], 8)  # carried over, or beaten at step 8


@pytest.mark.slow
def test_a_loss_spike_is_skipped(tokenizer_path, tmp_path, capsys):
    spikes = ("train.skip_spikes=true", "train.spike_window=4", "train.steps=7")

    def poison_step_7(task):
        real = iter(task.train_batches)

        class Poisoned:
            step = 0

            def __iter__(self):
                return self

            def __next__(self):
                batch = dict(next(real))
                Poisoned.step += 1
                if Poisoned.step == 7:  # every target an id the model has learnt never to predict
                    batch["targets"] = np.full_like(batch["targets"], 511)
                return batch

            get_state, set_state = task.train_batches.get_state, task.train_batches.set_state

        task.train_batches = Poisoned()

    before = jax.device_get(train_here(tmp_path / "six", tokenizer_path, *spikes[:2], "train.steps=6"))
    capsys.readouterr()
    after = jax.device_get(train_here(tmp_path / "seven", tokenizer_path, *spikes, task_hook=poison_step_7))
    out = capsys.readouterr().out
    assert "step 7: loss" in out and "update skipped" in out
    assert logged(tmp_path / "seven")[-1]["skipped"] == 1.0
    assert logged(tmp_path / "seven")[-1]["loss"] > logged(tmp_path / "seven")[-2]["loss"] + 1
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(after["params"])[0], jax.tree.leaves(before["params"])
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    counts = [
        x
        for p, x in jax.tree_util.tree_flatten_with_path(after["opt_state"])[0]
        if jax.tree_util.keystr(p).endswith(".count")
    ]
    assert counts and all(int(c) == 6 for c in counts)  # the optimizer did not advance
    assert int(after["step"]) == 7 and int(after["spikes"]["count"]) == 6


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tokenizer_path, tmp_path):
    workdir = tmp_path / "workdir"
    # the processes would agree on the first Ctrl-C only at step 1000: the second one must not wait
    args = one_process_args(workdir, tokenizer_path) + sets(["train.steps=2000", "train.stop_check_every=1000"])
    procs = multiprocess.launch("train.pretrain", args, tmp_path, processes=1, coordinator=False)
    deadline = time.monotonic() + 120
    while not (workdir / "metrics.jsonl").is_file() or not open(workdir / "metrics.jsonl").read():
        assert procs[0].popen.poll() is None and time.monotonic() < deadline, procs[0].output[-3000:]
        time.sleep(0.1)
    procs[0].popen.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.monotonic()
    procs[0].popen.send_signal(signal.SIGINT)
    procs[0].popen.wait(timeout=30)
    print(f"\nsecond Ctrl-C: exited {time.monotonic() - sent:.2f} s later")
    assert procs[0].returncode == 130 and "second interrupt: exiting now" in procs[0].output
