"""The optimizer every program trains with: the learning-rate schedule (warmup, then constant,
linear, cosine or inverse square root decay) and AdamW or Adafactor with clipping, frozen
parameters and per-parameter learning-rate scales (train.trainer.run builds it from the config),
and the shardings its state takes on a mesh."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from transformer_jax import sharding as sh
from transformer_jax.config import TrainConfig


def learning_rate_schedule(t: TrainConfig) -> optax.Schedule:
    warmup = round(t.warmup_ratio * t.steps) if t.warmup_ratio > 0 else max(t.warmup_steps, 0)
    if t.schedule == "inverse_sqrt":  # the 2017 Transformer's: linear warmup, then 1/sqrt(step)

        def schedule(step):
            step = jnp.maximum(step + 1, 1).astype(jnp.float32)
            return t.learning_rate * jnp.minimum(step / max(warmup, 1), jnp.sqrt(max(warmup, 1) / step))

        return schedule
    decay_steps = max(t.steps - warmup, 1)
    decay = {
        "constant": optax.constant_schedule(t.learning_rate),
        "linear": optax.linear_schedule(t.learning_rate, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=0.1),
    }[t.schedule]
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, warmup), decay], [warmup])


def scale_updates_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by its entry of `scales` (a pytree like the params); no state."""
    return optax.stateless(
        lambda updates, params=None: jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
    )


def make_optimizer(
    t: TrainConfig, trainable: Any = None, lr_scale: Any = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW or Adafactor with clipping; no weight decay on biases and norm scales (1-d params);
    parameters marked untrainable get a zero update and no optimizer state; `lr_scale` (a pytree
    like the params) scales each parameter's update: its effective learning rate."""
    schedule = learning_rate_schedule(t)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    if t.optimizer == "adamw":
        core = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask)
    else:
        core = optax.adafactor(schedule, weight_decay_rate=t.weight_decay or None, weight_decay_mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), core) if t.grad_clip > 0 else core
    if trainable is not None:
        labels = jax.tree.map(lambda keep: "train" if keep else "freeze", trainable)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    if lr_scale is not None:
        tx = optax.chain(tx, scale_updates_by_tree(lr_scale))
    return tx, schedule


def optimizer_shardings(abstract_opt, abstract_params, param_shardings, mesh):
    """Shardings of the optimizer state: a leaf whose path ends with a parameter's path and has its
    shape (Adam's mu and nu, under any chain / mask / multi_transform) follows that parameter; the
    rest (step counts, Adafactor's factored moments) is replicated. (XLA cannot propagate these from
    the params: `tx.init` ignores their values, so its compiled outputs land on one device.)"""
    by_path = {
        tuple(path): (x.shape, s)
        for (path, x), s in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_shardings)
        )
    }

    def sharding(path, x):
        for k in range(len(path)):
            shape, s = by_path.get(tuple(path[k:]), (None, None))
            if s is not None and shape == x.shape:
                return s
        return sh.replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding, abstract_opt)
