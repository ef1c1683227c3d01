"""GLUE through TFDS from a prepared `data_dir` (never downloads), with GLUE's official metrics;
`tfds_examples` reads any prepared TFDS dataset (SQuAD too)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from transformer_jax.data.labeled.base import TaskData, TaskSpec


@dataclasses.dataclass(frozen=True)
class GlueTask:
    fields: tuple[str, str | None]
    metrics: tuple[str, ...]
    main_metric: str
    eval_split: str = "validation"
    regression: bool = False


GLUE = {
    "cola": GlueTask(("sentence", None), ("matthews_corr", "accuracy"), "matthews_corr"),
    "sst2": GlueTask(("sentence", None), ("accuracy",), "accuracy"),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("accuracy", "f1"), "f1"),
    "qqp": GlueTask(("question1", "question2"), ("accuracy", "f1"), "f1"),
    "stsb": GlueTask(("sentence1", "sentence2"), ("pearson", "spearman"), "pearson", regression=True),
    "mnli": GlueTask(("premise", "hypothesis"), ("accuracy",), "accuracy", eval_split="validation_matched"),
    "qnli": GlueTask(("question", "sentence"), ("accuracy",), "accuracy"),
    "rte": GlueTask(("sentence1", "sentence2"), ("accuracy",), "accuracy"),
    "wnli": GlueTask(("sentence1", "sentence2"), ("accuracy",), "accuracy"),
}


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if hasattr(x, "item") and getattr(x, "ndim", 0) == 0:
        return _text(x.item())
    return str(x)


def tfds_examples(name: str, *, data_dir: str, split: str, limit: int = 0) -> tuple[list[dict], Any]:
    """(examples as dicts of NumPy / Python values, the builder's info) of a TFDS dataset prepared in
    data_dir. Never downloads; a missing data_dir, dataset or split is a one-line ValueError."""
    import tensorflow_datasets as tfds
    from etils import epath

    if not data_dir:
        raise ValueError(
            f"finetune.data_dir: TFDS dataset {name!r} needs the folder where it was prepared (nothing is downloaded)"
        )
    if not epath.Path(data_dir).exists():
        raise ValueError(
            f"finetune.data_dir: {data_dir!r} does not exist (prepare {name!r} there first, e.g. "
            f"`tfds build {name} --data_dir {data_dir}`)"
        )
    kw = dict(split=split, data_dir=os.fspath(data_dir), download=False, try_gcs=False)
    try:
        try:
            source = tfds.data_source(name, **kw)
            n = len(source) if not limit else min(limit, len(source))
            examples = [source[i] for i in range(n)]
        except NotImplementedError:  # prepared as TFRecord
            ds = tfds.load(name, **kw)
            if limit:
                ds = ds.take(limit)
            examples = list(tfds.as_numpy(ds))
        info = tfds.builder(name, data_dir=os.fspath(data_dir)).info
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"finetune.task: TFDS has no dataset named {name!r}") from None
    except AssertionError:
        raise ValueError(
            f"finetune.data_dir: TFDS dataset {name!r} is not prepared in {data_dir!r} (nothing is "
            f"downloaded; prepare it first, e.g. `tfds build {name} --data_dir {data_dir}`)"
        ) from None
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"TFDS dataset {name!r} split {split!r} in {data_dir!r}: {(str(e).splitlines() or [type(e).__name__])[0]}"
        ) from None
    return examples, info


def glue_task(task: str, *, data_dir: str, max_train: int = 0, max_eval: int = 0) -> TaskData:
    if task not in GLUE:
        raise ValueError(f"finetune.task: glue/{task} is not a GLUE task ({', '.join(GLUE)})")
    g = GLUE[task]
    name = f"glue/{task}"
    train_raw, info = tfds_examples(name, data_dir=data_dir, split="train", limit=max_train)
    eval_raw, _ = tfds_examples(name, data_dir=data_dir, split=g.eval_split, limit=max_eval)
    first, second = g.fields

    def convert(raw):
        out = []
        for ex in raw:
            label = float(np.asarray(ex["label"])) if g.regression else int(np.asarray(ex["label"]))
            if not g.regression and label < 0:  # the test splits' hidden labels
                continue
            out.append({"text": _text(ex[first]), "text_pair": _text(ex[second]) if second else None, "label": label})
        return out

    names = () if g.regression else tuple(info.features["label"].names)
    spec = TaskSpec(
        name,
        "regression" if g.regression else "classification",
        names,
        g.metrics,
        g.main_metric,
        (first, second or "text_pair"),
    )
    return TaskData(spec, convert(train_raw), convert(eval_raw))
