"""Causal LM (GPT-2): predict every next token of packed documents."""

from __future__ import annotations

from transformer_jax import objectives as obj
from transformer_jax.tasks.text import F32, I32, TextObjective


def shapes(b: int, s: int, o) -> dict:
    return {
        "input_ids": ((b, s), I32),
        "targets": ((b, s), I32),
        "loss_mask": ((b, s), F32),
        "segment_ids": ((b, s), I32),
        "positions": ((b, s), I32),
    }


OBJECTIVE = TextObjective(
    name="clm",
    family="decoder",
    model_inputs=("input_ids", "segment_ids", "positions"),
    losses={"lm": ("logits", "targets", "loss_mask")},
    row_length=lambda seq_len, o: seq_len + 1,  # inputs are row[:-1], targets row[1:]
    batch_fn=lambda ctx: (
        lambda rows, rng: obj.causal_lm(rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"])
    ),
    shapes=shapes,
    random=False,
)
