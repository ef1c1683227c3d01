"""Batch translation with a trained encoder-decoder, and its scores.

`Translator`: translate lists of strings with beam search (KV cache, cross-attention keys and
values computed once per source) or greedy decoding, on one device or with the parameters
sharded over a mesh. `corpus_scores` gives sacrebleu's detokenized BLEU and chrF;
`evaluate_translation` translates (source, target) pairs and scores them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from transformer_jax.data.parallel import clean


def encode_sources(tokenizer, texts: Sequence[str], source_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, source_len] ids (text, eos; a long text is cut to fit, keeping its eos) and the mask."""
    ids = np.zeros((len(texts), source_len), np.int32)
    for r, text in enumerate(texts):
        row = tokenizer.encode(text)[: source_len - 1] + [tokenizer.eos_id]
        ids[r, : len(row)] = row
    return ids, (ids != 0).astype(np.int32)


def decode_outputs(tokenizer, tokens: np.ndarray) -> list[str]:
    """Generated ids [n, t] -> strings: everything before the first eos (pads dropped)."""
    out = []
    for row in np.asarray(tokens).tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        out.append(tokenizer.decode([i for i in row if i != tokenizer.pad_id]))
    return out


class Translator:
    """Translate lists of strings with a trained encoder-decoder.

        translate = Translator(model, params, tokenizer, source_len=128, max_new_tokens=128)
        translate(["Hello world."])               # beam 4, length penalty 0.6 (the paper's)
        translate(texts, beam_size=1)             # greedy
        translate(texts, temperature=1.0, seed=0) # sampled (back-translation's synthetic sources)

    Texts are sorted by length and decoded in fixed-shape batches of `batch_size` (one compiled
    program; the last batch is padded), with the KV cache; the order of the input is kept.
    Parameters sharded over a mesh (a training run's, on any number of processes) stay there: each
    batch is split over the mesh's batch axes (`batch_size` rounded up to a multiple of their
    size) and every process gets all the translations. Every process must pass the same texts.
    """

    def __init__(
        self,
        model,
        params,
        tokenizer,
        *,
        source_len: int,
        max_new_tokens: int,
        beam_size: int = 4,
        alpha: float = 0.6,
        batch_size: int = 32,
    ):
        if model.cfg.family != "encoder_decoder":
            raise ValueError(f"translation needs an encoder_decoder model, got family {model.cfg.family!r}")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.source_len, self.max_new_tokens = source_len, max_new_tokens
        self.beam_size, self.alpha, self.batch_size = beam_size, alpha, batch_size

    def decode_ids(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        *,
        beam_size: int | None = None,
        params=None,
        temperature: float = 0.0,
        rng=None,
    ) -> np.ndarray:
        from transformer_jax import decoding

        beam = self.beam_size if beam_size is None else beam_size
        params = self.params if params is None else params
        if beam <= 1 or temperature > 0:
            decode = lambda p, i, m: decoding.generate(
                self.model,
                p,
                i,
                m,
                max_new_tokens=self.max_new_tokens,
                rng=rng if temperature > 0 else None,
                temperature=temperature,
                eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id,
            )
        else:
            decode = lambda p, i, m: decoding.beam_search(
                self.model,
                p,
                i,
                m,
                beam_size=beam,
                alpha=self.alpha,
                max_new_tokens=self.max_new_tokens,
                eos_id=self.tokenizer.eos_id,
            )
        return decoding.on_mesh(decode, params, ids, mask)

    def __call__(
        self,
        texts: Iterable[str],
        *,
        beam_size: int | None = None,
        params=None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        """Translations of `texts`, in their order. temperature > 0 samples each token from the model's
        distribution at that temperature (no beam; `seed` fixes the draws) instead of searching for
        the most likely translation: back-translation's sampled synthetic sources (Edunov et al. 2018)."""
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature: must be a finite number >= 0, got {temperature}")
        if temperature > 0 and beam_size is not None and beam_size > 1:
            raise ValueError(f"temperature {temperature} samples: it takes no beam (beam_size {beam_size})")
        texts = [clean(t) for t in texts]
        if not texts:
            return []
        import jax

        from transformer_jax import decoding
        from transformer_jax import sharding as sh

        mesh = decoding.params_mesh(self.params if params is None else params)
        split = 1 if mesh is None else sh.batch_parallel(mesh)
        batch_size = -(-self.batch_size // split) * split
        ids, mask = encode_sources(self.tokenizer, texts, self.source_len)
        order = np.argsort(-mask.sum(axis=1), kind="stable")
        out: list[str] = [""] * len(texts)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            b_ids = np.zeros((batch_size, self.source_len), np.int32)
            b_mask = np.zeros_like(b_ids)
            b_ids[: len(rows)], b_mask[: len(rows)] = ids[rows], mask[rows]
            b_mask[len(rows) :, 0] = 1  # padding rows: one (pad) token, so no row attends to nothing
            rng = jax.random.fold_in(jax.random.key(seed), start) if temperature > 0 else None
            tokens = self.decode_ids(
                b_ids, b_mask, beam_size=beam_size, params=params, temperature=temperature, rng=rng
            )
            for r, text in zip(rows, decode_outputs(self.tokenizer, tokens[: len(rows)])):
                out[int(r)] = text if texts[int(r)] else ""
        return out


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacrebleu's detokenized corpus BLEU (13a tokenization) and chrF, on a 0-100 scale."""
    import sacrebleu

    return {
        "bleu": float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score),
        "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score),
    }


def evaluate_translation(
    translator: Translator,
    pairs: Sequence[tuple[str, str]],
    *,
    params=None,
    beam_size: int | None = None,
    max_examples: int | None = None,
) -> dict[str, Any]:
    """BLEU and chrF of translating the pairs' sources against their targets (pairs: a
    data.parallel.Pairs or any sequence of (source, target))."""
    n = len(pairs) if not max_examples else min(len(pairs), max_examples)
    sources = [pairs[i][0] for i in range(n)]
    references = [pairs[i][1] for i in range(n)]
    hypotheses = translator(sources, beam_size=beam_size, params=params)
    return {**corpus_scores(hypotheses, references), "hypotheses": hypotheses}
