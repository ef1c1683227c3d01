"""A task from local files: CSV, TSV or JSONL, with a text column, an optional text-pair column
and a label column (int -> classification, float -> regression, string -> named classes; a list
of words with a list of labels -> token classification; any string target -> text-to-text)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from transformer_jax.data.labeled.base import TaskData, TaskSpec, _limit


def _read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"finetune.train_paths: no such file {path!r}")
    if path.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise ValueError(f"{path}:{n}: not a JSON object") from None
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))


def _parse_label(value: Any) -> Any:
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def local_task(
    train_paths: Sequence[str],
    eval_paths: Sequence[str] = (),
    *,
    text_column: str = "text",
    text_pair_column: str = "",
    label_column: str = "label",
    labels: Sequence[str] = (),
    head: str = "auto",
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_train: int = 0,
    max_eval: int = 0,
    name: str = "local",
) -> TaskData:
    """A task from local CSV / TSV / JSONL files (see the module docstring for what the columns mean)."""

    def load(paths):
        rows = [r for p in paths for r in _read_rows(p)]
        for i, r in enumerate(rows):
            for column in (text_column, label_column) + ((text_pair_column,) if text_pair_column else ()):
                if column not in r:
                    raise ValueError(
                        f"finetune.{'label' if column == label_column else 'text'}_column: row {i} of "
                        f"{', '.join(paths)} has no column {column!r} (it has {', '.join(map(str, r))})"
                    )
        return rows

    rows = load(train_paths)
    if eval_paths:
        eval_rows = load(eval_paths)
    else:
        order = np.random.default_rng(seed).permutation(len(rows))
        k = max(1, round(len(rows) * eval_fraction))
        if k >= len(rows):
            raise ValueError(f"finetune.train_paths: {len(rows)} rows are too few to hold out an eval set")
        eval_rows, rows = [rows[int(i)] for i in order[:k]], [rows[int(i)] for i in order[k:]]
    if not rows:
        raise ValueError(f"finetune.train_paths: {', '.join(train_paths)} hold no rows")

    if isinstance(rows[0][text_column], list):  # words + per-word labels
        values = sorted({str(v) for r in rows + eval_rows for v in r[label_column]})
        names = tuple(labels) or tuple(values)
        index = {n: i for i, n in enumerate(names)}

        def word_labels(r):
            try:
                return [index[str(v)] for v in r[label_column]]
            except KeyError as e:
                raise ValueError(f"finetune.labels: label {e.args[0]!r} is not one of {', '.join(names)}") from None

        convert = lambda rs: [{"words": [str(w) for w in r[text_column]], "labels": word_labels(r)} for r in rs]
        spec = TaskSpec(name, "token_classification", names, ("accuracy", "macro_f1"), "accuracy")
        return TaskData(spec, _limit(convert(rows), max_train), _limit(convert(eval_rows), max_eval))

    pair = lambda r: str(r[text_pair_column]) if text_pair_column else None
    raw_labels = [_parse_label(r[label_column]) for r in rows + eval_rows]
    text_names = (text_column, text_pair_column or "text_pair")
    if head == "text_to_text" and not labels and any(isinstance(v, str) for v in raw_labels):
        convert = lambda rs: [
            {"input": str(r[text_column]) + (f" {pair(r)}" if text_pair_column else ""), "target": str(r[label_column])}
            for r in rs
        ]
        spec = TaskSpec(name, "text_to_text", (), ("exact_match",), "exact_match", text_names)
        return TaskData(spec, _limit(convert(rows), max_train), _limit(convert(eval_rows), max_eval))
    if head == "regression" or (head == "auto" and not labels and any(isinstance(v, float) for v in raw_labels)):
        convert = lambda rs: [
            {"text": str(r[text_column]), "text_pair": pair(r), "label": float(r[label_column])} for r in rs
        ]
        spec = TaskSpec(name, "regression", (), ("pearson", "spearman"), "pearson", text_names)
        return TaskData(spec, _limit(convert(rows), max_train), _limit(convert(eval_rows), max_eval))
    if labels:
        names = tuple(labels)
    elif all(isinstance(v, int) for v in raw_labels):
        names = tuple(str(i) for i in range(max(raw_labels) + 1))
    else:
        names = tuple(sorted({str(v) for v in raw_labels}))
    index = {n: i for i, n in enumerate(names)}

    def label_of(v):
        v = _parse_label(v)
        key = str(v)
        if key in index:
            return index[key]
        if isinstance(v, int) and not labels and 0 <= v < len(names):
            return v
        raise ValueError(f"finetune.labels: label {key!r} is not one of {', '.join(names)}")

    convert = lambda rs: [
        {"text": str(r[text_column]), "text_pair": pair(r), "label": label_of(r[label_column])} for r in rs
    ]
    metrics = ("accuracy", "f1") if len(names) == 2 else ("accuracy", "macro_f1")
    spec = TaskSpec(name, "classification", names, metrics, "accuracy", text_names)
    return TaskData(spec, _limit(convert(rows), max_train), _limit(convert(eval_rows), max_eval))
