"""Span corruption (T5): random spans of the encoder's input become sentinels; the decoder writes them."""

from __future__ import annotations

from transformer_jax import objectives as obj
from transformer_jax.tasks.text import F32, I32, TextObjective


def lengths(seq_len: int, o) -> tuple[int, int]:
    """(packed row length, decoder length) for encoder length seq_len (T5: 512 -> 568, 114)."""
    return obj.span_corruption_lengths(seq_len, o["noise_density"], o["mean_noise_span_length"])


def batch_fn(ctx):
    o, t = ctx.options, ctx.tokenizer
    row_len, targets_length = lengths(ctx.seq_len, o)
    max_spans = max(1, round(round(row_len * o["noise_density"]) / o["mean_noise_span_length"]))
    if max_spans > len(t.sentinel_ids):
        raise ValueError(
            f"span corruption of seq_len {ctx.seq_len} makes up to {max_spans} spans but the "
            f"tokenizer has {len(t.sentinel_ids)} sentinels"
        )
    return lambda rows, rng: obj.span_corruption(
        rows["tokens"],
        rows["tokens_segment_ids"],
        rng,
        inputs_length=ctx.seq_len,
        targets_length=targets_length,
        sentinel_ids=t.sentinel_ids,
        eos_id=t.eos_id,
        noise_density=o["noise_density"],
        mean_noise_span_length=o["mean_noise_span_length"],
        pad_id=t.pad_id,
    )


def shapes(b: int, s: int, o) -> dict:
    t = lengths(s, o)[1]
    return {
        "input_ids": ((b, s), I32),
        "attention_mask": ((b, s), I32),
        "decoder_input_ids": ((b, t), I32),
        "decoder_attention_mask": ((b, t), I32),
        "targets": ((b, t), I32),
        "loss_mask": ((b, t), F32),
    }


OBJECTIVE = TextObjective(
    name="span_corruption",
    family="encoder_decoder",
    model_inputs=("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
    losses={"lm": ("logits", "targets", "loss_mask")},
    row_length=lambda seq_len, o: lengths(seq_len, o)[0],
    batch_fn=batch_fn,
    shapes=shapes,
)
