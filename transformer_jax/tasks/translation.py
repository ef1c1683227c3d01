"""Machine translation (`translate`): an encoder-decoder trained on packed parallel text with label
smoothing; at each eval it translates `translate.eval_examples` dev sentences with beam search (KV
cache) and logs detokenized BLEU and chrF (sacrebleu); the best checkpoint is kept by BLEU.

    prepared = prepare(cfg, workdir)          # Prepared: cfg, Task, tokenizer, train/dev pairs, translator
    cfg, task = OBJECTIVE.make_task(cfg, workdir)

The pairs come from data.source (transformer_jax.data.parallel): `embedded` (installed packages'
gettext catalogs, dev pairs held out by source string), `tfds` (data.tfds_name under data.data_dir)
or `files` (data.paths). Dev pairs held out from one pool leave out near duplicates of training
sources (parallel.split_by_source). The shared SentencePiece vocabulary is trained on both sides.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from transformer_jax import config as config_lib
from transformer_jax import losses
from transformer_jax.config import Config, ConfigError
from transformer_jax.data import parallel
from transformer_jax.data.pipeline import ResumableIterator, process_rows
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.models import Model, abstract_build, build
from transformer_jax.tasks import base
from transformer_jax.tasks.base import LossFn, Objective, Shapes, Task, split_batch
from transformer_jax.translation import Translator, evaluate_translation


def target_len(cfg: Config) -> int:
    return cfg.translate.target_len or cfg.data.seq_len


def max_decode_len(cfg: Config) -> int:
    return cfg.translate.max_decode_len or target_len(cfg)


def load_pairs(cfg: Config) -> tuple[parallel.Pairs, parallel.Pairs]:
    """(train pairs, dev pairs) as the config says. Dev pairs held out here (no data.eval_split) leave
    out sources within 3 character edits of a training source; `dev.split_info` has the counts."""
    d, tr = cfg.data, cfg.translate
    langs: dict[str, Any] = dict(source_lang=tr.source_lang, target_lang=tr.target_lang)
    if d.source == "embedded":
        pairs = parallel.gettext_pairs(**langs, packages=tr.packages or parallel.GETTEXT_PACKAGES)
        num_eval = min(tr.eval_examples or 64, max(1, len(pairs) // 10))
        train, dev = parallel.split_by_source(pairs, num_eval=num_eval, seed=cfg.train.seed)
    else:
        if d.source == "tfds":
            read = lambda split, limit=None: parallel.tfds_pairs(
                d.tfds_name, data_dir=d.data_dir or None, split=split, max_examples=limit, **langs
            )
        else:
            read = lambda split, limit=None: parallel.local_pairs(d.paths, split=split, **langs)
        train = read(d.split, d.max_documents or None)
        if d.eval_split:
            dev = read(d.eval_split)
        else:
            num_eval = min(tr.eval_examples or 64, max(1, len(train) // 10))
            train, dev = parallel.split_by_source(train, num_eval=num_eval, seed=cfg.train.seed)
    if d.max_documents and len(train) > d.max_documents:
        train = train.select(range(d.max_documents))
    return train, dev


def tokenizer_for(cfg: Config, workdir: str, train: parallel.Pairs) -> Tokenizer:
    """The shared vocabulary: data.tokenizer if set, the workdir's (a resumed run), or one trained
    on both sides of the training pairs by process 0 and saved as <workdir>/tokenizer.model."""
    return base.tokenizer_for(
        cfg, workdir, lambda: parallel.tokenizer_texts(train, seed=cfg.train.seed), num_sentinels=0, seed=cfg.train.seed
    )


@dataclasses.dataclass
class Prepared:
    cfg: Config
    task: Task
    tokenizer: Tokenizer
    train_pairs: parallel.Pairs
    dev_pairs: parallel.Pairs
    translator: Translator
    # how the dev pairs were held out: the near-duplicate rule and `dev_removed_near_duplicates`
    # (parallel.split_by_source); None for a separate eval split
    split_info: dict | None = None


def prepare(cfg: Config, workdir: str, pairs: tuple[parallel.Pairs, parallel.Pairs] | None = None) -> Prepared:
    """The translation Task for trainer.run, with its tokenizer, data and translator. `pairs`
    (train, dev) stands in for the config's data (load_pairs): a program that makes its own pairs,
    such as train.back_translation's synthetic ones."""
    if cfg.train.objective != "translate":
        cfg = config_lib.replace(cfg, train=dict(objective="translate"))
    m = cfg.model
    if m.position == "learned" and max(target_len(cfg), max_decode_len(cfg)) > m.max_len:
        raise ConfigError(
            f"translate.target_len: {max(target_len(cfg), max_decode_len(cfg))} exceeds "
            f"model.max_len={m.max_len} (learned positions)"
        )
    os.makedirs(workdir, exist_ok=True)
    train_pairs, dev_pairs = load_pairs(cfg) if pairs is None else pairs
    tokenizer = tokenizer_for(cfg, workdir, train_pairs)
    t, processes = cfg.train, jax.process_count()
    batch_size = split_batch(cfg)
    lengths: dict[str, Any] = dict(source_len=cfg.data.seq_len, target_len=target_len(cfg))
    train_data = parallel.make_dataset(
        train_pairs,
        tokenizer,
        batch_size=batch_size,
        seed=t.seed,
        process_index=jax.process_index(),
        process_count=processes,
        **lengths,
    )
    eval_data = parallel.make_eval_dataset(dev_pairs, tokenizer, batch_size=t.batch_size, seed=t.seed, **lengths)
    model, _ = abstract_build(cfg)
    tr = cfg.translate
    translator = Translator(
        model,
        None,
        tokenizer,
        source_len=cfg.data.seq_len,
        max_new_tokens=max_decode_len(cfg),
        beam_size=tr.beam_size,
        alpha=tr.alpha,
        batch_size=tr.eval_batch_size,
    )

    def evaluate(params) -> dict:  # params stay sharded: the decode runs on their mesh
        if not tr.eval_examples:
            return {}
        scores = evaluate_translation(translator, dev_pairs, params=params, max_examples=tr.eval_examples)
        out = {"bleu": scores["bleu"], "chrf": scores["chrf"]}
        if tr.eval_greedy:
            greedy = evaluate_translation(
                translator, dev_pairs, params=params, beam_size=1, max_examples=tr.eval_examples
            )
            out.update(greedy_bleu=greedy["bleu"], greedy_chrf=greedy["chrf"])
        return out

    task = Task(
        model=model,
        init_params=lambda rng: build(cfg, rng)[1],
        loss_fn=OBJECTIVE.loss_fn(cfg),
        train_batches=ResumableIterator(train_data),
        eval_batches=lambda: process_rows(eval_data, jax.process_index(), processes),
        evaluate=evaluate,
        best_metric="bleu" if tr.eval_examples else "loss",
        best_mode="max" if tr.eval_examples else "min",
    )
    return Prepared(cfg, task, tokenizer, train_pairs, dev_pairs, translator, dev_pairs.split_info)


def translator_for(
    run,
    *,
    beam_size: int | None = None,
    alpha: float | None = None,
    batch_size: int | None = None,
    max_len: int | None = None,
) -> Translator:
    """A Translator over a restored run (transformer_jax.runs.Run): its config's decoding settings
    unless given."""
    tr = run.cfg.translate
    return Translator(
        run.model,
        run.params,
        run.tokenizer,
        source_len=run.cfg.data.seq_len,
        max_new_tokens=max_len or max_decode_len(run.cfg),
        beam_size=tr.beam_size if beam_size is None else beam_size,
        alpha=tr.alpha if alpha is None else alpha,
        batch_size=batch_size or tr.eval_batch_size,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TranslationObjective(Objective):
    """Sequence-to-sequence cross-entropy on packed (source, target) pairs, with BLEU at eval."""

    def loss_fn(self, cfg: Config) -> LossFn:
        t = cfg.train

        def loss_fn(model: Model, params, batch, dropout_rng):
            out = model.apply(params, **{k: batch[k] for k in parallel.MODEL_INPUTS}, dropout_rng=dropout_rng)
            assert out.logits is not None  # an encoder-decoder returns its token logits
            loss, aux = losses.cross_entropy(
                out.logits, batch["targets"], batch["loss_mask"], label_smoothing=t.label_smoothing, z_loss=t.z_loss
            )
            # the per-token negative log-likelihood without smoothing: perplexity means what it says
            nll, _ = losses.cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
            return loss, {"accuracy": aux["accuracy"], "nll": nll, "tokens": aux["weight_sum"]}

        return loss_fn

    def make_task(self, cfg: Config, workdir: str) -> tuple[Config, Task]:
        prepared = prepare(cfg, workdir)
        return prepared.cfg, prepared.task

    def batch_shapes(self, cfg: Config, batch_size: int) -> Shapes:
        return parallel.batch_shapes(source_len=cfg.data.seq_len, target_len=target_len(cfg), batch_size=batch_size)


OBJECTIVE = TranslationObjective(name="translate", family="encoder_decoder")
