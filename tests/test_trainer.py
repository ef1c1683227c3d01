"""The shared loop's switches: gradient accumulation, Adafactor, best-checkpoint keeping, SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from train import pretrain, trainer
from transformer_jax import sharding
from transformer_jax.config import load_config

from helpers import REPO


def tiny(tokenizer_path, *extra):
    return ["model.model_dim=64", "model.mlp_dim=128", "model.num_layers=1", "data.seq_len=32", "train.batch_size=8",
            "data.max_documents=60", "data.eval_documents=4", "train.log_every=1", "train.eval_every=0",
            f"data.tokenizer={tokenizer_path}", "model.vocab_size=512", *extra]


def train(tmp_path, overrides, config="configs/gpt_tiny.yaml"):
    cfg = load_config(config, overrides)
    cfg, task = pretrain.make_task(cfg, str(tmp_path))
    return trainer.run(cfg, str(tmp_path), task, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]), quiet=True)


def logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_gradient_accumulation_matches_one_big_batch(tokenizer_path, tmp_path):
    base = tiny(tokenizer_path, "train.steps=3", "train.checkpoint_every=100", "train.schedule=constant",
                "train.warmup_steps=0")
    _, whole = train(tmp_path / "whole", base)
    _, accumulated = train(tmp_path / "accum", base + ["train.grad_accum=4"])
    a, b = logged(tmp_path / "whole"), logged(tmp_path / "accum")
    # each micro-batch loss is a mean over its own tokens: equal to the big batch's up to token counts
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=2e-3)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), whole["params"], accumulated["params"]))
    assert max(diffs) < 2e-3


def test_adafactor_and_inverse_sqrt_train(tokenizer_path, tmp_path):
    metrics, state = train(tmp_path, tiny(tokenizer_path, "train.steps=20", "train.optimizer=adafactor",
                                          "train.schedule=inverse_sqrt", "train.warmup_steps=5",
                                          "train.learning_rate=0.05", "train.checkpoint_every=100"))
    curve = [r["loss"] for r in logged(tmp_path)]
    assert curve[-1] < curve[0] - 0.3
    lrs = [r["learning_rate"] for r in logged(tmp_path)]
    assert np.argmax(lrs) == 4 and lrs[-1] < lrs[4]  # warm up for 5 steps, then 1/sqrt decay


def test_keeps_last_k_and_the_best_checkpoint(tokenizer_path, tmp_path):
    train(tmp_path, tiny(tokenizer_path, "train.steps=12", "train.checkpoint_every=2", "train.eval_every=2",
                         "train.keep_checkpoints=2", "train.eval_steps=1"))
    kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    evals = {r["step"]: r["eval_loss"] for r in logged(tmp_path) if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert kept[-2:] == [10, 12] and best in kept and len(kept) <= 3, (kept, evals)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tokenizer_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [a for o in tiny(tokenizer_path, "train.steps=100000", "train.checkpoint_every=100000") for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--workdir", str(tmp_path), *args], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 100000
    assert logged(tmp_path)[-1]["step"] == saved[0]


class _Counting:
    """Batches 0, 1, 2, ... whose position is the number handed out (a stand-in for the pipeline)."""

    def __init__(self, n):
        self.n, self.i = n, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.n:
            raise StopIteration
        self.i += 1
        return {"input_ids": np.full((8, 4), self.i - 1, np.int32)}

    def get_state(self):
        return {"i": self.i}


def test_device_prefetch_reads_ahead_but_reports_the_position_handed_out():
    mesh = sharding.make_mesh(None)  # 8 fake devices: data=8
    source = _Counting(5)
    prefetch = trainer.DevicePrefetch(source, mesh, size=2)
    assert prefetch.get_state() == {"i": 0}
    local, first = next(prefetch)
    assert source.i == 3                                   # two batches ahead of the one handed out
    assert prefetch.get_state() == {"i": 1} and int(local["input_ids"][0, 0]) == 0
    assert isinstance(first["input_ids"], jax.Array) and first["input_ids"].sharding == sharding.batch_sharding(mesh)
    rest = [int(b["input_ids"][0, 0]) for _, b in prefetch]
    assert rest == [1, 2, 3, 4] and prefetch.get_state() == {"i": 5}


def test_tensorboard_events_hold_the_logged_losses(tmp_path):
    """Every run leaves TensorBoard events; the writer is imported without torch (2-3 s a run)."""
    import subprocess
    import sys
    code = ("import sys; from train.trainer import summary_writer; w = summary_writer(sys.argv[1], 1); "
            "[w.add_scalar('loss', 2.0 - s / 10, s) for s in (1, 2, 3)]; w.close(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
    from tensorboardX.proto.event_pb2 import Event
    (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if "tfevents" in f]
    data, scalars = open(path, "rb").read(), []
    while data:  # TFRecords: length (8 bytes), its crc (4), the Event, its crc (4)
        n = int.from_bytes(data[:8], "little")
        event = Event.FromString(data[12:12 + n])
        scalars += [(event.step, round(v.simple_value, 4)) for v in event.summary.value if v.tag == "loss"]
        data = data[16 + n:]
    assert scalars == [(1, 1.9), (2, 1.8), (3, 1.7)]
