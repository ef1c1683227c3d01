"""The shared loop's switches: gradient accumulation, Adafactor, best-checkpoint keeping, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import pretrain, trainer
from transformer_jax import sharding, tasks
from transformer_jax.config import load_config
from transformer_jax.models import abstract_build

from helpers import FAST_COMPILE, REPO


def tiny(tokenizer_path, *extra):
    return [
        "model.model_dim=64",
        "model.mlp_dim=128",
        "model.num_layers=1",
        "data.seq_len=32",
        "train.batch_size=8",
        "data.max_documents=60",
        "data.eval_documents=4",
        "train.log_every=1",
        "train.eval_every=0",
        f"data.tokenizer={tokenizer_path}",
        "model.vocab_size=512",
        *extra,
    ]


def train(tmp_path, overrides, config="configs/gpt_tiny.yaml"):
    cfg = load_config(config, overrides)
    cfg, task = pretrain.make_task(cfg, str(tmp_path))
    return trainer.run(cfg, str(tmp_path), task, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]), quiet=True)


def logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_gradient_accumulation_averages_the_micro_batch_means():
    """train.grad_accum = A: make_train_step splits the batch into A micro-batches (example i goes to
    micro-batch i % A); each micro-batch's loss is the token-weighted mean over its own loss_mask
    tokens (losses.cross_entropy), and their gradients are summed and divided by A. So one step
    follows the gradient of the MEAN OF THE MICRO-BATCH MEANS, (1/A) sum_m sum_{i in m} nll_i / n_m,
    not of the token-weighted mean over the whole batch, sum_i nll_i / N: the two agree only when
    every micro-batch has as many loss tokens. Here they do not (16 and 2 of 8 x 4 positions), and
    the step's gradient is checked against both, computed here from the logits with jax.grad."""
    b, length, accum = 4, 8, 2
    cfg = load_config(
        "configs/gpt_tiny.yaml",
        [
            "model.vocab_size=64",
            "model.model_dim=32",
            "model.num_heads=2",
            "model.mlp_dim=64",
            "model.num_layers=1",
            "model.max_len=16",
            f"data.seq_len={length}",
            f"train.batch_size={b}",
            f"train.grad_accum={accum}",
        ],
    )
    model, abstract = abstract_build(cfg)
    rng = np.random.default_rng(0)
    # any parameter values do: random ones from NumPy (the initialisers' compile costs seconds on CPU)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.2, a.shape).astype(a.dtype)), abstract)
    loss_mask = np.zeros((b, length), np.float32)
    loss_mask[0::2] = 1.0  # micro-batch 0 (rows 0, 2): 16 loss tokens
    loss_mask[1::2, :1] = 1.0  # micro-batch 1 (rows 1, 3): 2
    batch = {
        "input_ids": rng.integers(3, 64, (b, length)).astype(np.int32),
        "targets": rng.integers(3, 64, (b, length)).astype(np.int32),
        "loss_mask": loss_mask,
        "segment_ids": np.ones((b, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (b, 1)),
    }
    # an "optimizer" whose state is the last gradient it was given (the initial state: any tree shaped
    # like the params), and that leaves the params alone
    keep_grads = optax.GradientTransformation(
        lambda p: p, lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g)
    )
    task = trainer.Task(model=model, init_params=None, loss_fn=tasks.get("clm").loss_fn(cfg), train_batches=None)
    step = jax.jit(trainer.make_train_step(task, keep_grads, lambda s: 0.0, cfg.train))
    state, metrics = step(
        {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": params}, jax.tree.map(jnp.asarray, batch)
    )
    grads = state["opt_state"]

    micro = np.arange(b) % accum  # the micro-batch of each row
    n_micro = np.array([loss_mask[micro == m].sum() for m in range(accum)])  # loss tokens per micro-batch
    per_micro_mean = loss_mask / (accum * n_micro[micro][:, None])  # (1/A) sum_m sum_i nll_i / n_m
    token_mean = loss_mask / loss_mask.sum()  # sum_i nll_i / N

    def weighted_nll(p, weights):
        logits = model.apply(
            p, input_ids=batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"]
        ).logits.astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights)

    value_and_grad = jax.jit(jax.value_and_grad(weighted_nll))
    (loss_mm, want), (loss_tok, other) = value_and_grad(params, per_micro_mean), value_and_grad(params, token_mean)

    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)
    got, want, other = flat(grads), flat(want), flat(other)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    rel_other = np.linalg.norm(got - other) / np.linalg.norm(want)
    print(
        f"\nrelative gradient error: vs mean of micro-batch means {rel:.2e}, vs token-weighted mean {rel_other:.2e}; "
        f"loss {float(metrics['loss']):.6f} (means {float(loss_mm):.6f}, token-weighted {float(loss_tok):.6f})"
    )
    assert rel <= 1e-5, rel  # float32: the same sum in another order
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert float(metrics["loss"]) == pytest.approx(float(loss_mm), rel=1e-6)
    # and measurably not the whole batch's token-weighted mean
    assert rel_other > 1e-2, rel_other
    assert abs(float(loss_mm) - float(loss_tok)) > 1e-3 * abs(float(loss_tok))  # 3e-3 here; agreement: 1e-6


@pytest.mark.slow
def test_adafactor_and_inverse_sqrt_train(tokenizer_path, tmp_path):
    metrics, state = train(
        tmp_path,
        tiny(
            tokenizer_path,
            "train.steps=20",
            "train.optimizer=adafactor",
            "train.schedule=inverse_sqrt",
            "train.warmup_steps=5",
            "train.learning_rate=0.05",
            "train.checkpoint_every=100",
        ),
    )
    curve = [r["loss"] for r in logged(tmp_path)]
    assert curve[-1] < curve[0] - 0.3
    lrs = [r["learning_rate"] for r in logged(tmp_path)]
    assert np.argmax(lrs) == 4 and lrs[-1] < lrs[4]  # warm up for 5 steps, then 1/sqrt decay


@pytest.mark.slow
def test_keeps_last_k_and_the_best_checkpoint(tokenizer_path, tmp_path):
    train(
        tmp_path,
        tiny(
            tokenizer_path,
            "train.steps=12",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            "train.keep_checkpoints=2",
            "train.eval_steps=1",
        ),
    )
    kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    evals = {r["step"]: r["eval_loss"] for r in logged(tmp_path) if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert kept[-2:] == [10, 12] and best in kept and len(kept) <= 3, (kept, evals)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tokenizer_path, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "XLA_FLAGS": FAST_COMPILE}
    args = [
        a for o in tiny(tokenizer_path, "train.steps=100000", "train.checkpoint_every=100000") for a in ("--set", o)
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.pretrain", "--workdir", str(tmp_path), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while (
        time.time() < deadline
        and proc.poll() is None
        and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3)
    ):
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
    assert source.i == 3  # two batches ahead of the one handed out
    assert prefetch.get_state() == {"i": 1} and int(local["input_ids"][0, 0]) == 0
    assert isinstance(first["input_ids"], jax.Array) and first["input_ids"].sharding == sharding.batch_sharding(mesh)
    rest = [int(b["input_ids"][0, 0]) for _, b in prefetch]
    assert rest == [1, 2, 3, 4] and prefetch.get_state() == {"i": 5}


@pytest.mark.slow
def test_tensorboard_events_hold_the_logged_losses(tmp_path):
    """Every run leaves TensorBoard events; the writer is imported without torch (2-3 s a run)."""
    import subprocess
    import sys

    code = (
        "import sys; from train.trainer import summary_writer; w = summary_writer(sys.argv[1], 1); "
        "[w.add_scalar('loss', 2.0 - s / 10, s) for s in (1, 2, 3)]; w.close(); print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
    from tensorboardX.proto.event_pb2 import Event

    (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if "tfevents" in f]
    data, scalars = open(path, "rb").read(), []
    while data:  # TFRecords: length (8 bytes), its crc (4), the Event, its crc (4)
        n = int.from_bytes(data[:8], "little")
        event = Event.FromString(data[12 : 12 + n])
        scalars += [(event.step, round(v.simple_value, 4)) for v in event.summary.value if v.tag == "loss"]
        data = data[16 + n :]
    assert scalars == [(1, 1.9), (2, 1.8), (3, 1.7)]
