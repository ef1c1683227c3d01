"""Evaluation of a trained workdir: the trainer's own eval, on its latest checkpoint.

    python -m train.evaluate --checkpoint runs/gpt_tiny                      # the run's held-out split
    python -m train.evaluate --checkpoint runs/gpt_tiny --eval_steps 16      # more eval batches
    python -m train.evaluate --checkpoint runs/gpt_tiny --set data.source=files --set data.paths=[my.txt]
    python -m train.evaluate --checkpoint runs/finetune_embedded             # a train.finetune run: task metrics

--checkpoint is a workdir of ours (config.yaml + checkpoints/<step>/, or params/). Its config.yaml
is the base config (--config FILE replaces it, --set key=value overrides either); its
tokenizer.model is the tokenizer. The objective's Task comes from the registry, exactly as the
training run built it (same eval data: the held-out split of the configured source), the latest
parameters are restored onto the mesh in the trainer's shardings, and the trainer's eval step and
loop run over them (train.eval_steps batches, or --eval_steps): the figures are those the run
logged as eval_* in metrics.jsonl at that step. A train.finetune workdir (a task head, or
finetune.init_from set) is scored by the finetuning objective's evaluation (accuracy, F1, ...).
Prints one JSON object and writes it to <workdir>/eval.json (--workdir, default the checkpoint).
Model keys that change the architecture are refused; only runtime ones (RUNTIME_MODEL_KEYS) may differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

import jax

from train import cli, trainer
from transformer_jax import attention as attn
from transformer_jax import checkpoint as ckpt
from transformer_jax import config as config_lib
from transformer_jax import config_parsing, runs, tasks
from transformer_jax import finetune as ft
from transformer_jax import sharding as sh
from transformer_jax.config import Config, ConfigError, ModelConfig

# model keys an evaluation may set differently from the checkpoint's: they change how the model
# runs, not its parameters or what it computes (dropout is off at eval anyway)
RUNTIME_MODEL_KEYS = ("dropout_rate", "attention_dropout_rate", "dtype", "remat", "attention_impl")
FINETUNE_HEADS = {"classification", "regression", "token_classification", "qa"}
# finetuning keys that only feed the training batches (a teacher's logits, back-translation): off at eval
FINETUNE_TRAINING_ONLY = {"distill_from": "", "back_translate": 0.0}


def checkpoint_dir(path: str | None) -> str:
    """The --checkpoint workdir, checked: a directory with config.yaml and weights."""
    if not path:
        raise ValueError("--checkpoint: required (a workdir of train.pretrain, train.finetune, ...)")
    runs.config_path(path)
    path = os.path.expanduser(path)
    runs.latest_params_path(path)  # no weights: one line
    return path


def is_finetuned(cfg: Config) -> bool:
    """A train.finetune workdir: a task head, or weights started from finetune.init_from (a
    text-to-text finetune from scratch has neither: --set train.objective=finetune)."""
    return (
        cfg.train.objective == "finetune" or bool(set(cfg.model.heads) & FINETUNE_HEADS) or bool(cfg.finetune.init_from)
    )


def check_architecture(saved: ModelConfig, now: ModelConfig, checkpoint: str) -> None:
    for field in dataclasses.fields(ModelConfig):
        if field.name in RUNTIME_MODEL_KEYS:
            continue
        was, is_ = getattr(saved, field.name), getattr(now, field.name)
        if was != is_:
            raise ConfigError(
                f"model.{field.name}: {is_!r} here, {was!r} in the checkpoint {checkpoint}: an "
                f"evaluation keeps the checkpoint's architecture (only {', '.join(RUNTIME_MODEL_KEYS)} "
                "may differ)"
            )


def eval_config(checkpoint: str, config: str | None = None, overrides=(), eval_steps: int | None = None) -> Config:
    """The checkpoint's config.yaml (or `config`) with `overrides`, its tokenizer, `eval_steps`; the
    architecture checked against the checkpoint's."""
    saved_path = os.path.join(checkpoint, "config.yaml")
    try:
        saved = config_lib.load_config(saved_path)
    except ConfigError as e:
        raise ValueError(f"--checkpoint: {saved_path}: {e}") from None
    cfg = config_lib.load_config(config or saved_path, list(overrides))
    keys = {config_parsing.parse_override(o)[0] for o in overrides}
    changes: dict = {}
    tokenizer = os.path.join(checkpoint, "tokenizer.model")
    if "data.tokenizer" not in keys and os.path.isfile(tokenizer):
        changes["data"] = dict(tokenizer=tokenizer)
    if eval_steps is not None:
        changes["train"] = dict(eval_steps=eval_steps)
    if is_finetuned(cfg):
        changes["train"] = {**changes.get("train", {}), "objective": "finetune"}
        # with the run's own tokenizer, the architecture is the saved one: the pretrained source (which
        # may have moved since) is not read; a Hugging Face tokenizer still comes from it
        scratch = bool((changes.get("data") or {}).get("tokenizer") or cfg.data.tokenizer)
        changes["finetune"] = {**FINETUNE_TRAINING_ONLY, **({"init_from": ""} if scratch else {})}
        if cfg.finetune.strategy == "lora" and runs.latest_params_path(checkpoint)[1] is None:
            changes["finetune"]["strategy"] = "full"  # params/ holds the exported weights, LoRA merged in
    cfg = config_lib.replace(cfg, **changes) if changes else cfg
    check_architecture(saved.model, cfg.model, checkpoint)
    from_source = cfg.train.objective == "finetune" and bool(cfg.finetune.init_from)
    if not cfg.data.tokenizer and cfg.data.source != "prepared" and not from_source:  # never train a new one
        raise ValueError(
            f"--checkpoint: {checkpoint} has no tokenizer.model and its config names no data.tokenizer: "
            "--set data.tokenizer=<the run's SentencePiece model>"
        )
    return cfg


def restore_params(checkpoint: str, abstract, shardings) -> tuple[object, int | None]:
    """(the latest weights placed on `shardings`, their step; None for params/): only the parameters
    are read, each straight onto its devices, as train.finetune's export reads them."""
    path, subtree = runs.latest_params_path(checkpoint)
    target = ckpt.abstract_with_shardings(abstract, shardings)
    if subtree is None:
        return ckpt.load_params(path, target), None
    saved, wanted = ft.saved_shapes(path, subtree), {p: tuple(x.shape) for p, x in ft.flatten(target).items()}
    for p, shape in wanted.items():
        if saved.get(p) != shape:
            raise ckpt.CheckpointError(
                f"checkpoint {path}: {p} is {saved.get(p) or 'missing'} there, the model expects {shape}"
            )
    params = ft.assemble(abstract, ft.restore_subset(path, subtree, ft.flatten(target)), {})
    return params, int(os.path.basename(os.path.dirname(path)))


def evaluate_checkpoint(
    checkpoint: str,
    *,
    config: str | None = None,
    overrides=(),
    eval_steps: int | None = None,
    devices=None,
    distributed: bool = False,
) -> dict:
    """Evaluate the latest weights of `checkpoint` as its training run did; returns the JSON record."""
    cli.check_keys(overrides)  # a misspelt key is named before the checkpoint is looked at
    checkpoint = checkpoint_dir(checkpoint)
    cfg = eval_config(checkpoint, config, overrides, eval_steps)
    if distributed:
        cli.init_distributed(cfg)
    objective = cfg.train.objective
    mesh = sh.make_mesh(cfg.mesh, devices)
    trainer.check_batch_fits(dataclasses.replace(cfg.train, grad_accum=1), mesh)  # eval batches are whole
    # the workdir the Task is built for is the checkpoint's: nothing is written there (the tokenizer exists)
    task_cfg, task = tasks.get(objective).make_task(cfg, checkpoint)
    check_architecture(
        config_lib.load_config(os.path.join(checkpoint, "config.yaml")).model, task_cfg.model, checkpoint
    )
    attn.check_backend(task.model.cfg.attention_impl)
    abstract = jax.eval_shape(task.init_params, jax.random.key(task_cfg.train.seed))
    shardings = sh.tree_shardings(task.model.logical_axes, abstract, mesh)
    params, step = restore_params(checkpoint, abstract, shardings)
    eval_step = sh.with_mesh(
        jax.jit(
            trainer.make_eval_step(task),
            in_shardings=(shardings, sh.batch_sharding(mesh)),
            out_shardings=sh.replicated(mesh),
        ),
        mesh,
    )
    metrics = trainer.evaluate(task, eval_step, params, mesh, task_cfg.train.eval_steps)
    return {
        "checkpoint": checkpoint,
        "step": step,
        "objective": objective,
        "data_source": task_cfg.data.source,
        "eval_steps": task_cfg.train.eval_steps if task.eval_batches is not None else None,
        **{k: float(v) for k, v in metrics.items()},
    }


def main() -> None:
    p = cli.parser(
        __doc__.splitlines()[0],
        checkpoint="the run to evaluate: a workdir of ours (config.yaml + checkpoints/<step>/ or params/)",
        config="a YAML config that replaces the checkpoint's config.yaml (same architecture)",
        workdir="where eval.json goes (default: the checkpoint's workdir)",
    )
    p.add_argument(
        "--eval_steps", type=int, default=None, help="eval batches (default train.eval_steps, as in training)"
    )
    args = p.parse_args()
    # library chatter (a finetuning task's report, the distributed banner) goes to stderr: stdout is the JSON
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate_checkpoint(
            args.checkpoint, config=args.config, overrides=args.overrides, eval_steps=args.eval_steps, distributed=True
        )
    if jax.process_index() == 0:
        workdir = args.workdir or result["checkpoint"]
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.main(main)
