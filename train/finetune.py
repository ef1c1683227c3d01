"""Finetuning from a pretrained checkpoint (ours or Hugging Face's) through the shared train loop.

    python -m train.finetune --init_from runs/bert_tiny                      # embedded default task
    python -m train.finetune --config configs/finetune_glue.yaml --init_from hf/bert-base-uncased \\
        --set finetune.task=glue/mrpc --set finetune.data_dir=~/tensorflow_datasets
    python -m train.finetune --config configs/finetune_lora.yaml --init_from runs/bert_tiny
    python -m train.finetune --compare-scratch                              # pretrain briefly, then both

--init_from takes our workdir (config.yaml + checkpoints/<step>/ from train.pretrain, or params/
from train.convert / an earlier finetune) or a Hugging Face directory (config.json). The model is
the checkpoint's architecture with the task's head; the run prints which parameters were loaded,
newly initialised, or left unused. Strategies (finetune.strategy): full, partial (finetune.trainable
regexes and/or finetune.top_layers), frozen (heads only) and lora. At the end the best checkpoint's
weights (LoRA merged into the kernels) are exported to <workdir>/params, which `--init_from` and
`finetune.distill_from` read.

Pretrained vs scratch (same architecture, tokenizer, data, seed and steps), on a CPU in ~3 minutes:
held-out accuracy (360 snippets, 6 packages, chance 0.167) 0.528 vs 0.447, seeds 1 and 2 (train.seed,
finetuning only) 0.511 vs 0.472 and 0.514 vs 0.428:

    python -m train.pretrain --config configs/bert_tiny.yaml --workdir /tmp/ftpreL --set train.steps=3000 \\
        --set model.vocab_size=512 --set data.seq_len=64 --set model.max_len=64 --set train.eval_every=0 \\
        --set train.checkpoint_every=3000
    python -m train.finetune --compare-scratch --init_from /tmp/ftpreL --workdir /tmp/ftb --set data.seq_len=64 \\
        --set train.steps=300 --set train.learning_rate=1e-3 --set train.eval_every=100 --set train.batch_size=16

(without --init_from, --compare-scratch pretrains first: --pretrain-config, --pretrain-set key=value).
Plain `--compare-scratch` (bert_tiny's 1000 steps, then 400 steps at length 128 on all 2,400 train
snippets) shows no gain: 0.764 vs 0.794, both memorising the train set; 1000 steps of pretraining
are too few to help there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from train import cli, pretrain, trainer
from transformer_jax import checkpoint as ckpt
from transformer_jax import config as config_lib
from transformer_jax import finetune as ft
from transformer_jax import metrics as metrics_lib
from transformer_jax import sharding as sh
from transformer_jax.config import Config, ConfigError, ModelConfig
from transformer_jax.data import tasks
from transformer_jax.models import Model, abstract_build, build, count_params, published_params

DEFAULT_CONFIG = os.path.join(cli.REPO, "configs", "finetune_embedded.yaml")
FAMILY_OBJECTIVE = {"encoder": "mlm", "decoder": "clm", "encoder_decoder": "span_corruption"}
KIND_HEAD = {"classification": "classification", "regression": "regression",
             "token_classification": "token_classification", "qa": "qa"}
# model settings of the finetuning config that apply on top of a pretrained architecture
RUNTIME_MODEL_KEYS = ("dropout_rate", "attention_dropout_rate", "dtype", "remat", "attention_impl",
                      "classifier_pooling")
HOST_ONLY_KEYS = ("token_to_chars",)


# ----------------------------------------------------------------------------- task data
def load_task_data(cfg: Config) -> tasks.TaskData:
    """The task's train and eval examples. Held-out splits are fixed (seed 0): train.seed varies
    the training only, so runs with other seeds are scored on the same examples."""
    f = cfg.finetune
    if f.task == "embedded":
        data = tasks.embedded_task(f.embedded_classes)
        data = tasks.TaskData(data.spec, tasks._limit(data.train, f.max_train_examples),
                              tasks._limit(data.eval, f.max_eval_examples))
    elif f.task.startswith("glue/"):
        data = tasks.glue_task(f.task[5:], data_dir=os.path.expanduser(f.data_dir), max_train=f.max_train_examples,
                               max_eval=f.max_eval_examples)
    elif f.task == "squad":
        data = tasks.squad_task(data_dir=os.path.expanduser(f.data_dir), train_paths=f.train_paths,
                                eval_paths=f.eval_paths, max_train=f.max_train_examples, max_eval=f.max_eval_examples)
    else:
        data = tasks.local_task(f.train_paths, f.eval_paths, text_column=f.text_column,
                                text_pair_column=f.text_pair_column, label_column=f.label_column, labels=f.labels,
                                head=f.head, eval_fraction=f.eval_fraction,
                                max_train=f.max_train_examples, max_eval=f.max_eval_examples)
    if not data.train or not data.eval:
        raise ValueError(f"finetune.task: {f.task} has {len(data.train)} training and {len(data.eval)} eval examples; "
                         "both must be non-empty")
    return data


def resolve_head(data: tasks.TaskData, head: str, family: str) -> tasks.TaskData:
    """The task in the form the model family can train: text-to-text for encoder-decoders."""
    if head == "text_to_text" or (head == "auto" and family == "encoder_decoder"):
        if family != "encoder_decoder":
            raise ConfigError(f"finetune.head: text_to_text needs an encoder_decoder model (T5), got {family}")
        return tasks.as_text_to_text(data)
    if family != "encoder":
        raise ConfigError(f"finetune.head: a {data.spec.kind} head needs an encoder model (BERT), got {family}"
                          + (" (use head text_to_text)" if family == "encoder_decoder" else ""))
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


@dataclasses.dataclass
class Source:
    """Where the pretrained model comes from: kind 'ours' | 'hf' | 'scratch'."""
    kind: str
    directory: str = ""
    weights: tuple[str, str, str | None] | None = None
    model_cfg: ModelConfig | None = None
    hf_params: Any = None
    tokenizer: str = ""           # ours: the pretraining run's data.tokenizer (when it named one)


def open_source(init_from: str, cfg: Config, mesh) -> Source:
    if not init_from:
        return Source("scratch", model_cfg=cfg.model)
    init_from = os.path.expanduser(init_from)
    where = ft.weights_source(init_from)
    if where[0] == "hf":
        from transformer_jax import hf
        model, params = hf.from_pretrained(init_from, mesh=mesh)
        return Source("hf", init_from, where, model.cfg, params)
    try:
        base = config_lib.load_config(os.path.join(init_from, "config.yaml"))
    except ConfigError as e:
        raise ValueError(f"--init_from: {init_from}/config.yaml: {e}") from None
    return Source("ours", init_from, where, base.model, tokenizer=base.data.tokenizer)


def finetune_config(cfg: Config, source: Source, spec: tasks.TaskSpec) -> Config:
    """The run's config: the source's architecture with the task's head (and num_labels), the
    finetuning config's runtime model settings (dropout, dtype, remat) it names (finetune.model_keys) on top."""
    base = source.model_cfg
    if source.kind != "scratch":
        base = dataclasses.replace(base, **_runtime_overrides(cfg))
    f = cfg.finetune
    if f.num_labels and spec.kind in ("classification", "token_classification") and f.num_labels != spec.num_labels:
        raise ConfigError(f"finetune.num_labels: {f.num_labels}, but task {spec.name} has {spec.num_labels} labels "
                          f"({', '.join(spec.label_names)})")
    heads = (KIND_HEAD[spec.kind],) if spec.kind in KIND_HEAD else ()
    num_labels = spec.num_labels if spec.kind in ("classification", "token_classification") else base.num_labels
    model = dataclasses.replace(base, heads=heads, num_labels=num_labels)
    return config_lib.replace(cfg, model=model, train=dict(objective=FAMILY_OBJECTIVE[model.family]),
                              finetune=dict(init_from=source.directory))


def load_tokenizer(cfg: Config, source: Source, workdir: str, data: tasks.TaskData):
    """data.tokenizer; else the source's (its tokenizer.model, the tokenizer its config named, or a
    Hugging Face dir's files); else (from scratch) one trained on the task's texts. A SentencePiece
    model is copied to <workdir>/tokenizer.model, so the run can be --init_from / distill_from."""
    tokenizer = _load_tokenizer(cfg, source, workdir, data)
    own = os.path.join(workdir, "tokenizer.model")
    path = getattr(tokenizer, "path", "")
    if (jax.process_index() == 0 and path.endswith(".model") and os.path.isfile(path)
            and os.path.abspath(path) != os.path.abspath(own)):
        import shutil
        os.makedirs(workdir, exist_ok=True)
        shutil.copyfile(path, own)
    return tokenizer


def _load_tokenizer(cfg: Config, source: Source, workdir: str, data: tasks.TaskData):
    from transformer_jax.data.tokenizer import Tokenizer

    if cfg.data.tokenizer:
        return Tokenizer(cfg.data.tokenizer)
    if source.kind != "scratch":
        own = os.path.join(source.directory, "tokenizer.model")
        if os.path.isfile(own):
            return Tokenizer(own)
        if source.tokenizer and os.path.isfile(source.tokenizer):
            return Tokenizer(source.tokenizer)
        from transformer_jax import hf
        try:
            return hf.load_tokenizer(source.directory)
        except ValueError:
            raise ValueError(f"--init_from: {source.directory} has no tokenizer (tokenizer.model or Hugging Face "
                             "tokenizer files); set data.tokenizer") from None
    return pretrain.tokenizer_for(cfg, workdir, lambda: [
        str(ex.get("text") or ex.get("input") or ex.get("context") or " ".join(ex.get("words", [])))
        for ex in data.train])


def head_keys(spec: tasks.TaskSpec) -> tuple[str, ...]:
    return (ft.HEAD_KEYS[KIND_HEAD[spec.kind]],) if spec.kind in KIND_HEAD else ("lm_head",)


def initial_params(cfg: Config, model: Model, abstract, source: Source, mesh, *, scratch: bool,
                   spec: tasks.TaskSpec) -> tuple[Any, ft.LoadReport]:
    """The pretrained weights placed on their shardings, new heads freshly initialised."""
    shardings = sh.tree_shardings(model.logical_axes, abstract, mesh)
    target = ft.flatten(ckpt.abstract_with_shardings(abstract, shardings))
    if scratch or source.kind == "scratch":
        report = ft.LoadReport("nothing (from scratch)", [], sorted(target), [])
        loaded = {}
    elif source.kind == "hf":
        hf_flat = ft.flatten(source.hf_params)
        report = ft.match_params({p: tuple(x.shape) for p, x in hf_flat.items()}, target, source=source.directory,
                                 reset_heads=cfg.finetune.reset_heads, head_keys=head_keys(spec))
        loaded = {p: jax.device_put(hf_flat[p].astype(target[p].dtype), target[p].sharding) for p in report.loaded}
    else:
        _, path, subtree = source.weights
        saved = ft.saved_shapes(path, subtree)
        if set(saved) and all(p.split("/")[0] in ("model", "lora") for p in saved):
            raise ValueError(f"--init_from: {path} holds LoRA training state; use the run's exported params/ instead")
        shown = os.path.relpath(path, source.directory)
        report = ft.match_params(saved, target, source=f"{source.directory} ({shown})",
                                 reset_heads=cfg.finetune.reset_heads, head_keys=head_keys(spec))
        loaded = ft.restore_subset(path, subtree, {p: target[p] for p in report.loaded})
    need = sorted(set(target) - set(report.loaded))
    fresh = {}
    if need:
        make = jax.jit(lambda key: {p: ft.flatten(build(cfg, key)[1])[p] for p in need},
                       out_shardings={p: target[p].sharding for p in need})
        fresh = make(jax.random.key(cfg.train.seed))
    return ft.assemble(abstract, loaded, fresh), report


# ----------------------------------------------------------------------------- evaluation
def _predict_fn(model: Model, kind: str, loss_cfg: ft.LossConfig, ids: tasks.SpecialIds, target_len: int):
    from transformer_jax import decoding

    def predict(params, batch):
        p = ft.effective_params(params, loss_cfg)
        output = model.apply(p, **ft.model_inputs(model.cfg.family, batch))
        out = ft.task_outputs(kind, output)
        loss, _ = ft.hard_loss(kind, out, batch)
        result = {"loss": loss, "count": jnp.sum(batch["example_weight"])}
        if kind == "classification":
            result["pred"] = jnp.argmax(out, axis=-1)
        elif kind == "regression":
            result["pred"] = out.astype(jnp.float32)
        elif kind == "token_classification":
            result["pred"] = jnp.argmax(out, axis=-1)
        elif kind == "qa":
            result.update(ft.qa_logits(out, batch["attention_mask"]))
        else:
            result["tokens"] = decoding.generate(model, p, batch["input_ids"], batch["attention_mask"],
                                                 max_new_tokens=target_len, eos_id=ids.eos, pad_id=ids.pad,
                                                 decoder_start_id=ids.pad)
        return result
    return predict


def _gather(tree, rows: int):
    """Host NumPy copies of a jitted function's outputs (all processes), the first `rows` rows."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        tree = multihost_utils.process_allgather(tree, tiled=True)
    tree = jax.device_get(tree)
    return {k: (np.asarray(v)[:rows] if np.ndim(v) else np.asarray(v)) for k, v in tree.items()}


def _decode(tokenizer, ids: tasks.SpecialIds, tokens) -> str:
    out = []
    for t in tokens:
        if int(t) == ids.eos:
            break
        if int(t) != ids.pad:
            out.append(int(t))
    return tokenizer.decode(out).strip()


def make_evaluate(model: Model, data: tasks.TaskData, encoder: tasks.Encoder, loss_cfg: ft.LossConfig, mesh,
                  batch_size: int, tokenizer, target_len: int, max_answer_length: int = 30) -> Callable[[Any], dict]:
    """evaluate(params) -> {'loss', official metrics...} over the whole eval set. Every process
    feeds the same batches (the first copy of the gathered outputs is used)."""
    spec = data.spec
    features, owners = tasks.eval_features(encoder, data.eval)
    predict = jax.jit(_predict_fn(model, spec.kind, loss_cfg, encoder.ids, target_len))

    def evaluate(params) -> dict:
        outputs = []
        for batch in tasks.batches(features, batch_size):
            device = sh.global_batch({k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}, mesh)
            outputs.append(_gather(predict(params, device), batch_size))
        counts = np.array([o["count"] for o in outputs])
        result = {"loss": float(np.sum([o["loss"] * c for o, c in zip(outputs, counts)]) / max(counts.sum(), 1))}
        cat = lambda key: np.concatenate([o[key] for o in outputs])[: len(features)]
        kind = spec.kind
        if kind in ("classification", "regression"):
            labels = np.array([ex["label"] for ex in data.eval])
            result.update(metrics_lib.compute(spec.metrics, cat("pred"), labels))
        elif kind == "token_classification":
            keep = np.stack([f["label_weights"] for f in features]) > 0
            gold = np.stack([f["labels"] for f in features])
            result.update(metrics_lib.compute(spec.metrics, cat("pred")[keep], gold[keep]))
        elif kind == "qa":
            result.update(_squad_metrics(data.eval, features, owners, cat("start"), cat("end"),
                                         max_answer_length=max_answer_length))
        else:
            texts = [_decode(tokenizer, encoder.ids, row) for row in cat("tokens")]
            targets = [ex["target"] for ex in data.eval]
            result["exact_match"] = float(np.mean([p == t.strip() for p, t in zip(texts, targets)]))
            source = tasks.source_kind(spec)
            if source == "classification":
                index = {n: i for i, n in enumerate(spec.label_names)}
                preds = np.array([index.get(t, -1) for t in texts])
                labels = np.array([ex["label"] for ex in data.eval])
                result.update(metrics_lib.compute([m for m in spec.metrics if m != "exact_match"], preds, labels))
            elif source == "regression":
                def number(text):
                    try:
                        return float(text)
                    except ValueError:
                        return 0.0
                preds = np.array([number(t) for t in texts])
                labels = np.array([ex["label"] for ex in data.eval])
                result.update(metrics_lib.compute([m for m in spec.metrics if m != "exact_match"], preds, labels))
        return result
    return evaluate


def _squad_metrics(examples, features, owners, start, end, *, max_answer_length: int) -> dict:
    best: dict[int, tuple[float, str]] = {}
    for f, owner, s, e in zip(features, owners, start, end):
        chars = f["token_to_chars"]
        span = metrics_lib.best_span(s, e, chars[:, 0] >= 0, max_answer_length=max_answer_length)
        if span is None:
            continue
        a, b, score = span
        if owner not in best or score > best[owner][0]:
            context = examples[owner]["context"]
            best[owner] = (score, context[chars[a, 0]: chars[b, 1]])
    predictions = {examples[i]["id"]: text for i, (_, text) in best.items()}
    references = {ex["id"]: ex["answers"] for ex in examples}
    return metrics_lib.squad(predictions, references)


# ----------------------------------------------------------------------------- teacher
class TeacherBatches:
    """Adds the teacher's head outputs to each training batch (batch['teacher'], or
    teacher_start / teacher_end for QA); the position is the wrapped iterator's."""

    def __init__(self, inner, teacher_model: Model, teacher_params, kind: str):
        self.inner, self.kind = inner, kind
        self.params = teacher_params
        family = teacher_model.cfg.family
        self.forward = jax.jit(lambda p, b: ft.task_outputs(kind, teacher_model.apply(p, **ft.model_inputs(family, b))))

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        out = jax.device_get(self.forward(self.params, {k: v for k, v in batch.items() if not k.endswith("_2")}))
        if self.kind == "qa":
            batch["teacher_start"], batch["teacher_end"] = np.asarray(out["start"]), np.asarray(out["end"])
        else:
            batch["teacher"] = np.asarray(out)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def load_teacher(directory: str, spec: tasks.TaskSpec, student: ModelConfig) -> tuple[Model, Any]:
    """A finetuned model of ours (its exported params/ or latest checkpoint) with the task's head."""
    directory = os.path.expanduser(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"finetune.distill_from: {directory} does not exist")
    kind, path, subtree = ft.weights_source(directory)
    if kind == "hf":
        raise ValueError(f"finetune.distill_from: {directory} is a Hugging Face dir; finetune it first "
                         "(the teacher needs the task's head)")
    tcfg = config_lib.load_config(os.path.join(directory, "config.yaml"))
    model, abstract = abstract_build(tcfg.model)
    flat = ft.flatten(abstract)
    want = KIND_HEAD.get(spec.kind)
    if want and want not in tcfg.model.heads:
        raise ValueError(f"finetune.distill_from: {directory} has no {want} head (its heads: "
                         f"{', '.join(tcfg.model.heads) or 'none'})")
    if spec.kind in ("classification", "token_classification") and tcfg.model.num_labels != spec.num_labels:
        raise ValueError(f"finetune.distill_from: the teacher has {tcfg.model.num_labels} labels, the task "
                         f"{spec.num_labels}")
    if spec.kind == "text_to_text" and tcfg.model.vocab_size != student.vocab_size:
        raise ValueError(f"finetune.distill_from: the teacher's vocab_size {tcfg.model.vocab_size} differs from the "
                         f"student's {student.vocab_size}")
    saved = ft.saved_shapes(path, subtree)
    ft.match_params(saved, flat, source=directory)  # raises on a mismatch
    missing = sorted(set(flat) - set(saved))
    if missing:
        raise ValueError(f"finetune.distill_from: {directory} lacks {missing[0]}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    loaded = ft.restore_subset(path, subtree, {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
                                                for p, x in flat.items()})
    return model, ft.assemble(abstract, loaded, {})


# ----------------------------------------------------------------------------- the task
@dataclasses.dataclass
class Prepared:
    cfg: Config
    task: trainer.Task
    spec: tasks.TaskSpec
    model: Model
    report: ft.LoadReport | None
    trainable_params: int
    total_params: int
    loss_cfg: ft.LossConfig
    vocab_padding_params: int = 0  # of total_params: the vocabulary padding (model.vocab_multiple)


def make_task(cfg: Config, workdir: str, mesh, *, scratch: bool = False, translator: Callable[[str], str] | None = None,
              log: Callable[[str], None] = print) -> Prepared:
    """Build the finetuning Task: data, model (pretrained weights restored unless `scratch`: then the
    same architecture and tokenizer with fresh weights), strategy, losses, evaluation."""
    f, t = cfg.finetune, cfg.train
    source = open_source(f.init_from, cfg, mesh)
    data = load_task_data(cfg)
    data = resolve_head(data, f.head, source.model_cfg.family)
    cfg = finetune_config(cfg, source, data.spec)
    spec = data.spec
    tokenizer = load_tokenizer(cfg, source, workdir, data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size: {t.batch_size} does not split over {jax.process_count()} processes")
    augmentation = tasks.Augmentation(f.token_drop, f.token_replace, f.token_mask, f.sentence_shuffle,
                                      f.back_translate, translator)
    if f.back_translate and translator is None:
        raise ConfigError("finetune.back_translate: needs a translator (pass translator= to make_task; the "
                          "command line has no translation model yet)")
    if spec.kind == "qa" and augmentation.active:
        log("note: augmentation is not applied to extractive QA (it would move the answer spans)")
    encoder = tasks.Encoder(spec, tokenizer, cfg.data.seq_len, cfg.model.family, f.target_len, f.doc_stride,
                            augmentation)
    views = 2 if f.contrastive_weight else 1
    if views == 2 and spec.kind == "qa":
        raise ConfigError("finetune.contrastive_weight: not supported for extractive QA")

    model, abstract = abstract_build(cfg)
    resuming = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        d.isdigit() for d in os.listdir(os.path.join(workdir, "checkpoints")))
    if resuming:
        params, report = None, None
        log(f"resuming {workdir} from its latest checkpoint")
    else:
        params, report = initial_params(cfg, model, abstract, source, mesh, scratch=scratch, spec=spec)
        if jax.process_index() == 0:
            log(report.summary())

    # what is trained
    keys = head_keys(spec)
    loaded = set(report.loaded) if report else set(ft.flatten(abstract))
    mask = ft.trainable_mask(abstract, "partial" if f.strategy == "partial" else f.strategy, patterns=f.trainable,
                             top_layers=f.top_layers, head_keys=keys, scanned=cfg.model.scan_layers)
    mask = ft.map_with_path(lambda p, keep: bool(keep) or p not in loaded, mask)  # new weights always train
    lr_scale = None
    if f.layer_decay < 1:
        lr_scale = ft.layer_lr_scales(abstract, f.layer_decay, num_layers=cfg.model.num_layers,
                                      num_decoder_layers=cfg.model.resolved_decoder_layers
                                      if cfg.model.family == "encoder_decoder" else 0, scanned=cfg.model.scan_layers)
    loss_cfg = ft.LossConfig(spec.kind, t.label_smoothing, f.distill_weight if f.distill_from else 0.0,
                             f.distill_temperature, f.contrastive_weight, f.contrastive_temperature)
    task_model, task_abstract = model, abstract
    init_fn = lambda rng: build(cfg, rng)[1]
    if f.strategy == "lora":
        lora_abstract = jax.eval_shape(lambda: ft.lora_init(abstract, jax.random.key(0), targets=f.lora_targets,
                                                            rank=f.lora_rank, logical_axes=model.logical_axes))
        lora_axes = ft.lora_logical_axes(lora_abstract, model.logical_axes)
        task_model = dataclasses.replace(model, logical_axes={"model": model.logical_axes, "lora": lora_axes})
        loss_cfg = dataclasses.replace(loss_cfg, lora_alpha=f.lora_alpha, lora_rank=f.lora_rank)
        lora_key = jax.random.fold_in(jax.random.key(t.seed), 7)
        make_lora = lambda: ft.lora_init(abstract, lora_key, targets=f.lora_targets, rank=f.lora_rank,
                                         logical_axes=model.logical_axes)
        init_fn = lambda rng: {"model": build(cfg, rng)[1], "lora": make_lora()}
        if params is not None:
            lora_shardings = sh.tree_shardings(lora_axes, lora_abstract, mesh)
            params = {"model": params, "lora": jax.jit(make_lora, out_shardings=lora_shardings)()}
        mask = {"model": mask, "lora": jax.tree.map(lambda _: True, lora_abstract)}
        if lr_scale is not None:
            lr_scale = {"model": lr_scale, "lora": ft.layer_lr_scales(
                lora_abstract, f.layer_decay, num_layers=cfg.model.num_layers,
                num_decoder_layers=cfg.model.resolved_decoder_layers if cfg.model.family == "encoder_decoder" else 0,
                scanned=cfg.model.scan_layers)}
        task_abstract = {"model": abstract, "lora": lora_abstract}
    trainable = ft.count(task_abstract, mask)
    if trainable == 0:
        raise ConfigError(f"finetune.strategy: {f.strategy} leaves no parameter to train")
    all_trainable = all(jax.tree.leaves(mask))

    # data
    processes = jax.process_count()
    train_data = tasks.train_dataset(encoder, data.train, batch_size=t.batch_size // processes, seed=t.seed,
                                     views=views, process_index=jax.process_index(), process_count=processes)
    from transformer_jax.data.pipeline import ResumableIterator
    batches: Any = ResumableIterator(train_data)
    if f.distill_from:
        teacher_model, teacher_params = load_teacher(f.distill_from, spec, cfg.model)
        batches = TeacherBatches(batches, teacher_model, teacher_params, spec.kind)
        log(f"distilling from {f.distill_from} (weight {f.distill_weight}, temperature {f.distill_temperature})")
    eval_batch = (f.eval_batch_size or t.batch_size) // processes
    data_parallel = sh.batch_parallel(mesh)
    if (eval_batch * processes) % data_parallel:
        raise ConfigError(f"finetune.eval_batch_size: {eval_batch * processes} does not split over data*fsdp = "
                          f"{data_parallel} devices")
    evaluate = make_evaluate(model, data, encoder, loss_cfg, mesh, eval_batch, tokenizer, f.target_len,
                             f.max_answer_length)
    metric = f.metric or spec.main_metric
    task = trainer.Task(model=task_model, init_params=init_fn, loss_fn=ft.make_loss_fn(model, loss_cfg),
                        train_batches=batches, eval_batches=None, trainable=None if all_trainable else mask,
                        evaluate=evaluate, best_metric=metric, best_mode="min" if metric == "loss" else "max",
                        lr_scale=lr_scale, initial_params=params)
    return Prepared(cfg, task, spec, model, report, trainable, ft.count(task_abstract), loss_cfg,
                    count_params(abstract) - published_params(model, abstract))


def export_best(prepared: Prepared, workdir: str, mesh) -> str | None:
    """Write the best (else the latest) checkpoint's weights, LoRA merged, to <workdir>/params."""
    directory = os.path.join(workdir, "checkpoints")
    checkpointer = ckpt.Checkpointer(directory, best_metric=f"eval_{prepared.task.best_metric}",
                                     best_mode=prepared.task.best_mode)
    key, mode = f"eval_{prepared.task.best_metric}", prepared.task.best_mode
    try:
        steps = set(checkpointer.all_steps())
        latest = checkpointer.latest_step()
    finally:
        checkpointer.close()
    # the eval figures of the kept checkpoints, from metrics.jsonl (a resumed run re-logs: keep the last)
    evals: dict[int, float] = {}
    log_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(log_path):
        with open(log_path) as f:
            for line in f:
                record = json.loads(line)
                if record.get("step") in steps and key in record and np.isfinite(record[key]):
                    evals[record["step"]] = record[key]
    scored = [((v if mode == "max" else -v), -s, s) for s, v in evals.items()]   # ties: the earlier step
    step = max(scored)[2] if scored else latest
    if step is None:
        return None
    abstract = jax.eval_shape(prepared.task.init_params, jax.random.key(0))
    shardings = sh.tree_shardings(prepared.task.model.logical_axes, abstract, mesh)
    flat = ft.flatten(ckpt.abstract_with_shardings(abstract, shardings))
    loaded = ft.restore_subset(os.path.join(directory, str(step), "state"), "params", flat)
    params = ft.assemble(abstract, loaded, {})
    if prepared.loss_cfg.lora_alpha:
        merge = jax.jit(lambda p: ft.lora_merge(p["model"], p["lora"], alpha=prepared.loss_cfg.lora_alpha,
                                                rank=prepared.loss_cfg.lora_rank))
        params = merge(params)
    out = os.path.join(workdir, "params")
    ckpt.save_params(out, params)
    return f"{out} (step {step})"


def finetune(cfg: Config, workdir: str, *, mesh=None, scratch: bool = False, quiet: bool = False,
             translator: Callable[[str], str] | None = None, export: bool = True) -> dict:
    """Finetune as cfg says; returns a summary: final and best eval metrics, parameter counts,
    optimizer-state bytes, runtime."""
    start = time.perf_counter()
    mesh = mesh or sh.make_mesh(cfg.mesh)
    log = (lambda s: None) if quiet else print
    prepared = make_task(cfg, workdir, mesh, scratch=scratch, translator=translator, log=log)
    if not quiet:
        print(f"task {prepared.spec.name} ({prepared.spec.kind}, {prepared.spec.num_labels or ''} labels "
              f"{', '.join(prepared.spec.label_names[:8])}); strategy {prepared.cfg.finetune.strategy}: training "
              f"{prepared.trainable_params:,} of {prepared.total_params:,} parameters"
              + (f" ({prepared.total_params - prepared.vocab_padding_params:,} without the vocabulary padding)"
                 if prepared.vocab_padding_params else ""))
    metrics, state = trainer.run(prepared.cfg, workdir, prepared.task, mesh=mesh, quiet=quiet)
    metric = prepared.task.best_metric
    summary = {"task": prepared.spec.name, "strategy": prepared.cfg.finetune.strategy,
               "init_from": "scratch" if scratch else (prepared.cfg.finetune.init_from or "scratch"),
               "step": metrics.get("step"), "metric": metric,
               f"eval_{metric}": metrics.get(f"eval_{metric}"),
               f"best_eval_{metric}": metrics.get(f"best_eval_{metric}"), "best_step": metrics.get("best_step"),
               "eval": {k[5:]: v for k, v in metrics.items() if k.startswith("eval_")},
               "trainable_params": prepared.trainable_params, "total_params": prepared.total_params,
               "optimizer_state_bytes": ft.nbytes(state["opt_state"])}
    if export:
        summary["exported"] = export_best(prepared, workdir, mesh)
    summary["runtime_s"] = round(time.perf_counter() - start, 1)
    return summary


# ----------------------------------------------------------------------------- pretrained vs scratch
def compare_scratch(cfg: Config, workdir: str, *, init_from: str = "", pretrain_config: str | None = None,
                    pretrain_overrides: tuple[str, ...] = (), mesh=None, quiet: bool = True) -> dict:
    """Finetune the same architecture, tokenizer, data, seed and steps twice: from the pretrained
    weights and from scratch. Without init_from, pretrains first (pretrain_config, default
    configs/bert_tiny.yaml, with pretrain_overrides) into <workdir>/pretrain."""
    from train import pretrain

    start = time.perf_counter()
    mesh = mesh or sh.make_mesh(cfg.mesh)
    result: dict = {}
    if not init_from:
        init_from = os.path.join(workdir, "pretrain")
        pcfg = config_lib.load_config(pretrain_config or os.path.join(cli.REPO, "configs", "bert_tiny.yaml"),
                                      list(pretrain_overrides))
        pcfg, ptask = pretrain.make_task(pcfg, init_from)
        t0 = time.perf_counter()
        pmetrics, _ = trainer.run(pcfg, init_from, ptask, mesh=mesh, quiet=quiet)
        result["pretrain"] = {"config": pcfg.name, "steps": pmetrics.get("step"),
                              "loss": pmetrics.get("loss"), "runtime_s": round(time.perf_counter() - t0, 1),
                              **{k: v for k, v in pmetrics.items() if k.startswith("eval_") and "accuracy" in k}}
    cfg = config_lib.replace(cfg, finetune=dict(init_from=init_from))
    for name, scratch in (("pretrained", False), ("scratch", True)):
        result[name] = finetune(cfg, os.path.join(workdir, name), mesh=mesh, scratch=scratch, quiet=quiet,
                                export=False)
    metric = result["pretrained"]["metric"]
    result["metric"] = metric
    result["steps"] = cfg.train.steps
    result["gain"] = {k: (result["pretrained"][k] or 0) - (result["scratch"][k] or 0)
                      for k in (f"eval_{metric}", f"best_eval_{metric}")}
    result["runtime_s"] = round(time.perf_counter() - start, 1)
    return result


# ----------------------------------------------------------------------------- main
def load_finetune_config(path: str | None, overrides=()) -> Config:
    """load_config, with train.objective (which only the pretraining programs use) defaulting to one
    that fits the config's model family, so a finetuning YAML need not name one, and the runtime
    model settings its model section or --set names in finetune.model_keys: they win over a
    pretrained model's own, even where they equal the defaults."""
    data = config_lib.read_yaml(path or DEFAULT_CONFIG)
    keys = [config_lib.parse_override(o)[0] for o in overrides]
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    family = next((config_lib.parse_override(o)[1] for o in overrides if o.split("=", 1)[0].strip() == "model.family"),
                  model.get("family", ModelConfig.family))
    train = data.setdefault("train", {}) if isinstance(data.get("train", {}), dict) else data.get("train")
    if isinstance(train, dict) and "objective" not in train and "train.objective" not in keys:
        train["objective"] = FAMILY_OBJECTIVE.get(family, "clm")
    cfg = config_lib.config_from_dict(data, overrides)
    named = set(model)
    for key, value in map(config_lib.parse_override, overrides):
        if key == "model" and isinstance(value, dict):
            named = set(value)
        elif key.startswith("model."):
            named.add(key[len("model."):])
    model_keys = (*cfg.finetune.model_keys, *(k for k in RUNTIME_MODEL_KEYS if k in named))
    return config_lib.replace(cfg, finetune=dict(model_keys=tuple(dict.fromkeys(model_keys))))


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--init_from", default=None, help="our workdir or a Hugging Face model directory")
    p.add_argument("--compare-scratch", action="store_true",
                   help="finetune from the pretrained weights and from scratch, same steps; print both as JSON "
                        "(without --init_from: pretrain first with --pretrain-config)")
    p.add_argument("--pretrain-config", default=None, help="--compare-scratch: the pretraining config "
                                                           "(default configs/bert_tiny.yaml)")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--compare-scratch: override a pretraining config value (repeatable)")
    args = p.parse_args()
    cfg = load_finetune_config(args.config, args.overrides)
    workdir = args.workdir or os.path.join("runs", cfg.name or "finetune")
    if args.init_from is not None:
        if not args.init_from:
            raise ValueError("--init_from: empty path")
        init_from = os.path.expanduser(args.init_from)
        if not os.path.isdir(init_from):
            raise ValueError(f"--init_from: {args.init_from} does not exist (or is not a directory)")
        cfg = config_lib.replace(cfg, finetune=dict(init_from=init_from))
    cli.init_distributed(cfg)
    if args.compare_scratch:
        result = compare_scratch(cfg, workdir, init_from=cfg.finetune.init_from, pretrain_config=args.pretrain_config,
                                 pretrain_overrides=tuple(args.pretrain_set))
        if jax.process_index() == 0:
            print(json.dumps(result, indent=1, default=float))
        return
    if not cfg.finetune.init_from and jax.process_index() == 0:
        print("note: no --init_from: training from scratch", file=sys.stderr)
    summary = finetune(cfg, workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary, default=float))


if __name__ == "__main__":
    cli.main(main)
