"""The one train loop every program uses.

One file over 400 lines on purpose: the loop's parts (jitted step, sharded state, agreed stops,
checkpoints with data positions, metrics) share state and invariants that are easiest to check
when read top to bottom, as big_vision keeps its train loop. The optimizer it steps with (schedule,
AdamW / Adafactor, frozen parameters, its state's shardings) is its own module, train/optimizer.py.

A program describes *what* to train as a `Task` (transformer_jax.tasks.base: model, initial params,
loss, batches), which a registered objective builds (transformer_jax.tasks); `run`
does the rest: mesh, sharded state, optax, the jitted step with gradient accumulation, eval,
Orbax checkpoints with the input pipeline's position, exact resume, metrics, progress bar.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from train import optimizer
from transformer_jax import attention as attn
from transformer_jax import sharding as sh
from transformer_jax.checkpoint import Checkpointer, CheckpointWriteError, abstract_with_shardings
from transformer_jax.config import Config, ConfigError, TrainConfig, save_config, to_dict
from transformer_jax.tasks.base import Task


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); checkpoints already written stay as they are."""


# ----------------------------------------------------------------------------- the step
def check_batch_fits(t: TrainConfig, mesh) -> None:
    data_parallel = sh.batch_parallel(mesh)
    if (t.batch_size // t.grad_accum) % data_parallel:
        raise ConfigError(
            f"train.batch_size: micro-batches of {t.batch_size // t.grad_accum} do not split over "
            f"data*fsdp = {data_parallel} devices"
        )


def batch_tokens(batch: dict) -> int:
    return sum(int(np.prod(batch[k].shape)) for k in ("input_ids", "decoder_input_ids") if k in batch)


class DevicePrefetch:
    """The train batches, `size` of them read ahead and already on the devices with the batch
    sharding: the host-to-device copy of the next batches overlaps the step. Its position
    (`get_state`) is that of the last batch handed out, never of the ones read ahead, so a
    checkpoint resumes exactly. Yields (this process's batch, the global batch on the devices)."""

    def __init__(self, batches, mesh, size: int):
        self.batches, self.mesh, self.size = batches, mesh, size
        self.iterator = iter(batches)
        self.queue: collections.deque = collections.deque()
        self.position = batches.get_state()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, dict]:
        while len(self.queue) <= self.size:
            try:
                local = next(self.iterator)
            except StopIteration:
                break
            self.queue.append((local, sh.global_batch(local, self.mesh), self.batches.get_state()))
        if not self.queue:
            raise StopIteration
        local, batch, self.position = self.queue.popleft()
        return local, batch

    def get_state(self):
        return self.position


def make_train_step(
    task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule, t: TrainConfig, mesh=None
) -> Callable:
    """train_step(state, batch) -> (state, metrics): one optimizer step over `grad_accum` micro-batches."""
    base_key = jax.random.key(t.seed + 1)
    trainable = task.trainable

    def frozen_stopped(p):  # no gradient flows into frozen parameters: XLA drops their backward pass
        if trainable is None:
            return p
        return jax.tree.map(lambda keep, x: x if keep else jax.lax.stop_gradient(x), trainable, p)

    grad_fn = jax.value_and_grad(lambda p, b, r: task.loss_fn(task.model, frozen_stopped(p), b, r), has_aux=True)

    def train_step(state, batch):
        step_key = jax.random.fold_in(base_key, state["step"])
        params = state["params"]
        if t.grad_accum == 1:
            (loss, metrics), grads = grad_fn(params, batch, step_key)
        else:

            def split(x):  # example i goes to micro-batch i % accum, so each keeps its data sharding
                x = x.reshape((x.shape[0] // t.grad_accum, t.grad_accum) + x.shape[1:])
                return jnp.moveaxis(x, 1, 0)

            micro_batches = jax.tree.map(split, batch)

            def accumulate(carry, xs):
                micro, index = xs
                return jax.tree.map(jnp.add, carry, grad_fn(params, micro, jax.random.fold_in(step_key, index))), None

            shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), step_key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((loss, metrics), grads), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(t.grad_accum)))
            loss, metrics, grads = jax.tree.map(lambda x: x / t.grad_accum, (loss, metrics, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if trainable is not None:  # frozen parameters are passed through untouched (bitwise)
            new_params = jax.tree.map(lambda keep, new, old: new if keep else old, trainable, new_params, params)
        grad_norm = optax.tree.norm(grads)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"])}
        if t.skip_spikes:
            spike, new_state["spikes"] = spike_test(state["spikes"], loss, grad_norm, t.spike_threshold)
            kept = {"params": params, "opt_state": state["opt_state"]}
            new_state.update(
                jax.tree.map(
                    lambda old, new: jnp.where(spike, old, new), kept, {"params": new_params, "opt_state": opt_state}
                )
            )
            metrics["skipped"] = spike.astype(jnp.float32)
        return new_state, metrics

    return train_step


def spike_history(window: int) -> dict:
    """The recent non-spike steps' losses and grad norms that `spike_test` compares with."""
    return {
        "loss": jnp.zeros((window,), jnp.float32),
        "grad_norm": jnp.zeros((window,), jnp.float32),
        "count": jnp.zeros((), jnp.int32),
    }


def spike_test(history: dict, loss, grad_norm, threshold: float):
    """(spike, new history): a step is a spike when its loss or grad norm is not finite, or, once the
    window is full, above the window's mean + threshold * std. A spike does not enter the window."""
    window = history["loss"].shape[0]
    full = history["count"] >= window

    def above(x, recent):
        return x > jnp.mean(recent) + threshold * jnp.std(recent)

    values = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm.astype(jnp.float32)}
    spike = ~(jnp.isfinite(values["loss"]) & jnp.isfinite(values["grad_norm"]))
    spike |= full & (above(values["loss"], history["loss"]) | above(values["grad_norm"], history["grad_norm"]))
    slot = history["count"] % window
    updated = {k: history[k].at[slot].set(values[k]) for k in values}
    updated["count"] = history["count"] + 1
    return spike, jax.tree.map(lambda old, new: jnp.where(spike, old, new), history, updated)


def make_eval_step(task: Task) -> Callable:
    def eval_step(params, batch):
        loss, metrics = task.loss_fn(task.model, params, batch, None)
        return {**metrics, "loss": loss}

    return eval_step


# ----------------------------------------------------------------------------- state
@dataclasses.dataclass
class ShardedState:
    state: Any
    shardings: Any
    abstract: Any


def init_state(
    task: Task,
    tx: optax.GradientTransformation,
    mesh,
    seed: int,
    checkpointer: Checkpointer | None,
    *,
    spike_window: int = 0,
    strict: bool = False,
    warn: Callable[[str], None] = print,
):
    """The train state {step, params, opt_state[, spikes]} created (or restored from the newest
    readable checkpoint) directly in its shardings: no full copy is gathered on one device.
    Returns (ShardedState, None or {"pipeline": this process's data position, "loop": loop state})."""
    attn.check_backend(task.model.cfg.attention_impl)
    abstract_params = jax.eval_shape(task.init_params, jax.random.key(seed))
    param_shardings = sh.tree_shardings(task.model.logical_axes, abstract_params, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optimizer.optimizer_shardings(abstract_opt, abstract_params, param_shardings, mesh)
    shardings = {"step": sh.replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt}
    if spike_window:
        abstract["spikes"] = jax.eval_shape(lambda: spike_history(spike_window))
        shardings["spikes"] = jax.tree.map(lambda _: sh.replicated(mesh), abstract["spikes"])
    abstract = abstract_with_shardings(abstract, shardings)
    restored = checkpointer and checkpointer.restore_newest_readable(abstract, strict=strict, warn=warn)
    if restored:
        _, state, position, loop = restored
        return ShardedState(state, shardings, abstract), {"pipeline": position, "loop": loop}

    def start_from(params):
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        return {**state, "spikes": spike_history(spike_window)} if spike_window else state

    if task.initial_params is not None:
        state = jax.jit(start_from, out_shardings=shardings)(jax.device_put(task.initial_params, param_shardings))
    else:
        state = jax.jit(lambda key: start_from(task.init_params(key)), out_shardings=shardings)(jax.random.key(seed))
    return ShardedState(state, shardings, abstract), None


# ----------------------------------------------------------------------------- logging
def summary_writer(logdir: str, purge_step: int):
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch (2-3 s of
    CPU per run) only to accept torch tensors, and the loop logs Python floats."""
    blocked = "torch" not in sys.modules
    if blocked:
        # `import torch` raises ImportError inside tensorboardX, which it allows
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter(logdir, purge_step=purge_step)


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in the workdir; only process 0 writes. A run
    resumed at `resume_step` first drops the records logged after it, so each step appears once."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = jax.process_index() == 0
        path = os.path.join(workdir, "metrics.jsonl")
        if self.active and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)
        self.file = open(path, "a") if self.active else None
        self.tb = None
        if self.active:
            try:
                self.tb = summary_writer(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                pass

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        assert self.file is not None  # opened where active
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.active:
            assert self.file is not None  # opened where active
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def mean_metrics(items: list[dict]) -> dict:
    items = jax.device_get(items)
    return {k: float(np.mean([m[k] for m in items])) for k in items[0]} if items else {}


class _Interrupt:
    """SIGTERM / SIGINT set a flag; the processes agree to stop, save one checkpoint and exit 0.
    A second SIGINT (Ctrl-C) exits at once, without saving."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            print("second interrupt: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agree_to_stop(reasons: dict[str, bool]) -> dict[str, bool]:
    """Each reason to stop, true when it holds on any process: every process stops at the same step."""
    return dict(zip(reasons, sh.any_process(list(reasons.values()))))


# a resumed run may change these; any other key differs from the checkpointed run's at its peril
RESUMABLE_KEYS = (
    "train.steps",
    "train.time_limit_s",
    "train.eval_every",
    "train.eval_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.resume",
    "train.stop_check_every",
    "train.early_stopping_patience",
    "train.prefetch",
    "mesh.",
    "distributed.",
    "name",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def check_resumed_config(cfg: Config, path: str, say: Callable[[str], None]) -> bool:
    """Compare the run's config with the checkpointed run's `path`: a changed key outside
    RESUMABLE_KEYS is a ConfigError naming it with both values; changed resumable keys are said
    in one line. Returns whether config.yaml needs rewriting."""
    with open(path) as f:
        saved = _flatten(yaml.safe_load(f) or {})
    now = _flatten(to_dict(cfg))
    changed = [k for k in now if k in saved and saved[k] != now[k]]  # a key new to the code keeps its default
    for key in changed:
        if not key.startswith(RESUMABLE_KEYS):
            raise ConfigError(
                f"{key}: {saved[key]!r} in the checkpointed run, {now[key]!r} now: a "
                f"resumed run keeps it (or start a new --workdir)"
            )
    if changed:
        say("config.yaml updated for the resumed run: " + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed))
    return bool(changed)


# ----------------------------------------------------------------------------- the loop
def shut_down(checkpointer: Checkpointer, task: Task, writer: MetricsWriter, bar) -> None:
    """The run's one orderly end, whether it finished, stopped on a signal or failed: first the last
    checkpoint's commit (nothing written is lost to whatever happens after), then the input
    pipeline (its prefetch threads and worker processes), then the metric writers. Each step runs
    even when an earlier one raised; the first error is raised after them."""
    with contextlib.ExitStack() as stack:  # callbacks run last-registered first
        stack.callback(bar.close)
        stack.callback(writer.close)
        stack.callback(task.close)
        try:
            checkpointer.close()
        except CheckpointWriteError as e:
            raise TrainingError(str(e)) from e


def evaluate(task: Task, eval_step, params, mesh, max_batches: int) -> dict:
    results = []
    if task.eval_batches is not None:
        for i, batch in enumerate(task.eval_batches()):
            if i >= max_batches:
                break
            results.append(eval_step(params, sh.global_batch(batch, mesh)))
    metrics = {f"eval_{k}": v for k, v in mean_metrics(results).items()}
    if "eval_loss" in metrics:
        metrics["eval_perplexity"] = float(np.exp(min(metrics["eval_loss"], 50.0)))
    if task.evaluate is not None:
        metrics.update({f"eval_{k}": v for k, v in task.evaluate(params).items()})
    return metrics


def run(
    cfg: Config,
    workdir: str,
    task: Task,
    *,
    mesh=None,
    quiet: bool = False,
    on_eval: Callable[[int, dict], bool] | None = None,
) -> tuple[dict, Any]:
    """Train `task` as `cfg.train` says, in `workdir`; resume from its newest readable checkpoint if
    any. Every process takes the same decisions (stop, save, eval) at the same steps. `on_eval(step,
    eval metrics)` is called after each eval on every process; True on any of them stops the run
    there, with a checkpoint of that step (train.sweep prunes trials so). Returns (the last logged
    metrics with eval figures when an eval ran, the final train state)."""
    t = cfg.train
    primary = jax.process_index() == 0
    say = (lambda line: print(line, flush=True)) if primary else (lambda line: None)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh or sh.make_mesh(cfg.mesh)
    check_batch_fits(t, mesh)
    tx, schedule = optimizer.make_optimizer(t, task.trainable, task.lr_scale)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=t.keep_checkpoints,
        best_metric=task.best_metric and f"eval_{task.best_metric}",
        best_mode=task.best_mode,
    )
    config_path = os.path.join(workdir, "config.yaml")
    try:
        resuming = checkpointer.latest_step() is not None
        rewrite = not resuming or not os.path.exists(config_path) or check_resumed_config(cfg, config_path, say)
        sharded, restored = init_state(
            task,
            tx,
            mesh,
            t.seed,
            checkpointer,
            spike_window=t.spike_window if t.skip_spikes else 0,
            strict=t.resume == "strict",
            warn=say,
        )
    except BaseException:
        checkpointer.close()
        raise
    if primary and rewrite:
        save_config(cfg, config_path)
    loop: dict[str, Any] = {"best_value": None, "best_step": None, "evals_since_best": 0}  # as the checkpoint's JSON
    if restored:
        task.train_batches.set_state(restored["pipeline"])
        loop.update(restored["loop"])
    state = sharded.state
    start_step = int(jax.device_get(state["step"]))
    if restored:
        say(f"resuming from checkpoint {start_step}")

    train_step = sh.with_mesh(
        jax.jit(
            make_train_step(task, tx, schedule, t),
            donate_argnums=(0,),
            in_shardings=(sharded.shardings, sh.batch_sharding(mesh)),
            out_shardings=(sharded.shardings, sh.replicated(mesh)),
        ),
        mesh,
    )
    eval_step = sh.with_mesh(
        jax.jit(
            make_eval_step(task),
            in_shardings=(sharded.shardings["params"], sh.batch_sharding(mesh)),
            out_shardings=sh.replicated(mesh),
        ),
        mesh,
    )
    writer = MetricsWriter(workdir, start_step)
    batches = DevicePrefetch(task.train_batches, mesh, t.prefetch)
    pending, last, window_tokens, window_start = [], {}, 0, time.perf_counter()
    run_start = time.perf_counter()
    best_key = task.best_metric and f"eval_{task.best_metric}"
    # a time-limited run ends at whichever comes first: count steps without a misleading total
    bar = tqdm(
        total=None if t.time_limit_s else t.steps,
        initial=start_step,
        disable=quiet or not primary,
        desc=cfg.name or "train",
        dynamic_ncols=True,
    )

    def save(step, metrics=None, force=False):
        checkpointer.save(step, state, batches.get_state(), loop, metrics=metrics, force=force)

    def check_finite(records, step):
        for m in records:
            if not np.isfinite(m["loss"]) and not m.get("skipped"):
                raise TrainingError(
                    f"loss is {m['loss']} at step {step}: stopping; the last good checkpoint "
                    f"({checkpointer.latest_step()}) is kept"
                )

    try:
        with _Interrupt() as interrupt:
            step = start_step
            while step < t.steps:
                local, batch = next(batches)
                window_tokens += batch_tokens(local)
                state, metrics = train_step(state, batch)
                step += 1
                pending.append((step, metrics))
                bar.update(1)
                stop = {"signal": False, "time": False}
                if step % t.stop_check_every == 0 and step < t.steps:
                    stop = agree_to_stop(
                        {
                            "signal": interrupt.signal is not None,
                            "time": bool(t.time_limit_s) and time.perf_counter() - run_start > t.time_limit_s,
                        }
                    )
                stopping = stop["signal"] or stop["time"]
                boundary = step % t.log_every == 0 or step == t.steps or stopping
                saving = step % t.checkpoint_every == 0 or step == t.steps or stopping
                evaluating = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
                if boundary or saving or evaluating:
                    steps, records = [s for s, _ in pending], jax.device_get([m for _, m in pending])
                    check_finite(records, step)
                    last = {k: float(np.mean([m[k] for m in records])) for k in records[0]}
                    last["learning_rate"] = float(records[-1]["learning_rate"])
                    for s, m in zip(steps, records):
                        if m.get("skipped"):
                            bar.write(
                                f"step {s}: loss {m['loss']:.4g}, grad norm {m['grad_norm']:.4g} is a spike: "
                                "update skipped"
                            )
                    if "skipped" in last:
                        last["skipped"] = float(sum(m["skipped"] for m in records))
                    elapsed = time.perf_counter() - window_start
                    last["tokens_per_sec"] = window_tokens / max(elapsed, 1e-9)
                    pending, window_tokens, window_start = [], 0, time.perf_counter()
                    eval_metrics = evaluate(task, eval_step, state["params"], mesh, t.eval_steps) if evaluating else {}
                    last.update(eval_metrics)
                    stop_early = False
                    if best_key and best_key in eval_metrics:
                        value, best = eval_metrics[best_key], loop["best_value"]
                        better = best is None or (value < best if task.best_mode == "min" else value > best)
                        if better:
                            loop.update(best_value=value, best_step=step, evals_since_best=0)
                        else:
                            loop["evals_since_best"] += 1
                        stop_early = (
                            bool(t.early_stopping_patience) and loop["evals_since_best"] >= t.early_stopping_patience
                        )
                        # with early stopping, every new best is written (Checkpointer keeps the best one)
                        saving = saving or stop_early or (better and bool(t.early_stopping_patience))
                    asked = False  # on_eval's stop: a collective, at a step every process evals
                    if on_eval is not None and eval_metrics:
                        asked = agree_to_stop({"on_eval": bool(on_eval(step, dict(eval_metrics)))})["on_eval"]
                        saving = saving or asked
                    if loop["best_value"] is not None:
                        last[f"best_{best_key}"], last["best_step"] = loop["best_value"], loop["best_step"]
                    writer.write(step, last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
                    if saving:
                        save(step, eval_metrics or None, force=stopping or stop_early or asked)
                    if stop_early:
                        bar.write(
                            f"early stopping at step {step}: {best_key} has not improved on "
                            f"{loop['best_value']:.4g} (step {loop['best_step']}) for {loop['evals_since_best']} evals"
                        )
                        break
                    if asked:
                        if not quiet:
                            bar.write(f"stopped at step {step}: on_eval asked to stop; saved checkpoint {step}")
                        break
                if stop["signal"]:
                    bar.write(f"stop requested (signal) at step {step}: saved checkpoint {step} on every process")
                    break
                if stop["time"]:
                    bar.write(f"time limit {t.time_limit_s}s reached at step {step}: saved checkpoint {step}, stopping")
                    break
    except CheckpointWriteError as e:
        raise TrainingError(str(e)) from e
    finally:
        shut_down(checkpointer, task, writer, bar)
    last["step"] = int(jax.device_get(state["step"]))
    return last, state
