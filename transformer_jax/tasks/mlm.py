"""Masked LM (BERT/RoBERTa): predict 15% of the tokens of packed documents, 80/10/10 corrupted."""

from __future__ import annotations

from transformer_jax import objectives as obj
from transformer_jax.tasks.text import F32, I32, TextObjective


def batch_fn(ctx):
    predictions = obj.max_predictions(ctx.seq_len, ctx.options["mask_rate"])
    return lambda rows, rng: obj.add_mlm_positions(
        obj.masked_lm(rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"], rng, **ctx.mask_kw),
        predictions,
    )


def shapes(b: int, s: int, o) -> dict:
    p = obj.max_predictions(s, o["mask_rate"])
    return {
        "input_ids": ((b, s), I32),
        "attention_mask": ((b, s), I32),
        "segment_ids": ((b, s), I32),
        "positions": ((b, s), I32),
        "mlm_targets": ((b, s), I32),
        "mlm_weights": ((b, s), F32),
        "mlm_positions": ((b, p), I32),
    }


OBJECTIVE = TextObjective(
    name="mlm",
    family="encoder",
    heads=("mlm",),
    model_inputs=("input_ids", "attention_mask", "segment_ids", "positions", "mlm_positions"),
    losses={"mlm": ("logits", "mlm_targets", "mlm_weights")},
    batch_fn=batch_fn,
    shapes=shapes,
)
