"""The finetuning objective: a pretrained model (ours or Hugging Face's, finetune.init_from) with the
task's head, trained on a labelled task (finetune.task) through the shared train loop.

    prepared = make_task(cfg, workdir, mesh)        # Prepared: the run's cfg, its Task, the report...
    cfg, task = labeled.get("finetune").make_task(cfg, workdir)

The model is the checkpoint's architecture with the task's head (and num_labels) and the finetuning
config's runtime settings (finetune.model_keys) on top; strategies (finetune.strategy): full,
partial, frozen (heads only) and lora. Evaluation is in labeled.finetune_eval, the distillation
teacher in labeled.distill. train.finetune is the program (and exports the best weights).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax

from transformer_jax import config as config_lib
from transformer_jax import finetune as ft
from transformer_jax import sharding as sh
from transformer_jax.config import Config, ConfigError
from transformer_jax.data import labeled
from transformer_jax.models import Model, abstract_build, build, count_params, published_params
from transformer_jax.tasks.base import Objective, Task, tokenizer_for
from transformer_jax.tasks.distill import KIND_HEAD, TeacherBatches, load_teacher
from transformer_jax.tasks.finetune_eval import make_evaluate
from transformer_jax.tasks.init_from import (
    RUNTIME_MODEL_KEYS,
    Source,
    initial_params,
    keep_tokenizer,
    open_source,
    resuming,
    source_tokenizer,
)

FAMILY_OBJECTIVE = {"encoder": "mlm", "decoder": "clm", "encoder_decoder": "span_corruption"}


# ----------------------------------------------------------------------------- task data
def load_task_data(cfg: Config) -> labeled.TaskData:
    """The task's train and eval examples. Held-out splits are fixed (seed 0): train.seed varies
    the training only, so runs with other seeds are scored on the same examples."""
    f = cfg.finetune
    if f.task == "embedded":
        data = labeled.embedded_task(f.embedded_classes)
        data = labeled.TaskData(
            data.spec,
            labeled._limit(data.train, f.max_train_examples),
            labeled._limit(data.eval, f.max_eval_examples),
            data.unlabeled,
        )
    elif f.task.startswith("glue/"):
        data = labeled.glue_task(
            f.task[5:],
            data_dir=os.path.expanduser(f.data_dir),
            max_train=f.max_train_examples,
            max_eval=f.max_eval_examples,
        )
    elif f.task == "squad":
        data = labeled.squad_task(
            data_dir=os.path.expanduser(f.data_dir),
            train_paths=f.train_paths,
            eval_paths=f.eval_paths,
            max_train=f.max_train_examples,
            max_eval=f.max_eval_examples,
        )
    else:
        data = labeled.local_task(
            f.train_paths,
            f.eval_paths,
            text_column=f.text_column,
            text_pair_column=f.text_pair_column,
            label_column=f.label_column,
            labels=f.labels,
            head=f.head,
            eval_fraction=f.eval_fraction,
            max_train=f.max_train_examples,
            max_eval=f.max_eval_examples,
        )
    if not data.train or not data.eval:
        raise ValueError(
            f"finetune.task: {f.task} has {len(data.train)} training and {len(data.eval)} eval examples; "
            "both must be non-empty"
        )
    return with_transfer_set(data, f.transfer_examples, f.task)


def with_transfer_set(data: labeled.TaskData, n: int, task: str) -> labeled.TaskData:
    """The train set plus the first n examples of the task's unlabelled pool (distillation's transfer
    set), each marked `labeled` (1 or 0: the hard loss skips the 0s, the teacher's soft labels do not)."""
    if not n:
        return data
    if len(data.unlabeled) < n:
        raise ConfigError(
            f"finetune.transfer_examples: {n} asked for; task {task} has {len(data.unlabeled)} unlabelled examples"
        )
    train = [{**ex, "labeled": 1} for ex in data.train] + [{**ex, "labeled": 0} for ex in data.unlabeled[:n]]
    return labeled.TaskData(data.spec, train, data.eval, data.unlabeled)


def resolve_head(data: labeled.TaskData, head: str, family: str) -> labeled.TaskData:
    """The task in the form the model family can train: text-to-text for encoder-decoders."""
    if head == "text_to_text" or (head == "auto" and family == "encoder_decoder"):
        if family != "encoder_decoder":
            raise ConfigError(f"finetune.head: text_to_text needs an encoder_decoder model (T5), got {family}")
        return labeled.as_text_to_text(data)
    if family != "encoder":
        raise ConfigError(
            f"finetune.head: a {data.spec.kind} head needs an encoder model (BERT), got {family}"
            + (" (use head text_to_text)" if family == "encoder_decoder" else "")
        )
    if head not in ("auto", data.spec.kind):
        raise ConfigError(f"finetune.head: {head} does not fit task {data.spec.name}, which is {data.spec.kind}")
    return data


# ----------------------------------------------------------------------------- config and weights
def _runtime_overrides(cfg: Config) -> dict:
    """The model settings the finetuning config names (finetune.model_keys), to apply on top of a
    pretrained architecture."""
    for key in cfg.finetune.model_keys:
        if key not in RUNTIME_MODEL_KEYS:
            raise ConfigError(f"finetune.model_keys: {key} is not one of {', '.join(RUNTIME_MODEL_KEYS)}")
    return {k: getattr(cfg.model, k) for k in cfg.finetune.model_keys}


def finetune_config(cfg: Config, source: Source, spec: labeled.TaskSpec) -> Config:
    """The run's config: the source's architecture with the task's head (and num_labels), the
    finetuning config's runtime model settings (dropout, dtype, remat) it names (finetune.model_keys) on top."""
    base = source.model_cfg
    assert base is not None, "the source's architecture (a run from scratch: the config's model)"
    if source.kind != "scratch":
        base = dataclasses.replace(base, **_runtime_overrides(cfg))
    f = cfg.finetune
    if f.num_labels and spec.kind in ("classification", "token_classification") and f.num_labels != spec.num_labels:
        raise ConfigError(
            f"finetune.num_labels: {f.num_labels}, but task {spec.name} has {spec.num_labels} labels "
            f"({', '.join(spec.label_names)})"
        )
    heads = (KIND_HEAD[spec.kind],) if spec.kind in KIND_HEAD else ()
    num_labels = spec.num_labels if spec.kind in ("classification", "token_classification") else base.num_labels
    model = dataclasses.replace(base, heads=heads, num_labels=num_labels)
    return config_lib.replace(
        cfg,
        model=model,
        train=dict(objective=FAMILY_OBJECTIVE[model.family]),
        finetune=dict(init_from=source.directory),
    )


def load_tokenizer(cfg: Config, source: Source, workdir: str, data: labeled.TaskData):
    """data.tokenizer; else the source's (its tokenizer.model, the tokenizer its config named, or a
    Hugging Face dir's files); else (from scratch) one trained on the task's texts. A SentencePiece
    model is copied to <workdir>/tokenizer.model, so the run can be --init_from / distill_from."""
    tokenizer = _load_tokenizer(cfg, source, workdir, data)
    keep_tokenizer(tokenizer, workdir)
    return tokenizer


def _load_tokenizer(cfg: Config, source: Source, workdir: str, data: labeled.TaskData):
    from transformer_jax.data.tokenizer import Tokenizer

    if cfg.data.tokenizer:
        return Tokenizer(cfg.data.tokenizer)
    if source.kind != "scratch":
        return source_tokenizer(source)
    return tokenizer_for(
        cfg,
        workdir,
        lambda: [
            str(ex.get("text") or ex.get("input") or ex.get("context") or " ".join(ex.get("words", [])))
            for ex in data.train
        ],
    )


def contrastive_views(f: config_lib.FinetuneConfig, augmenting: bool) -> int:
    """Views of each training example: InfoNCE contrasts two; SupCon contrasts labels, so it takes a
    second view only where augmentation makes one differ; 1 without a contrastive loss."""
    if not f.contrastive_weight:
        return 1
    return 2 if f.contrastive_loss == "infonce" or augmenting else 1


def head_keys(spec: labeled.TaskSpec) -> tuple[str, ...]:
    return (ft.HEAD_KEYS[KIND_HEAD[spec.kind]],) if spec.kind in KIND_HEAD else ("lm_head",)


# ----------------------------------------------------------------------------- the task
@dataclasses.dataclass
class Prepared:
    cfg: Config
    task: Task
    spec: labeled.TaskSpec
    model: Model
    report: ft.LoadReport | None
    trainable_params: int
    total_params: int
    loss_cfg: ft.LossConfig
    vocab_padding_params: int = 0  # of total_params: the vocabulary padding (model.vocab_multiple)


def make_task(
    cfg: Config,
    workdir: str,
    mesh,
    *,
    scratch: bool = False,
    translator: Callable[[str], str] | None = None,
    log: Callable[[str], None] = print,
) -> Prepared:
    """Build the finetuning Task: data, model (pretrained weights restored unless `scratch`: then the
    same architecture and tokenizer with fresh weights), strategy, losses, evaluation."""
    f, t = cfg.finetune, cfg.train
    source = open_source(f.init_from, mesh, default_model=cfg.model)
    assert source.model_cfg is not None  # from scratch: default_model
    data = load_task_data(cfg)
    data = resolve_head(data, f.head, source.model_cfg.family)
    cfg = finetune_config(cfg, source, data.spec)
    spec = data.spec
    tokenizer = load_tokenizer(cfg, source, workdir, data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens"
        )
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size: {t.batch_size} does not split over {jax.process_count()} processes")
    augmentation = labeled.Augmentation(
        f.token_drop, f.token_replace, f.token_mask, f.sentence_shuffle, f.back_translate, translator
    )
    if f.back_translate and translator is None:
        raise ConfigError(
            "finetune.back_translate: needs a translator (pass translator= to make_task; the "
            "command line has no translation model yet)"
        )
    if spec.kind == "qa" and augmentation.active:
        log("note: augmentation is not applied to extractive QA (it would move the answer spans)")
    encoder = labeled.Encoder(
        spec, tokenizer, cfg.data.seq_len, cfg.model.family, f.target_len, f.doc_stride, augmentation
    )
    if f.contrastive_loss == "supcon" and spec.kind != "classification":
        raise ConfigError(f"finetune.contrastive_loss: supcon needs a classification task; {spec.name} is {spec.kind}")
    views = contrastive_views(f, augmentation.active)
    if views == 2 and spec.kind == "qa":
        raise ConfigError("finetune.contrastive_weight: not supported for extractive QA")

    model, abstract = abstract_build(cfg)
    if resuming(workdir):
        params, report = None, None
        log(f"resuming {workdir} from its latest checkpoint")
    else:
        params, report = initial_params(
            cfg, model, abstract, source, mesh, scratch=scratch, head_keys=head_keys(spec), reset_heads=f.reset_heads
        )
        if jax.process_index() == 0:
            log(report.summary())

    # what is trained
    keys = head_keys(spec)
    loaded = set(report.loaded) if report else set(ft.flatten(abstract))
    mask = ft.trainable_mask(
        abstract,
        "partial" if f.strategy == "partial" else f.strategy,
        patterns=f.trainable,
        top_layers=f.top_layers,
        head_keys=keys,
        scanned=cfg.model.scan_layers,
    )
    mask = ft.map_with_path(lambda p, keep: bool(keep) or p not in loaded, mask)  # new weights always train
    lr_scale = None
    if f.layer_decay < 1:
        lr_scale = ft.layer_lr_scales(
            abstract,
            f.layer_decay,
            num_layers=cfg.model.num_layers,
            num_decoder_layers=cfg.model.resolved_decoder_layers if cfg.model.family == "encoder_decoder" else 0,
            scanned=cfg.model.scan_layers,
        )
    loss_cfg = ft.LossConfig(
        spec.kind,
        t.label_smoothing,
        f.distill_weight if f.distill_from else 0.0,
        f.distill_temperature,
        f.contrastive_weight,
        f.contrastive_temperature,
        f.contrastive_loss,
    )
    task_model, task_abstract = model, abstract
    init_fn = lambda rng: build(cfg, rng)[1]
    if f.strategy == "lora":
        lora_abstract = jax.eval_shape(
            lambda: ft.lora_init(
                abstract, jax.random.key(0), targets=f.lora_targets, rank=f.lora_rank, logical_axes=model.logical_axes
            )
        )
        lora_axes = ft.lora_logical_axes(lora_abstract, model.logical_axes)
        task_model = dataclasses.replace(model, logical_axes={"model": model.logical_axes, "lora": lora_axes})
        loss_cfg = dataclasses.replace(loss_cfg, lora_alpha=f.lora_alpha, lora_rank=f.lora_rank)
        lora_key = jax.random.fold_in(jax.random.key(t.seed), 7)
        make_lora = lambda: ft.lora_init(
            abstract, lora_key, targets=f.lora_targets, rank=f.lora_rank, logical_axes=model.logical_axes
        )
        init_fn = lambda rng: {"model": build(cfg, rng)[1], "lora": make_lora()}
        if params is not None:
            lora_shardings = sh.tree_shardings(lora_axes, lora_abstract, mesh)
            params = {"model": params, "lora": jax.jit(make_lora, out_shardings=lora_shardings)()}
        mask = {"model": mask, "lora": jax.tree.map(lambda _: True, lora_abstract)}
        if lr_scale is not None:
            lr_scale = {
                "model": lr_scale,
                "lora": ft.layer_lr_scales(
                    lora_abstract,
                    f.layer_decay,
                    num_layers=cfg.model.num_layers,
                    num_decoder_layers=cfg.model.resolved_decoder_layers
                    if cfg.model.family == "encoder_decoder"
                    else 0,
                    scanned=cfg.model.scan_layers,
                ),
            }
        task_abstract = {"model": abstract, "lora": lora_abstract}
    trainable = ft.count(task_abstract, mask)
    if trainable == 0:
        raise ConfigError(f"finetune.strategy: {f.strategy} leaves no parameter to train")
    all_trainable = all(jax.tree.leaves(mask))

    # data
    processes = jax.process_count()
    train_data = labeled.train_dataset(
        encoder,
        data.train,
        batch_size=t.batch_size // processes,
        seed=t.seed,
        views=views,
        process_index=jax.process_index(),
        process_count=processes,
    )
    from transformer_jax.data.pipeline import ResumableIterator

    batches: Any = ResumableIterator(train_data)
    if f.distill_from:
        teacher_model, teacher_params = load_teacher(f.distill_from, spec, cfg.model)
        batches = TeacherBatches(batches, teacher_model, teacher_params, spec.kind)
        log(f"distilling from {f.distill_from} (weight {f.distill_weight}, temperature {f.distill_temperature})")
    eval_batch = (f.eval_batch_size or t.batch_size) // processes
    data_parallel = sh.batch_parallel(mesh)
    if (eval_batch * processes) % data_parallel:
        raise ConfigError(
            f"finetune.eval_batch_size: {eval_batch * processes} does not split over data*fsdp = "
            f"{data_parallel} devices"
        )
    evaluate = make_evaluate(
        model, data, encoder, loss_cfg, mesh, eval_batch, tokenizer, f.target_len, f.max_answer_length
    )
    metric = f.metric or spec.main_metric
    task = Task(
        model=task_model,
        init_params=init_fn,
        loss_fn=ft.make_loss_fn(model, loss_cfg),
        train_batches=batches,
        eval_batches=None,
        trainable=None if all_trainable else mask,
        evaluate=evaluate,
        best_metric=metric,
        best_mode="min" if metric == "loss" else "max",
        lr_scale=lr_scale,
        initial_params=params,
    )
    return Prepared(
        cfg,
        task,
        spec,
        model,
        report,
        trainable,
        ft.count(task_abstract),
        loss_cfg,
        count_params(abstract) - published_params(model, abstract),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneObjective(Objective):
    """Finetuning on finetune.task from finetune.init_from. The task and the checkpoint decide the
    heads, num_labels and architecture, so `heads` is empty and there is no standalone loss."""

    def make_task(self, cfg: Config, workdir: str) -> tuple[Config, Task]:
        prepared = make_task(cfg, workdir, sh.make_mesh(cfg.mesh))
        return prepared.cfg, prepared.task


OBJECTIVE = FinetuneObjective(name="finetune", family=None)
