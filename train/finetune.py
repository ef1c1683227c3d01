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
`finetune.distill_from` read. The objective itself (task data, model, strategies, evaluation,
the distillation teacher) is transformer_jax.tasks.finetune.

Pretrained vs scratch (same architecture, tokenizer, data, seed and steps) with the default commands
(configs/bert_tiny.yaml, then configs/finetune_embedded.yaml): RESULTS.md, row pretrained_vs_scratch
(`python -m train.results --row pretrained_vs_scratch`), measured over 3 seeds. Without --init_from,
--compare-scratch pretrains first (--pretrain-config, --pretrain-set key=value).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from train import cli, trainer
from transformer_jax import checkpoint as ckpt
from transformer_jax import config as config_lib
from transformer_jax import config_parsing
from transformer_jax import finetune as ft
from transformer_jax import sharding as sh
from transformer_jax.config import Config, ModelConfig
from transformer_jax.tasks.finetune import FAMILY_OBJECTIVE, RUNTIME_MODEL_KEYS, Prepared, make_task

DEFAULT_CONFIG = os.path.join(cli.REPO, "configs", "finetune_embedded.yaml")
SUMMARY_EVAL_KEYS = ("eval_same_label_recall1",)  # final eval figures the summary names besides eval_<metric>


# ----------------------------------------------------------------------------- export
def export_best(prepared: Prepared, workdir: str, mesh) -> str | None:
    """Write the best (else the latest) checkpoint's weights, LoRA merged, to <workdir>/params."""
    directory = os.path.join(workdir, "checkpoints")
    checkpointer = ckpt.Checkpointer(
        directory, best_metric=f"eval_{prepared.task.best_metric}", best_mode=prepared.task.best_mode
    )
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
    scored = [((v if mode == "max" else -v), -s, s) for s, v in evals.items()]  # ties: the earlier step
    step = max(scored)[2] if scored else latest
    if step is None:
        return None
    abstract = jax.eval_shape(prepared.task.init_params, jax.random.key(0))
    shardings = sh.tree_shardings(prepared.task.model.logical_axes, abstract, mesh)
    flat = ft.flatten(ckpt.abstract_with_shardings(abstract, shardings))
    loaded = ft.restore_subset(os.path.join(directory, str(step), "state"), "params", flat)
    params = ft.assemble(abstract, loaded, {})
    if prepared.loss_cfg.lora_alpha:
        merge = jax.jit(
            lambda p: ft.lora_merge(
                p["model"], p["lora"], alpha=prepared.loss_cfg.lora_alpha, rank=prepared.loss_cfg.lora_rank
            )
        )
        params = merge(params)
    out = os.path.join(workdir, "params")
    ckpt.save_params(out, params)
    return f"{out} (step {step})"


def finetune(
    cfg: Config,
    workdir: str,
    *,
    mesh=None,
    scratch: bool = False,
    quiet: bool = False,
    translator: Callable[[str], str] | None = None,
    export: bool = True,
) -> dict:
    """Finetune as cfg says; returns a summary: final and best eval metrics, parameter counts,
    optimizer-state bytes, runtime."""
    start = time.perf_counter()
    mesh = mesh or sh.make_mesh(cfg.mesh)
    log = (lambda s: None) if quiet else print
    prepared = make_task(cfg, workdir, mesh, scratch=scratch, translator=translator, log=log)
    if not quiet:
        print(
            f"task {prepared.spec.name} ({prepared.spec.kind}, {prepared.spec.num_labels or ''} labels "
            f"{', '.join(prepared.spec.label_names[:8])}); strategy {prepared.cfg.finetune.strategy}: training "
            f"{prepared.trainable_params:,} of {prepared.total_params:,} parameters"
            + (
                f" ({prepared.total_params - prepared.vocab_padding_params:,} without the vocabulary padding)"
                if prepared.vocab_padding_params
                else ""
            )
        )
    metrics, state = trainer.run(prepared.cfg, workdir, prepared.task, mesh=mesh, quiet=quiet)
    metric = prepared.task.best_metric
    summary = {
        "task": prepared.spec.name,
        "strategy": prepared.cfg.finetune.strategy,
        "init_from": "scratch" if scratch else (prepared.cfg.finetune.init_from or "scratch"),
        "step": metrics.get("step"),
        "metric": metric,
        f"eval_{metric}": metrics.get(f"eval_{metric}"),
        f"best_eval_{metric}": metrics.get(f"best_eval_{metric}"),
        **{k: metrics[k] for k in SUMMARY_EVAL_KEYS if k in metrics and k != f"eval_{metric}"},
        "best_step": metrics.get("best_step"),
        "eval": {k[5:]: v for k, v in metrics.items() if k.startswith("eval_")},
        "trainable_params": prepared.trainable_params,
        "total_params": prepared.total_params,
        "optimizer_state_bytes": ft.nbytes(state["opt_state"]),
    }
    if export:
        summary["exported"] = export_best(prepared, workdir, mesh)
    summary["runtime_s"] = round(time.perf_counter() - start, 1)
    return summary


# ----------------------------------------------------------------------------- pretrained vs scratch
def compare_scratch(
    cfg: Config,
    workdir: str,
    *,
    init_from: str = "",
    pretrain_config: str | None = None,
    pretrain_overrides: tuple[str, ...] = (),
    mesh=None,
    quiet: bool = True,
) -> dict:
    """Finetune the same architecture, tokenizer, data, seed and steps twice: from the pretrained
    weights and from scratch. Without init_from, pretrains first (pretrain_config, default
    configs/bert_tiny.yaml, with pretrain_overrides) into <workdir>/pretrain."""
    from train import pretrain

    start = time.perf_counter()
    mesh = mesh or sh.make_mesh(cfg.mesh)
    result: dict = {}
    if not init_from:
        init_from = os.path.join(workdir, "pretrain")
        pcfg = config_lib.load_config(
            pretrain_config or os.path.join(cli.REPO, "configs", "bert_tiny.yaml"), list(pretrain_overrides)
        )
        pcfg, ptask = pretrain.make_task(pcfg, init_from)
        t0 = time.perf_counter()
        pmetrics, _ = trainer.run(pcfg, init_from, ptask, mesh=mesh, quiet=quiet)
        result["pretrain"] = {
            "config": pcfg.name,
            "steps": pmetrics.get("step"),
            "loss": pmetrics.get("loss"),
            "runtime_s": round(time.perf_counter() - t0, 1),
            **{k: v for k, v in pmetrics.items() if k.startswith("eval_") and "accuracy" in k},
        }
    cfg = config_lib.replace(cfg, finetune=dict(init_from=init_from))
    for name, scratch in (("pretrained", False), ("scratch", True)):
        result[name] = finetune(cfg, os.path.join(workdir, name), mesh=mesh, scratch=scratch, quiet=quiet, export=False)
    metric = result["pretrained"]["metric"]
    result["metric"] = metric
    result["steps"] = cfg.train.steps
    result["gain"] = {
        k: (result["pretrained"][k] or 0) - (result["scratch"][k] or 0)
        for k in (f"eval_{metric}", f"best_eval_{metric}")
    }
    result["runtime_s"] = round(time.perf_counter() - start, 1)
    return result


# ----------------------------------------------------------------------------- main
def load_finetune_config(path: str | None, overrides=()) -> Config:
    """load_config, with train.objective (which only the pretraining programs use) defaulting to one
    that fits the config's model family, so a finetuning YAML need not name one, and the runtime
    model settings its model section or --set names in finetune.model_keys: they win over a
    pretrained model's own, even where they equal the defaults."""
    data = config_parsing.read_yaml(path or DEFAULT_CONFIG)
    keys = [config_parsing.parse_override(o)[0] for o in overrides]
    model = data.get("model")
    if not isinstance(model, dict):
        model = {}
    family = next(
        (config_parsing.parse_override(o)[1] for o in overrides if o.split("=", 1)[0].strip() == "model.family"),
        model.get("family", ModelConfig.family),
    )
    train = data.setdefault("train", {}) if isinstance(data.get("train", {}), dict) else data.get("train")
    if isinstance(train, dict) and "objective" not in train and "train.objective" not in keys:
        train["objective"] = FAMILY_OBJECTIVE.get(family, "clm")
    cfg = config_lib.config_from_dict(data, overrides)
    named = set(model)
    for key, value in map(config_parsing.parse_override, overrides):
        if key == "model" and isinstance(value, dict):
            named = set(value)
        elif key.startswith("model."):
            named.add(key[len("model.") :])
    model_keys = (*cfg.finetune.model_keys, *(k for k in RUNTIME_MODEL_KEYS if k in named))
    return config_lib.replace(cfg, finetune=dict(model_keys=tuple(dict.fromkeys(model_keys))))


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(
        __doc__.splitlines()[0],
        checkpoint="the pretrained model: our workdir or a Hugging Face model "
        "directory (finetune.init_from; --init_from is the same flag)",
        checkpoint_aliases=("--init_from",),
    )
    p.add_argument(
        "--compare-scratch",
        action="store_true",
        help="finetune from the pretrained weights and from scratch, same steps; print both as JSON "
        "(without --init_from: pretrain first with --pretrain-config)",
    )
    p.add_argument(
        "--pretrain-config",
        default=None,
        help="--compare-scratch: the pretraining config (default configs/bert_tiny.yaml)",
    )
    p.add_argument(
        "--pretrain-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--compare-scratch: override a pretraining config value (repeatable)",
    )
    args = p.parse_args(argv)
    cfg = load_finetune_config(args.config, args.overrides)
    workdir = args.workdir or os.path.join("runs", cfg.name or "finetune")
    if args.checkpoint is not None:
        if not args.checkpoint:
            raise ValueError("--init_from: empty path")
        init_from = os.path.expanduser(args.checkpoint)
        if not os.path.isdir(init_from):
            raise ValueError(f"--init_from: {args.checkpoint} does not exist (or is not a directory)")
        cfg = config_lib.replace(cfg, finetune=dict(init_from=init_from))
    cli.init_devices(cfg)
    if args.compare_scratch:
        result = compare_scratch(
            cfg,
            workdir,
            init_from=cfg.finetune.init_from,
            pretrain_config=args.pretrain_config,
            pretrain_overrides=tuple(args.pretrain_set),
        )
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
