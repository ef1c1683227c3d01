"""BERT pretraining: [CLS] A [SEP] B [SEP] sentence pairs, next-sentence prediction plus masked LM."""

from __future__ import annotations

from transformer_jax import objectives as obj
from transformer_jax.tasks.text import F32, I32, TextObjective


def batch_fn(ctx):
    predictions = obj.max_predictions(ctx.seq_len, ctx.options["mask_rate"])
    t = ctx.tokenizer

    def build(pairs, rng):
        batch = obj.mlm_nsp(
            pairs, rng, seq_len=ctx.seq_len, batch_size=ctx.batch_size, cls_id=t.cls_id, sep_id=t.sep_id, **ctx.mask_kw
        )
        return obj.add_mlm_positions(batch, predictions)

    return build


def shapes(b: int, s: int, o) -> dict:
    p = obj.max_predictions(s, o["mask_rate"])
    return {
        "input_ids": ((b, s), I32),
        "token_type_ids": ((b, s), I32),
        "attention_mask": ((b, s), I32),
        "positions": ((b, s), I32),
        "mlm_targets": ((b, s), I32),
        "mlm_weights": ((b, s), F32),
        "mlm_positions": ((b, p), I32),
        "nsp_labels": ((b,), I32),
        "nsp_weights": ((b,), F32),
    }


OBJECTIVE = TextObjective(
    name="mlm_nsp",
    family="encoder",
    heads=("mlm", "nsp"),
    model_inputs=("input_ids", "attention_mask", "token_type_ids", "positions", "mlm_positions"),
    losses={"mlm": ("logits", "mlm_targets", "mlm_weights"), "nsp": ("heads/nsp", "nsp_labels", "nsp_weights")},
    batch_fn=batch_fn,
    shapes=shapes,
    rows="pairs",
)
