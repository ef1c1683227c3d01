"""Text objectives on the pretraining corpus (clm, mlm, span_corruption, ...): what they share.
Each of those modules is a `TextObjective`: how its batch is built from packed
token rows (or sentence pairs), its shapes, its model inputs and its losses. Everything else
(the corpus, the tokenizer, the grain pipeline, eval, the loss arithmetic) is here, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import losses
from transformer_jax import sharding as sh
from transformer_jax.config import Config, ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import prepared
from transformer_jax.data.pipeline import (
    BatchContext,
    Options,
    ResumableIterator,
    in_workers,
    make_dataset,
    make_eval_dataset,
    objective_options,
    process_rows,
)
from transformer_jax.models import abstract_build, build
from transformer_jax.tasks.base import LossFn, Objective, Shapes, Task, split_batch, tokenizer_for
from transformer_jax.tasks.init_from import (
    check_architecture,
    initial_params,
    keep_tokenizer,
    open_source,
    resuming,
    source_tokenizer,
)

I32, F32 = np.dtype(np.int32), np.dtype(np.float32)


# build(rows, rng) -> batch. rows: packed {"tokens", "tokens_segment_ids", "tokens_positions"} [b, row_length]
# arrays, or (rows="pairs") a list of (ids_a, ids_b, is_next) sentence pairs.
BatchFn = Callable[[Any, np.random.Generator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextObjective(Objective):
    model_inputs: tuple[str, ...]  # batch keys passed to model.apply
    losses: dict[str, tuple[str, str, str]]  # loss name -> (logits source, targets key, weights key)
    batch_fn: Callable[[BatchContext], BatchFn]  # called once per dataset: may check the context
    shapes: Callable[[int, int, Options], Shapes]  # (batch, seq_len, options) -> {key: (shape, dtype)}
    row_length: Callable[[int, Options], int] = lambda seq_len, o: seq_len  # tokens per packed row
    rows: Literal["packed", "pairs"] = "packed"  # pairs: NSP sentence pairs instead of packed rows
    random: bool = True  # build draws from its rng

    def batch_shapes(self, cfg: Config, batch_size: int) -> Shapes:
        return self.shapes(batch_size, cfg.data.seq_len, objective_options(cfg.data))

    def inputs(self, batch: dict) -> dict:
        """The part of a batch that goes into `model.apply(params, **inputs)`."""
        return {k: batch[k] for k in self.model_inputs if k in batch}

    def loss(self, output, batch: dict, *, label_smoothing: float = 0.0, z_loss: float = 0.0):
        """(JAX) the total loss and metrics from a ModelOutput and a batch: the sum of the objective's
        losses (each a weighted mean); metrics hold each loss, its accuracy and its weight sum
        ('<name>_loss', '<name>_accuracy', '<name>_weight')."""
        total: jax.Array | float = 0.0
        metrics: dict[str, jax.Array | float] = {}
        for loss_name, (source, target_key, weight_key) in self.losses.items():
            logits = output.logits if source == "logits" else output.heads[source.split("/", 1)[1]]
            targets, weights = batch[target_key], batch.get(weight_key)
            if loss_name == "mlm" and "mlm_positions" in batch:  # logits only at the masked positions
                gather = lambda a: jnp.take_along_axis(a, batch["mlm_positions"], axis=1, mode="fill", fill_value=0)
                targets, weights = gather(targets), gather(weights)
            value, aux = losses.cross_entropy(logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)
            total = total + value
            metrics.update(
                {
                    f"{loss_name}_loss": value,
                    f"{loss_name}_accuracy": aux["accuracy"],
                    f"{loss_name}_weight": aux["weight_sum"],
                }
            )
        metrics["loss"] = total
        return total, metrics

    def loss_fn(self, cfg: Config) -> LossFn:
        t = cfg.train

        def loss_fn(model, params, batch, dropout_rng):
            output = model.apply(params, **self.inputs(batch), dropout_rng=dropout_rng)
            return self.loss(output, batch, label_smoothing=t.label_smoothing, z_loss=t.z_loss)

        return loss_fn

    def make_task(self, cfg: Config, workdir: str) -> tuple[Config, Task]:
        return make_task(self, cfg, workdir)


# ----------------------------------------------------------------------------- the corpus and the task
def load_corpus(cfg: Config):
    d = cfg.data
    limit = d.max_documents or None
    if d.source == "prepared":
        raise ConfigError("data.source: prepared data (train.prepare's shards) is read by train.pretrain only")
    if d.source == "embedded":
        return corpus_lib.get_corpus("embedded", max_documents=limit)
    if d.source == "files":
        return corpus_lib.get_corpus(",".join(d.paths), text_feature=d.text_feature, max_documents=limit)
    return corpus_lib.tfds_corpus(
        d.tfds_name, data_dir=d.data_dir or None, split=d.split, text_feature=d.text_feature, max_documents=limit
    )


def num_eval_documents(cfg: Config, num_documents: int) -> int:
    """How many documents pretraining holds out for eval (`train_eval_split` with seed train.seed)."""
    return min(cfg.data.eval_documents, max(1, num_documents // 10))


def make_task(objective: TextObjective, cfg: Config, workdir: str) -> tuple[Config, Task]:
    """The Task of a text objective: the corpus (or train.prepare's shards), the run's tokenizer,
    this process's share of the train batches and every process's rows of the eval batches."""
    cfg = objective.with_heads(cfg)
    mesh = sh.make_mesh(cfg.mesh) if cfg.train.init_from else None  # where the checkpoint's weights go
    source = continued_source(cfg, mesh)
    train_tokens = eval_tokens = None
    if cfg.data.source == "prepared" and source:
        raise ConfigError(
            "data.source: prepared shards carry their own tokenizer; continued pretraining "
            "(train.init_from) reads embedded, files or tfds text with the checkpoint's tokenizer"
        )
    if cfg.data.source == "prepared":  # pre-tokenised shards: no tokenizer runs on the hot path
        data = prepared.open_prepared(cfg.data.path)
        tokenizer = data.run_tokenizer(
            workdir,
            tokenizer_path=cfg.data.tokenizer,
            vocab_size=cfg.model.vocab_size,
            process_index=jax.process_index(),
        )
        train_docs = eval_docs = None
        train_tokens, eval_tokens = data.train, data.eval
    else:
        documents = load_corpus(cfg)
        train_docs, eval_docs = corpus_lib.train_eval_split(
            documents, num_eval=num_eval_documents(cfg, len(documents)), seed=cfg.train.seed
        )
        tokenizer = tokenizer_for(cfg, workdir, train_docs) if source is None else source_tokenizer(source)
    if source is not None:
        keep_tokenizer(tokenizer, workdir, source)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"train.init_from: the tokenizer of {source.directory} has {tokenizer.vocab_size} "
                f"tokens, more than the model's vocab_size {cfg.model.vocab_size}"
            )
    t, processes = cfg.train, jax.process_count()
    common = dict(
        objective=objective, seq_len=cfg.data.seq_len, batch_size=split_batch(cfg), **objective_options(cfg.data)
    )
    train_data = make_dataset(
        train_docs,
        tokenizer,
        seed=t.seed,
        process_index=jax.process_index(),
        process_count=processes,
        shuffle_window=cfg.data.shuffle_window,
        encoded=train_tokens,
        **common,
    )
    train_data = in_workers(train_data, cfg.data.workers)  # the whole pipeline in worker processes
    # every process reads the whole eval set in global batches and keeps its rows of each
    eval_data = make_eval_dataset(
        eval_docs,
        tokenizer,
        seed=t.seed,
        process_index=0,
        process_count=1,
        encoded=eval_tokens,
        **{**common, "batch_size": t.batch_size},
    )
    model, abstract = abstract_build(cfg)
    params = None
    if source is not None and not resuming(workdir):  # a resumed run restores its own checkpoint
        params, report = initial_params(cfg, model, abstract, source, mesh)
        if jax.process_index() == 0:
            print(report.line(), flush=True)
    task = Task(
        model=model,
        init_params=lambda rng: build(cfg, rng)[1],
        loss_fn=objective.loss_fn(cfg),
        train_batches=ResumableIterator(train_data),
        eval_batches=lambda: process_rows(eval_data, jax.process_index(), processes),
        best_metric="loss",
        initial_params=params,
    )
    return cfg, task


def continued_source(cfg: Config, mesh):
    """train.init_from's Source (its weights on `mesh`, architecture checked against cfg.model), or None."""
    if not cfg.train.init_from:
        return None
    source = open_source(cfg.train.init_from, mesh)
    check_architecture(cfg.model, source)
    return source
