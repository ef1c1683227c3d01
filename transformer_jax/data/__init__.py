"""Data: text corpora (embedded, local files, TFDS), the SentencePiece tokenizer, and the
deterministic, resumable grain input pipeline. TensorFlow / TFDS load only when a TFDS corpus is used."""

from transformer_jax.data.corpus import (
    Documents,
    embedded_corpus,
    from_strings,
    get_corpus,
    local_corpus,
    tfds_corpus,
    train_eval_split,
)
from transformer_jax.data.pipeline import (
    batch_shapes,
    get_state,
    make_dataset,
    make_eval_dataset,
    restore,
    span_targets_length,
)
from transformer_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer, train_sentencepiece

__all__ = [
    "Documents",
    "Tokenizer",
    "batch_shapes",
    "embedded_corpus",
    "from_strings",
    "get_corpus",
    "get_state",
    "load_or_train_tokenizer",
    "local_corpus",
    "make_dataset",
    "make_eval_dataset",
    "restore",
    "span_targets_length",
    "tfds_corpus",
    "train_eval_split",
    "train_sentencepiece",
]
