"""What every objective gives the train loop: the `Objective` interface and the `Task` it builds.

An Objective is a frozen dataclass registered by name in `transformer_jax.tasks.REGISTRY`:
    with_heads(cfg)          the config with the model heads the objective adds
    loss_fn(cfg)             loss_fn(model, params, batch, dropout_rng) -> (loss, metrics), pure
    make_task(cfg, workdir)  (cfg with its heads, Task): data, loss, eval for train.trainer.run
    batch_shapes(cfg, n)     {key: (shape, dtype)} of an n-row batch: abstract inputs, the bench
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from transformer_jax import config as config_lib
from transformer_jax.config import Config, ConfigError

LossFn = Callable[[Any, Any, dict, Any], tuple[jax.Array, dict]]
Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclasses.dataclass
class Task:
    """What a program trains. `loss_fn(model, params, batch, dropout_rng) -> (loss, metrics)` is pure;
    `train_batches` yields host-local numpy dicts and has get_state()/set_state(state) so the run can
    resume exactly; `eval_batches()` returns a fresh iterable of eval batches; `trainable` is a bool
    pytree like params (None = all trainable: frozen ones get no gradient, no optimizer state and stay
    bitwise unchanged); `evaluate(params)` adds figures such as BLEU; `lr_scale` a pytree like params
    of floats (or arrays broadcasting against them) multiplying each parameter's update (layer-wise
    learning-rate decay); `initial_params` concrete params to start from (a pretrained model) instead
    of `init_params(rng)`, which then only gives their shapes."""

    model: Any  # transformer_jax.models.Model
    init_params: Callable[[jax.Array], Any]
    loss_fn: LossFn
    train_batches: Any
    eval_batches: Callable[[], Iterable[dict]] | None = None
    trainable: Any = None
    evaluate: Callable[[Any], dict] | None = None
    best_metric: str | None = None  # eval metric that picks the best checkpoint
    best_mode: str = "min"
    lr_scale: Any = None
    initial_params: Any = None

    def close(self) -> None:
        """Close the train batches' iterator: its prefetch threads and worker processes end now, not
        at interpreter exit. The train loop calls it when the run ends, however it ends."""
        from transformer_jax.data.pipeline import close

        close(self.train_batches)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    """One training objective. Subclasses implement loss_fn, make_task and batch_shapes."""

    name: str
    family: str | None  # the model family it trains; None: any
    heads: tuple[str, ...] = ()  # model heads it adds (the config may describe the bare model)

    def with_heads(self, cfg: Config) -> Config:
        heads = tuple(dict.fromkeys(cfg.model.heads + self.heads))
        pooler = cfg.model.pooler or "nsp" in heads
        if heads == cfg.model.heads and pooler == cfg.model.pooler:
            return cfg
        return config_lib.replace(cfg, model=dict(heads=heads, pooler=pooler))

    def loss_fn(self, cfg: Config) -> LossFn:
        raise NotImplementedError(f"objective {self.name} has no standalone loss")

    def make_task(self, cfg: Config, workdir: str) -> tuple[Config, Task]:
        raise NotImplementedError(f"objective {self.name} builds no task")

    def batch_shapes(self, cfg: Config, batch_size: int) -> Shapes:
        raise ConfigError(f"train.objective: {self.name} batches come from its data; it has no synthetic batch")


def split_batch(cfg: Config) -> int:
    """This process's rows of train.batch_size (every process feeds the same number)."""
    processes = jax.process_count()
    if cfg.train.batch_size % processes:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} does not split over {processes} processes")
    return cfg.train.batch_size // processes


def tokenizer_for(cfg: Config, workdir: str, documents, **train_kw):
    """The tokenizer of the run: data.tokenizer, the workdir's (resume), or one trained on
    `documents` (a sequence, or a function giving one) by process 0 and saved in the workdir."""
    from transformer_jax.data.tokenizer import load_or_train_tokenizer

    if jax.process_index() == 0 or cfg.data.tokenizer:
        tokenizer = load_or_train_tokenizer(
            workdir, documents, cfg.model.vocab_size, path=cfg.data.tokenizer or None, **train_kw
        )
    if jax.process_count() > 1 and not cfg.data.tokenizer:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tokenizer")
        tokenizer = load_or_train_tokenizer(workdir, None, path=os.path.join(workdir, "tokenizer.model"))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} pieces"
        )
    return tokenizer
