"""Prefix LM (the T5 paper's section 3.3): an encoder-decoder reads the first half of a packed
row and writes the second half. The worked example of docs/objectives.md: this file and one
registry line are the whole objective.

    python -m train.pretrain --config configs/t5_tiny.yaml --set train.objective=prefix_lm
"""

from __future__ import annotations

import numpy as np

from transformer_jax.tasks.text import F32, I32, TextObjective


def prefix_lm(tokens_bl: np.ndarray, segment_ids_bl: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Packed rows [b, 2*seq_len] -> inputs row[:seq_len], targets row[seq_len:]; the decoder reads
    the targets shifted right behind the start id 0. Padding (segment id 0) is masked out."""
    inputs_bs, targets_bs = tokens_bl[:, :seq_len], tokens_bl[:, seq_len:]
    real_bs = segment_ids_bl[:, seq_len:] > 0
    decoder_input_ids_bs = np.zeros_like(targets_bs)
    decoder_input_ids_bs[:, 1:] = targets_bs[:, :-1]
    return {
        "input_ids": inputs_bs.astype(np.int32),
        "attention_mask": (segment_ids_bl[:, :seq_len] > 0).astype(np.int32),
        "decoder_input_ids": decoder_input_ids_bs.astype(np.int32),
        "decoder_attention_mask": real_bs.astype(np.int32),
        "targets": targets_bs.astype(np.int32),
        "loss_mask": real_bs.astype(np.float32),
    }


def shapes(b: int, s: int, o) -> dict:
    return {
        "input_ids": ((b, s), I32),
        "attention_mask": ((b, s), I32),
        "decoder_input_ids": ((b, s), I32),
        "decoder_attention_mask": ((b, s), I32),
        "targets": ((b, s), I32),
        "loss_mask": ((b, s), F32),
    }


OBJECTIVE = TextObjective(
    name="prefix_lm",
    family="encoder_decoder",
    model_inputs=("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
    losses={"lm": ("logits", "targets", "loss_mask")},
    row_length=lambda seq_len, o: 2 * seq_len,
    batch_fn=lambda ctx: lambda rows, rng: prefix_lm(rows["tokens"], rows["tokens_segment_ids"], ctx.seq_len),
    shapes=shapes,
    random=False,
)
