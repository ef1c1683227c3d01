"""SQuAD v1.1 (extractive QA) through TFDS, or the official JSON files (train-v1.1.json, ...).
Its feature windows (doc stride) are `Encoder.qa_features` in `base`."""

from __future__ import annotations

import json
from collections.abc import Sequence

from transformer_jax.data.labeled.base import TaskData, TaskSpec, _limit
from transformer_jax.data.labeled.glue import _text, tfds_examples

SQUAD_SPEC = TaskSpec("squad", "qa", (), ("exact_match", "f1"), "f1", ("question", "context"))


def squad_json_examples(path: str) -> list[dict]:
    """Examples of an official SQuAD v1.1 JSON file ({'data': [{'paragraphs': [{'context', 'qas'}]}]})."""
    try:
        with open(path) as f:
            data = json.load(f)["data"]
    except FileNotFoundError:
        raise ValueError(f"finetune.train_paths: no such SQuAD file {path!r}") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: not a SQuAD v1.1 JSON file (expected {{'data': [{{'paragraphs': ...}}]}})") from None
    out = []
    for article in data:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                out.append(
                    {
                        "id": str(qa["id"]),
                        "question": qa["question"],
                        "context": paragraph["context"],
                        "answers": [a["text"] for a in qa["answers"]],
                        "answer_starts": [int(a["answer_start"]) for a in qa["answers"]],
                    }
                )
    return out


def squad_task(
    *,
    data_dir: str = "",
    train_paths: Sequence[str] = (),
    eval_paths: Sequence[str] = (),
    max_train: int = 0,
    max_eval: int = 0,
) -> TaskData:
    """SQuAD v1.1 from official JSON files (train_paths / eval_paths) or TFDS 'squad/v1.1' in data_dir."""
    if train_paths:
        if not eval_paths:
            raise ValueError("finetune.eval_paths: SQuAD from JSON files needs the dev file too (dev-v1.1.json)")
        train = [ex for p in train_paths for ex in squad_json_examples(p)]
        evaluation = [ex for p in eval_paths for ex in squad_json_examples(p)]
        return TaskData(SQUAD_SPEC, _limit(train, max_train), _limit(evaluation, max_eval))

    def convert(raw):
        return [
            {
                "id": _text(ex["id"]),
                "question": _text(ex["question"]),
                "context": _text(ex["context"]),
                "answers": [_text(a) for a in ex["answers"]["text"]],
                "answer_starts": [int(s) for s in ex["answers"]["answer_start"]],
            }
            for ex in raw
        ]

    train, _ = tfds_examples("squad/v1.1", data_dir=data_dir, split="train", limit=max_train)
    evaluation, _ = tfds_examples("squad/v1.1", data_dir=data_dir, split="validation", limit=max_eval)
    return TaskData(SQUAD_SPEC, convert(train), convert(evaluation))
