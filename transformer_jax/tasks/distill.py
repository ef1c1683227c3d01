"""Distillation for finetuning: the teacher (a finetuned model of ours with the task's head) and the
train batches it annotates with its head outputs, towards which finetune.distill_weight pulls the
student (transformer_jax.losses.distill_term). Used by transformer_jax.tasks.finetune.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from transformer_jax import config as config_lib
from transformer_jax import finetune as ft
from transformer_jax.config import ModelConfig
from transformer_jax.data import labeled
from transformer_jax.models import Model, abstract_build

# the model head each task kind trains (text-to-text: the LM head); transformer_jax.tasks.finetune's too
KIND_HEAD = {
    "classification": "classification",
    "regression": "regression",
    "token_classification": "token_classification",
    "qa": "qa",
}


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

    def close(self) -> None:
        self.inner.close()


def load_teacher(directory: str, spec: labeled.TaskSpec, student: ModelConfig) -> tuple[Model, Any]:
    """A finetuned model of ours (its exported params/ or latest checkpoint) with the task's head."""
    directory = os.path.expanduser(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"finetune.distill_from: {directory} does not exist")
    kind, path, subtree = ft.weights_source(directory)
    if kind == "hf":
        raise ValueError(
            f"finetune.distill_from: {directory} is a Hugging Face dir; finetune it first "
            "(the teacher needs the task's head)"
        )
    tcfg = config_lib.load_config(os.path.join(directory, "config.yaml"))
    model, abstract = abstract_build(tcfg.model)
    flat = ft.flatten(abstract)
    want = KIND_HEAD.get(spec.kind)
    if want and want not in tcfg.model.heads:
        raise ValueError(
            f"finetune.distill_from: {directory} has no {want} head (its heads: "
            f"{', '.join(tcfg.model.heads) or 'none'})"
        )
    if spec.kind in ("classification", "token_classification") and tcfg.model.num_labels != spec.num_labels:
        raise ValueError(
            f"finetune.distill_from: the teacher has {tcfg.model.num_labels} labels, the task {spec.num_labels}"
        )
    if spec.kind == "text_to_text" and tcfg.model.vocab_size != student.vocab_size:
        raise ValueError(
            f"finetune.distill_from: the teacher's vocab_size {tcfg.model.vocab_size} differs from the "
            f"student's {student.vocab_size}"
        )
    saved = ft.saved_shapes(path, subtree)
    ft.match_params(saved, flat, source=directory)  # raises on a mismatch
    missing = sorted(set(flat) - set(saved))
    if missing:
        raise ValueError(f"finetune.distill_from: {directory} lacks {missing[0]}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    loaded = ft.restore_subset(
        path, subtree, {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device) for p, x in flat.items()}
    )
    return model, ft.assemble(abstract, loaded, {})
