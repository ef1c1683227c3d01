"""Pretraining: masked LM (+ next-sentence prediction), causal LM or span corruption.

    python -m train.pretrain                                   # small GPT on the embedded corpus
    python -m train.pretrain --config configs/bert_tiny.yaml   # MLM + NSP
    python -m train.pretrain --config configs/t5_tiny.yaml --set train.steps=100 --workdir runs/t5
"""
from __future__ import annotations

import os

import jax

from train import cli, trainer
from transformer_jax import config as config_lib
from transformer_jax import objectives
from transformer_jax.config import Config, ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import pipeline, prepared
from transformer_jax.data.tokenizer import load_or_train_tokenizer
from transformer_jax.models import abstract_build, build

OBJECTIVE_HEADS = {"mlm": ("mlm",), "mlm_nsp": ("mlm", "nsp")}


def load_corpus(cfg: Config):
    d = cfg.data
    limit = d.max_documents or None
    if d.source == "prepared":
        raise ConfigError("data.source: prepared data (train.prepare's shards) is read by train.pretrain only")
    if d.source == "embedded":
        return corpus_lib.get_corpus("embedded", max_documents=limit)
    if d.source == "files":
        return corpus_lib.get_corpus(",".join(d.paths), text_feature=d.text_feature, max_documents=limit)
    return corpus_lib.tfds_corpus(d.tfds_name, data_dir=d.data_dir or None, split=d.split,
                                  text_feature=d.text_feature, max_documents=limit)


def num_eval_documents(cfg: Config, num_documents: int) -> int:
    """How many documents pretraining holds out for eval (`train_eval_split` with seed train.seed)."""
    return min(cfg.data.eval_documents, max(1, num_documents // 10))


def with_objective_heads(cfg: Config) -> Config:
    """The objective's heads are added to the model (bert_base.yaml describes BertModel alone)."""
    heads = tuple(dict.fromkeys(cfg.model.heads + OBJECTIVE_HEADS.get(cfg.train.objective, ())))
    pooler = cfg.model.pooler or "nsp" in heads
    return config_lib.replace(cfg, model=dict(heads=heads, pooler=pooler)) if heads != cfg.model.heads or pooler != cfg.model.pooler else cfg


def tokenizer_for(cfg: Config, workdir: str, documents, **train_kw):
    """The tokenizer of the run: data.tokenizer, the workdir's (resume), or one trained on
    `documents` (a sequence, or a function giving one) by process 0 and saved in the workdir."""
    if jax.process_index() == 0 or cfg.data.tokenizer:
        tokenizer = load_or_train_tokenizer(workdir, documents, cfg.model.vocab_size, path=cfg.data.tokenizer or None,
                                            **train_kw)
    if jax.process_count() > 1 and not cfg.data.tokenizer:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("tokenizer")
        tokenizer = load_or_train_tokenizer(workdir, None, path=os.path.join(workdir, "tokenizer.model"))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} pieces")
    return tokenizer


def objective_loss_fn(cfg: Config):
    t = cfg.train

    def loss_fn(model, params, batch, dropout_rng):
        output = model.apply(params, **objectives.model_inputs(t.objective, batch), dropout_rng=dropout_rng)
        return objectives.objective_loss(t.objective, output, batch, label_smoothing=t.label_smoothing, z_loss=t.z_loss)
    return loss_fn


def make_task(cfg: Config, workdir: str) -> tuple[Config, trainer.Task]:
    if cfg.train.objective in ("itm", "itc"):  # image-text pretraining: its own data and losses
        from train import pretrain_itm
        return pretrain_itm.make_task(cfg, workdir)
    cfg = with_objective_heads(cfg)
    train_tokens = eval_tokens = None
    if cfg.data.source == "prepared":  # pre-tokenised shards: no tokenizer runs on the hot path
        data = prepared.open_prepared(cfg.data.path)
        tokenizer = data.run_tokenizer(workdir, tokenizer_path=cfg.data.tokenizer, vocab_size=cfg.model.vocab_size,
                                       process_index=jax.process_index())
        train_docs = eval_docs = None
        train_tokens, eval_tokens = data.train, data.eval
    else:
        documents = load_corpus(cfg)
        train_docs, eval_docs = corpus_lib.train_eval_split(
            documents, num_eval=num_eval_documents(cfg, len(documents)), seed=cfg.train.seed)
        tokenizer = tokenizer_for(cfg, workdir, train_docs)
    t, processes = cfg.train, jax.process_count()
    if t.batch_size % processes:
        raise ConfigError(f"train.batch_size: {t.batch_size} does not split over {processes} processes")
    common = dict(objective=t.objective, seq_len=cfg.data.seq_len, batch_size=t.batch_size // processes,
                  **pipeline.objective_options(cfg.data))
    train_data = pipeline.make_dataset(train_docs, tokenizer, seed=t.seed, process_index=jax.process_index(),
                                       process_count=processes, shuffle_window=cfg.data.shuffle_window,
                                       encoded=train_tokens, **common)
    train_data = pipeline.in_workers(train_data, cfg.data.workers)  # the whole pipeline in worker processes
    # every process reads the whole eval set in global batches and keeps its rows of each
    eval_data = pipeline.make_eval_dataset(eval_docs, tokenizer, seed=t.seed, process_index=0, process_count=1,
                                           encoded=eval_tokens, **{**common, "batch_size": t.batch_size})
    model, _ = abstract_build(cfg)
    task = trainer.Task(
        model=model,
        init_params=lambda rng: build(cfg, rng)[1],
        loss_fn=objective_loss_fn(cfg),
        train_batches=pipeline.ResumableIterator(train_data),
        eval_batches=lambda: pipeline.process_rows(eval_data, jax.process_index(), processes),
        best_metric="loss")
    return cfg, task


def main() -> None:
    args = cli.parser(__doc__.splitlines()[0]).parse_args()
    cfg, workdir = cli.config_and_workdir(args)
    cli.init_distributed(cfg)
    cfg, task = make_task(cfg, workdir)
    metrics, _ = trainer.run(cfg, workdir, task)
    if jax.process_index() == 0:
        shown = {k: round(v, 4) for k, v in metrics.items() if k in ("step", "loss", "eval_loss", "eval_perplexity",
                                                                     "tokens_per_sec") or k.endswith("accuracy")}
        print(f"done: {shown}; workdir {workdir}")


if __name__ == "__main__":
    cli.main(main)
