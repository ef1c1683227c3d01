"""Pretraining objectives: host-side NumPy batch builders and the losses that go with them.

Builders take NumPy arrays (packed rows from `transformer_jax.data.pipeline`, or token lists)
and a `np.random.Generator`; same generator state, same batch. All outputs have fixed shapes.

- `causal_lm`          GPT-2: next-token targets, loss masked at document boundaries.
- `masked_lm`          BERT/RoBERTa MLM: 15% of non-special tokens, 80% [MASK] / 10% random /
                       10% unchanged; optional whole-word masking.
- `nsp_pairs`, `mlm_nsp`  BERT pretraining: [CLS] A [SEP] B [SEP] with next-sentence labels + MLM.
- `span_corruption`    T5: random spans replaced by sentinels; targets are sentinel + span ... + eos.

Which model family, inputs and losses go with each objective: `transformer_jax.tasks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PAD_ID = 0


# ----------------------------------------------------------------------------- causal LM
def causal_lm(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Packed rows [b, L+1] -> next-token prediction batch of length L.

    loss_mask is 0 on padding and where the target belongs to another segment (a document
    boundary: the next document's first token is never predicted from the previous one).
    """
    seg_in, seg_tgt = segment_ids[:, :-1], segment_ids[:, 1:]
    return {
        "input_ids": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": ((seg_tgt == seg_in) & (seg_tgt > 0)).astype(np.float32),
        "segment_ids": seg_in.astype(np.int32),
        "positions": positions[:, :-1].astype(np.int32),
    }


# ----------------------------------------------------------------------------- masked LM
def _rank_within_rows(keys: np.ndarray) -> np.ndarray:
    """rank[b, i] = position of keys[b, i] in its row's ascending (stable) order."""
    order = np.argsort(keys, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(keys.shape[1]), keys.shape), axis=1)
    return ranks


def word_starts(ids: np.ndarray, candidates: np.ndarray, starts_word: np.ndarray, ends_word: np.ndarray) -> np.ndarray:
    """[b, L] bool: token starts a word (SentencePiece '▁' / after whitespace), counting only
    candidate tokens: the first candidate after a non-candidate always starts a word."""
    prev_ends = np.ones_like(candidates)
    prev_ends[:, 1:] = ends_word[ids[:, :-1]] | ~candidates[:, :-1]
    return candidates & (starts_word[ids] | prev_ends)


def choose_masked_positions(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    special_ids: Sequence[int],
    mask_rate: float = 0.15,
    whole_word: bool = False,
    starts_word: np.ndarray | None = None,
    ends_word: np.ndarray | None = None,
) -> np.ndarray:
    """[b, L] bool: round(mask_rate * n) of each row's n non-special tokens (at least 1 if n > 0).

    Whole-word: whole words are chosen in random order while they fit in that budget (as BERT's
    create_pretraining_data), so a word is never partly masked.
    """
    b, length = ids.shape
    candidates = ~np.isin(ids, np.asarray(special_ids))
    n_cand = candidates.sum(1)
    budget = np.where(n_cand > 0, np.maximum(1, np.round(n_cand * mask_rate)), 0).astype(np.int64)
    if not whole_word:
        keys = np.where(candidates, rng.random((b, length)), 2.0)
        return candidates & (_rank_within_rows(keys) < budget[:, None])
    if starts_word is None or ends_word is None:
        raise ValueError("whole-word masking needs starts_word and ends_word tables (see Tokenizer)")
    starts = word_starts(ids, candidates, np.asarray(starts_word), np.asarray(ends_word))
    word = np.cumsum(starts, axis=1) - 1  # word index of each token
    word = np.where(candidates, np.maximum(word, 0), length)  # non-candidates -> dummy word L
    size = np.zeros((b, length + 1), np.int64)
    np.add.at(size, (np.arange(b)[:, None], word), 1)
    size = size[:, :length]  # tokens per word
    keys = np.where(size > 0, rng.random((b, length)), 2.0)
    order = np.argsort(keys, axis=1, kind="stable")  # words in random order
    fits = np.cumsum(np.take_along_axis(size, order, 1), 1) <= budget[:, None]
    chosen_word = np.zeros((b, length + 1), bool)
    np.put_along_axis(chosen_word, order, fits & (np.take_along_axis(size, order, 1) > 0), axis=1)
    return np.take_along_axis(chosen_word, word, 1) & candidates


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    mask_rate: float = 0.15,
    mask_token_rate: float = 0.8,
    random_token_rate: float = 0.1,
    whole_word: bool = False,
    starts_word: np.ndarray | None = None,
    ends_word: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking of ids [b, L] -> (masked ids, mlm_targets, mlm_weights).

    Of the chosen tokens: mask_token_rate become [MASK], random_token_rate a random non-special
    token, the rest stay unchanged. mlm_targets hold the original ids where mlm_weights is 1.
    """
    chosen = choose_masked_positions(
        ids,
        rng,
        special_ids=special_ids,
        mask_rate=mask_rate,
        whole_word=whole_word,
        starts_word=starts_word,
        ends_word=ends_word,
    )
    u = rng.random(ids.shape)
    normal = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids))
    random_ids = normal[rng.integers(0, len(normal), ids.shape)]
    out = np.where(chosen & (u < mask_token_rate), mask_id, ids)
    out = np.where(chosen & (u >= mask_token_rate) & (u < mask_token_rate + random_token_rate), random_ids, out)
    return (out.astype(np.int32), np.where(chosen, ids, 0).astype(np.int32), chosen.astype(np.float32))


def masked_lm(
    tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, rng: np.random.Generator, **mask_kw
) -> dict[str, np.ndarray]:
    """Packed rows [b, L] -> MLM batch: input_ids, attention_mask, segment_ids, positions,
    mlm_targets, mlm_weights. `mask_kw`: see `mask_tokens` (vocab_size, mask_id, special_ids, ...)."""
    input_ids, targets, weights = mask_tokens(tokens, rng, **mask_kw)
    return {
        "input_ids": input_ids,
        "attention_mask": (segment_ids > 0).astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": positions.astype(np.int32),
        "mlm_targets": targets,
        "mlm_weights": weights,
    }


def max_predictions(seq_len: int, mask_rate: float = 0.15) -> int:
    """Most tokens `choose_masked_positions` picks in a row of seq_len: round(rate * n) <= ceil(rate * L)."""
    return max(1, math.ceil(mask_rate * seq_len))


def add_mlm_positions(batch: dict[str, np.ndarray], num_predictions: int) -> dict[str, np.ndarray]:
    """Adds `mlm_positions` [b, num_predictions]: the indices of each row's masked tokens, padded
    with L (out of range). Given them, the MLM head runs on those positions only (BERT's
    masked_lm_positions), which saves most of the vocabulary projection."""
    chosen = batch["mlm_weights"] > 0
    if chosen.sum(1).max(initial=0) > num_predictions:
        raise ValueError(f"a row has {chosen.sum(1).max()} masked tokens, more than {num_predictions}")
    order = np.argsort(~chosen, axis=1, kind="stable")[:, :num_predictions]
    positions = np.where(np.take_along_axis(chosen, order, 1), order, chosen.shape[1])
    return {**batch, "mlm_positions": positions.astype(np.int32)}


# ----------------------------------------------------------------------------- MLM + NSP
def nsp_pairs(
    tokens: np.ndarray, rng: np.random.Generator, *, chunk_len: int, random_tokens, line_ends: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """One document's tokens -> [(A, B, label)]: consecutive segments (A, B) of <= chunk_len tokens;
    with probability 1/2 B is replaced by a segment of `random_tokens(rng)` (the tokens of another
    document, called once per random B: `make_dataset` draws a new document each time, as BERT's
    create_pretraining_data does) and label = 1 ("B is random"), else label = 0 ("B follows A").

    line_ends (optional): bool per token id, True where a token ends a line (its piece holds a
    newline). Given it, segments are cut at line boundaries, as BERT cuts at sentence boundaries:
    each segment is the whole lines that fit in chunk_len tokens (a longer line is cut at chunk_len),
    and a random B starts at a random line start of the other document and is cut the same way, so
    positive and random B look alike (both start a line). Without it, segments are fixed windows of
    chunk_len tokens and a random B is an equally long window starting anywhere.

    A document of <= chunk_len tokens gives one pair (its two halves); shorter than 2: none.
    """
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens)
    if n < 2:
        return []
    if n <= chunk_len:
        chunks = [tokens[: n // 2], tokens[n // 2 :]]
    elif line_ends is None:
        chunks = [tokens[i : i + chunk_len] for i in range(0, n, chunk_len)]
    else:
        starts = _line_starts(tokens, line_ends)
        chunks, i = [], 0
        while i < n:
            j = _segment_end(starts, i, chunk_len, n)
            chunks.append(tokens[i:j])
            i = j
    pairs = [(chunks[i], chunks[i + 1]) for i in range(0, len(chunks) - 1, 2)]
    labels = (rng.random(len(pairs)) < 0.5).astype(np.int32)
    out = []
    for (a, b), label in zip(pairs, labels):
        if label:  # each random B asks random_tokens anew: a fresh document per pair, as BERT
            other = np.asarray(random_tokens(rng), np.int32)
            if line_ends is None:
                start = int(rng.integers(0, max(1, len(other) - len(b) + 1)))
                b = other[start : start + len(b)]
            else:  # a random line start (one that leaves a whole segment, where there is one)
                other_starts = _line_starts(other, line_ends)
                room = other_starts[other_starts <= max(0, len(other) - chunk_len)]
                start = int(room[rng.integers(0, len(room))])
                b = other[start : _segment_end(other_starts, start, chunk_len, len(other))]
            if len(b) == 0:
                continue
        out.append((a, np.asarray(b, np.int32), int(label)))
    return out


def _line_starts(tokens: np.ndarray, line_ends: np.ndarray) -> np.ndarray:
    """The indices at which a line starts: 0 and every index after a line-ending token."""
    ends = np.flatnonzero(np.asarray(line_ends)[tokens])
    return np.concatenate([[0], ends[ends < len(tokens) - 1] + 1]).astype(np.int64)


def _segment_end(starts: np.ndarray, i: int, chunk_len: int, n: int) -> int:
    """The end of the segment from i: the last line start in (i, i + chunk_len], or the end of the
    tokens if they end within chunk_len; i + chunk_len where one line is longer than that."""
    if n - i <= chunk_len:
        return n
    k = np.searchsorted(starts, i + chunk_len, side="right") - 1
    return int(starts[k]) if starts[k] > i else i + chunk_len


def mlm_nsp(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, int]],
    rng: np.random.Generator,
    *,
    seq_len: int,
    batch_size: int | None = None,
    cls_id: int,
    sep_id: int,
    **mask_kw,
) -> dict[str, np.ndarray]:
    """(A, B, label) pairs -> BERT pretraining batch of rows `[CLS] A [SEP] B [SEP] pad...`.

    Outputs input_ids (masked), token_type_ids (0 for [CLS] A [SEP], 1 for B [SEP]),
    attention_mask, positions, mlm_targets, mlm_weights, nsp_labels (0 = B follows A,
    1 = B random, as Hugging Face's BertForPreTraining), nsp_weights (0 on padding rows
    when fewer than batch_size pairs are given). Too long pairs are cut from the end of
    the longer side.
    """
    b = batch_size or len(pairs)
    ids, types, attention_mask = (np.zeros((b, seq_len), np.int32) for _ in range(3))
    labels, nsp_weights = np.zeros((b,), np.int32), np.zeros((b,), np.float32)
    for r, (a_ids, b_ids, label) in enumerate(pairs):
        a, bb = list(a_ids), list(b_ids)
        while len(a) + len(bb) > seq_len - 3:
            (a if len(a) > len(bb) else bb).pop()
        row = [cls_id, *a, sep_id, *bb, sep_id]
        ids[r, : len(row)] = row
        types[r, len(a) + 2 : len(row)] = 1
        attention_mask[r, : len(row)] = 1
        labels[r], nsp_weights[r] = label, 1.0
    input_ids, targets, weights = mask_tokens(ids, rng, **mask_kw)
    return {
        "input_ids": input_ids,
        "token_type_ids": types,
        "attention_mask": attention_mask,
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy(),
        "mlm_targets": targets,
        "mlm_weights": weights,
        "nsp_labels": labels,
        "nsp_weights": nsp_weights,
    }


# ----------------------------------------------------------------------------- T5 span corruption
def random_spans_noise_mask(
    length: int, rng: np.random.Generator, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> np.ndarray:
    """T5's `random_spans_noise_mask` in NumPy: bool [length], True = noise.

    round(length * noise_density) noise tokens in round(noise / mean_span) spans; spans of
    noise and non-noise alternate, starting with non-noise (the sequence ends in noise).
    """
    orig_length = length
    length = max(length, 2)
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_nonnoise = length - num_noise

    def random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
        first_in_segment = np.arange(num_items - 1) < num_segments - 1
        first_in_segment = np.concatenate([[0], rng.permutation(first_in_segment)])
        segment_id = np.cumsum(first_in_segment)
        return np.bincount(segment_id, minlength=num_segments)

    noise_lengths = random_segmentation(num_noise, num_spans)
    nonnoise_lengths = random_segmentation(num_nonnoise, num_spans)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, np.int64)
    indicator[span_starts] = 1
    is_noise = np.cumsum(indicator) % 2 == 1
    return is_noise[:orig_length]


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """T5's `random_spans_helper`: (raw tokens per row, targets length) so that corrupted
    inputs (with sentinels and eos) fill exactly `inputs_length`."""

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def corrupt_spans(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """One sequence -> (inputs, targets): noise span i becomes sentinel i in the inputs; the
    targets are sentinel 0, span 0, sentinel 1, span 1, ...; both end with eos."""
    tokens, noise = np.asarray(tokens), np.asarray(noise_mask, bool)
    span_start = noise & ~np.concatenate([[False], noise[:-1]])
    if span_start.sum() > len(sentinel_ids):
        raise ValueError(f"{span_start.sum()} noise spans but only {len(sentinel_ids)} sentinels")
    sentinels = np.asarray(sentinel_ids)[: span_start.sum()]
    inputs = tokens.copy()
    inputs[span_start] = sentinels
    inputs = inputs[~noise | span_start]
    noise_idx = np.flatnonzero(noise)
    targets = np.insert(tokens[noise_idx], np.flatnonzero(span_start[noise_idx]), sentinels)
    return (np.append(inputs, eos_id).astype(np.int32), np.append(targets, eos_id).astype(np.int32))


def uncorrupt_spans(inputs: Sequence[int], targets: Sequence[int], sentinel_ids: Sequence[int]) -> list[int]:
    """Inverse of `corrupt_spans` (without padding; each ends with its eos): the original tokens."""
    index = {int(s): i for i, s in enumerate(sentinel_ids)}
    spans: list[list[int]] = []
    for t in map(int, targets[:-1]):
        if t in index:
            spans.append([])
        else:
            spans[-1].append(t)
    out: list[int] = []
    for t in map(int, inputs[:-1]):
        out += spans[index[t]] if t in index else [t]
    return out


def span_corruption(
    tokens: np.ndarray,
    segment_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    inputs_length: int,
    targets_length: int,
    sentinel_ids: Sequence[int],
    eos_id: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    pad_id: int = PAD_ID,
) -> dict[str, np.ndarray]:
    """Packed rows [b, raw_length] (see `span_corruption_lengths`) -> T5 batch: input_ids,
    attention_mask, decoder_input_ids (targets shifted right, starting with pad id 0),
    decoder_attention_mask, targets, loss_mask. The row's valid tokens (segment_ids > 0)
    are corrupted as one sequence, as T5 does with concatenated documents."""
    b = tokens.shape[0]
    out: dict[str, np.ndarray] = {
        k: np.full((b, n), pad_id if "ids" in k or k == "targets" else 0, np.int32)
        for k, n in (
            ("input_ids", inputs_length),
            ("attention_mask", inputs_length),
            ("decoder_input_ids", targets_length),
            ("decoder_attention_mask", targets_length),
            ("targets", targets_length),
        )
    }
    loss_mask = np.zeros((b, targets_length), np.float32)
    for r in range(b):
        row = tokens[r][segment_ids[r] > 0]
        if len(row) == 0:
            continue
        noise = random_spans_noise_mask(len(row), rng, noise_density, mean_noise_span_length)
        inputs, targets = corrupt_spans(row, noise, sentinel_ids, eos_id)
        if len(inputs) > inputs_length or len(targets) > targets_length:
            raise ValueError(
                f"row of {len(row)} tokens corrupts to {len(inputs)} inputs / {len(targets)} "
                f"targets, over ({inputs_length}, {targets_length}): use span_corruption_lengths"
            )
        out["input_ids"][r, : len(inputs)] = inputs
        out["attention_mask"][r, : len(inputs)] = 1
        out["targets"][r, : len(targets)] = targets
        out["decoder_input_ids"][r, 1 : len(targets)] = targets[:-1]
        out["decoder_attention_mask"][r, : len(targets)] = 1
        loss_mask[r, : len(targets)] = 1
    out["loss_mask"] = loss_mask
    return out
