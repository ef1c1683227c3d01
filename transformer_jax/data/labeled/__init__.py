"""Finetuning task data: examples, their encoding into fixed-shape NumPy batches, augmentation.

Sources (each returns a `TaskData`: a `TaskSpec` and train / eval lists of example dicts), one
module each, all on top of `base` (types, text-to-text, special ids, augmentation, `Encoder`,
batches):

- `embedded_task()` (`embedded`): needs no download. Snippets of the running Python's standard
  library labelled with the package they come from (asyncio, email, importlib, ...).
- `glue_task('cola' | 'sst2' | 'mrpc' | 'qqp' | 'stsb' | 'mnli' | 'qnli' | 'rte' | 'wnli')`
  (`glue`): through TFDS from a prepared `data_dir` (never downloads), with GLUE's official metrics.
- `squad_task()` (`squad`): SQuAD v1.1 through TFDS, or the official JSON files (train-v1.1.json, ...).
- `local_task(paths)` (`files`): CSV, TSV or JSONL files with a text column, an optional
  text-pair column and a label column (int -> classification, float -> regression, string ->
  named classes; a list of words with a list of labels -> token classification; any string
  target -> text-to-text).

See `base` for the example dicts, the batches and the augmentation.
"""

from transformer_jax.data.labeled.base import (
    KINDS,
    Augmentation,
    Encoder,
    SpecialIds,
    TaskData,
    TaskSpec,
    _limit,
    as_text_to_text,
    batches,
    eval_features,
    regression_target,
    round_trip,
    source_kind,
    special_ids,
    split_sentences,
    train_dataset,
)
from transformer_jax.data.labeled.embedded import EMBEDDED_PACKAGES, embedded_task
from transformer_jax.data.labeled.files import local_task
from transformer_jax.data.labeled.glue import GLUE, GlueTask, glue_task, tfds_examples
from transformer_jax.data.labeled.squad import SQUAD_SPEC, squad_json_examples, squad_task

__all__ = [
    "KINDS",
    "Augmentation",
    "Encoder",
    "SpecialIds",
    "TaskData",
    "TaskSpec",
    "as_text_to_text",
    "batches",
    "eval_features",
    "regression_target",
    "round_trip",
    "source_kind",
    "special_ids",
    "split_sentences",
    "train_dataset",
    "EMBEDDED_PACKAGES",
    "embedded_task",
    "local_task",
    "GLUE",
    "GlueTask",
    "glue_task",
    "tfds_examples",
    "SQUAD_SPEC",
    "squad_json_examples",
    "squad_task",
    "_limit",
]  # train.finetune caps the embedded task's splits with labeled._limit
