"""Objective batch builders on synthetic token ids (no tokenizer needed)."""

import numpy as np
import pytest

from transformer_jax import objectives as obj
from transformer_jax import tasks

VOCAB = 1000
PAD, EOS, CLS, SEP, MASK = 0, 1, 4, 5, 6
SENTINELS = np.arange(7, 107)
SPECIAL = np.concatenate([[0, 1, 2, 3, 4, 5, 6], SENTINELS])
MASK_KW = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)


def _ids(rng, shape, special_rate=0.1):
    ids = rng.integers(200, VOCAB, shape)
    special = rng.random(shape) < special_rate
    return np.where(special, rng.choice([EOS, CLS, SEP, PAD], shape), ids).astype(np.int32)


# ----------------------------------------------------------------------------- causal LM
def test_causal_lm_targets_and_boundary_mask():
    tokens = np.array([[10, 11, 12, EOS, 20, 21, EOS, 30, 0, 0]])
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 0, 0]])
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0]])
    b = obj.causal_lm(tokens, seg, pos)
    np.testing.assert_array_equal(b["input_ids"], tokens[:, :-1])
    np.testing.assert_array_equal(b["targets"], tokens[:, 1:])
    # 10->11, 11->12, 12->EOS ok; EOS->20 crosses; 20->21, 21->EOS ok; EOS->30 crosses; 30->pad, pads: 0.
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["segment_ids"], seg[:, :-1])
    np.testing.assert_array_equal(b["positions"], pos[:, :-1])
    assert b["loss_mask"].dtype == np.float32 and b["input_ids"].dtype == np.int32


# ----------------------------------------------------------------------------- masked LM
def test_mlm_rates_and_special_tokens_never_masked():
    rng = np.random.default_rng(0)
    ids = _ids(rng, (512, 128))
    out, targets, weights = obj.mask_tokens(ids, np.random.default_rng(1), **MASK_KW)
    special = np.isin(ids, SPECIAL)
    chosen = weights > 0
    assert not np.any(chosen & special)
    np.testing.assert_array_equal(out[special], ids[special])
    # Exactly round(15%) of each row's non-special tokens.
    np.testing.assert_array_equal(chosen.sum(1), np.maximum(1, np.round((~special).sum(1) * 0.15)))
    np.testing.assert_array_equal(targets[chosen], ids[chosen])
    assert np.all(targets[~chosen] == 0)
    n = chosen.sum()
    frac_mask = (out[chosen] == MASK).mean()
    frac_same = (out[chosen] == ids[chosen]).mean()
    frac_random = 1 - frac_mask - frac_same
    # 3 standard deviations on ~9,000 draws.
    assert abs(frac_mask - 0.8) < 3 * np.sqrt(0.16 / n), frac_mask
    assert abs(frac_same - 0.1) < 3 * np.sqrt(0.09 / n) + 1e-3, frac_same
    assert abs(frac_random - 0.1) < 3 * np.sqrt(0.09 / n) + 1e-3, frac_random
    # Random replacements are never special tokens, and unchosen tokens never change.
    assert not np.any(np.isin(out[chosen & (out != MASK) & (out != ids)], SPECIAL))
    np.testing.assert_array_equal(out[~chosen], ids[~chosen])


def test_mlm_deterministic_given_generator():
    ids = _ids(np.random.default_rng(0), (8, 64))
    a = obj.mask_tokens(ids, np.random.default_rng(5), **MASK_KW)
    b = obj.mask_tokens(ids, np.random.default_rng(5), **MASK_KW)
    c = obj.mask_tokens(ids, np.random.default_rng(6), **MASK_KW)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])


def test_whole_word_masking_masks_whole_words():
    rng = np.random.default_rng(0)
    starts_word = np.zeros(VOCAB, bool)
    starts_word[200:600] = True  # ids 200..599 start a word ('▁x'), 600.. continue one
    starts_word[SPECIAL] = True
    ends_word = np.zeros(VOCAB, bool)
    ends_word[SPECIAL] = True
    ids = _ids(rng, (256, 128), special_rate=0.05)
    _, _, weights = obj.mask_tokens(
        ids, np.random.default_rng(2), whole_word=True, starts_word=starts_word, ends_word=ends_word, **MASK_KW
    )
    chosen = weights > 0
    cand = ~np.isin(ids, SPECIAL)
    starts = obj.word_starts(ids, cand, starts_word, ends_word)
    for r in range(ids.shape[0]):
        word = np.cumsum(starts[r])
        for w in np.unique(word[cand[r]]):
            sel = chosen[r][cand[r] & (word == w)]
            assert sel.all() or not sel.any(), (r, w)  # all of a word or none of it
    assert not np.any(chosen & ~cand)
    rate = chosen.sum() / cand.sum()
    assert 0.12 < rate <= 0.15 + 1e-9, rate
    assert np.all(chosen.sum(1) <= np.maximum(1, np.round(cand.sum(1) * 0.15)))


def test_masked_lm_batch_keys():
    rng = np.random.default_rng(0)
    tokens = _ids(rng, (4, 32), special_rate=0.0)
    seg = np.ones_like(tokens)
    seg[:, 20:] = 2
    seg[0, 28:] = 0
    tokens[0, 28:] = PAD
    b = obj.masked_lm(tokens, seg, np.zeros_like(tokens), np.random.default_rng(0), **MASK_KW)
    assert set(b) == {"input_ids", "attention_mask", "segment_ids", "positions", "mlm_targets", "mlm_weights"}
    np.testing.assert_array_equal(b["attention_mask"], seg > 0)
    assert np.all(b["mlm_weights"][0, 28:] == 0)


# ----------------------------------------------------------------------------- NSP
def test_nsp_pairs_follow_or_random():
    doc = np.arange(1000, 1300)
    other = np.arange(5000, 5100)
    pairs = []
    for s in range(40):
        pairs += obj.nsp_pairs(doc, np.random.default_rng(s), chunk_len=30, random_tokens=lambda _: other)
    labels = np.array([p[2] for p in pairs])
    assert len(pairs) == 40 * 5
    assert abs(labels.mean() - 0.5) < 0.1
    for a, b, label in pairs:
        assert len(a) == 30 and np.all(np.diff(a) == 1) and a[0] >= 1000
        if label == 0:  # B is the chunk right after A
            np.testing.assert_array_equal(b, np.arange(a[-1] + 1, a[-1] + 1 + len(b)))
        else:  # B comes from the other document
            assert np.all(b >= 5000) and len(b) == 30
    assert obj.nsp_pairs(np.array([7]), np.random.default_rng(0), chunk_len=30, random_tokens=None) == []
    ((a, b, _),) = obj.nsp_pairs(
        np.arange(10, 20), np.random.default_rng(1), chunk_len=30, random_tokens=lambda _: other
    )
    np.testing.assert_array_equal(a, np.arange(10, 15))


def test_nsp_pairs_cut_at_line_boundaries():
    """With line_ends, A and B are whole lines (<= chunk_len tokens) and a random B starts at a line
    start of the other document, as a positive B does: no boundary cue tells them apart."""
    line_ends = np.zeros(6000, bool)
    line_ends[[999, 4999]] = True  # token 999 / 4999 ends a line
    rng = np.random.default_rng(0)
    doc = np.array([t for i in range(60) for t in [*range(1000, 1000 + 3 + i % 5), 999]])  # lines of 4-8 tokens
    other = np.array([t for i in range(40) for t in [*range(5000, 5000 + 2 + i % 6), 4999]])
    starts = {tuple(doc[i + 1 : i + 3]) for i in np.flatnonzero(doc == 999)} | {tuple(doc[:2])}
    other_starts = {tuple(other[i + 1 : i + 3]) for i in np.flatnonzero(other == 4999)} | {tuple(other[:2])}
    pairs = []
    for s in range(20):
        pairs += obj.nsp_pairs(
            doc, np.random.default_rng(s), chunk_len=20, random_tokens=lambda _: other, line_ends=line_ends
        )
    labels = np.array([p[2] for p in pairs])
    assert 0.3 < labels.mean() < 0.7
    for a, b, label in pairs:
        assert 0 < len(a) <= 20 and 0 < len(b) <= 20
        assert a[-1] == 999 and tuple(a[:2]) in starts  # A: whole lines
        if label == 0:
            assert tuple(b[:2]) in starts and b[-1] in (999, doc[-1])
            i = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(doc, len(a)) == a, 1))[0])
            np.testing.assert_array_equal(b, doc[i + len(a) : i + len(a) + len(b)])  # B follows A
        else:
            assert np.all(b >= 4999) and tuple(b[:2]) in other_starts and b[-1] == 4999
            assert len(b) > 20 - 8  # filled with whole lines
    # one line longer than chunk_len is cut at chunk_len
    (a, b, _), *_ = obj.nsp_pairs(
        np.arange(1000, 1100), rng, chunk_len=30, random_tokens=lambda _: other, line_ends=line_ends
    )
    assert len(a) == 30


def test_nsp_pairs_draw_a_document_per_random_b():
    """random_tokens is asked once per random B, so one document's negatives come from many
    documents (with one per document, a small model learns which documents go together)."""
    calls = []

    def random_tokens(rng):
        calls.append(int(rng.integers(0, 100)))
        return np.full(200, 10_000 + calls[-1])

    pairs = obj.nsp_pairs(np.arange(1000, 1600), np.random.default_rng(0), chunk_len=30, random_tokens=random_tokens)
    randoms = [b for _, b, label in pairs if label]
    assert len(calls) == len(randoms) >= 3
    assert [int(b[0]) for b in randoms] == [10_000 + c for c in calls] and len(set(calls)) > 1


def test_mlm_nsp_layout():
    rng = np.random.default_rng(0)
    pairs = [
        (np.arange(200, 200 + la), np.arange(400, 400 + lb), i % 2)
        for i, (la, lb) in enumerate([(5, 7), (30, 40), (3, 1)])
    ]
    b = obj.mlm_nsp(pairs, rng, seq_len=32, batch_size=4, cls_id=CLS, sep_id=SEP, **MASK_KW)
    for key in ("input_ids", "token_type_ids", "attention_mask", "positions", "mlm_targets", "mlm_weights"):
        assert b[key].shape == (4, 32)
    np.testing.assert_array_equal(b["nsp_labels"], [0, 1, 0, 0])
    np.testing.assert_array_equal(b["nsp_weights"], [1, 1, 1, 0])
    # Row 0: [CLS] a*5 [SEP] b*7 [SEP] pad...
    ids = np.where(b["mlm_weights"] > 0, b["mlm_targets"], b["input_ids"])  # undo the masking
    np.testing.assert_array_equal(ids[0, :15], [CLS, *range(200, 205), SEP, *range(400, 407), SEP])
    np.testing.assert_array_equal(b["token_type_ids"][0, :16], [0] * 7 + [1] * 8 + [0])
    np.testing.assert_array_equal(b["attention_mask"][0], [1] * 15 + [0] * 17)
    # Row 1 is cut to 32 tokens, from the longer side first: 14 of A, 15 of B.
    assert b["attention_mask"][1].sum() == 32 and ids[1, 0] == CLS and ids[1, -1] == SEP
    assert np.sum(ids[1] == SEP) == 2 and b["token_type_ids"][1].sum() == 15
    assert np.all(b["input_ids"][3] == 0) and np.all(b["mlm_weights"][3] == 0)
    # Special tokens are never masked.
    assert not np.any((b["mlm_weights"] > 0) & np.isin(ids, SPECIAL))


# ----------------------------------------------------------------------------- span corruption
def test_t5_lengths():
    assert obj.span_corruption_lengths(512) == (568, 114)  # T5's numbers
    assert obj.span_corruption_lengths(128) == (141, 29)  # 141 - 21 noise + 7 sentinels + eos = 128


def test_random_spans_noise_mask_density_and_spans():
    rng = np.random.default_rng(0)
    for length in (20, 100, 568, 1000):
        m = obj.random_spans_noise_mask(length, rng)
        assert m.sum() == round(length * 0.15)
        starts = m & ~np.concatenate([[False], m[:-1]])
        assert starts.sum() == max(1, round(round(length * 0.15) / 3))
        assert not m[0] and m[-1]  # non-noise first, noise last (T5)
    many = np.concatenate([obj.random_spans_noise_mask(568, rng) for _ in range(200)])
    assert abs(many.mean() - 0.15) < 0.005
    spans = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], many.astype(int), [0]]))))[::2]
    assert abs(spans.mean() - 3.0) < 0.2


def test_span_corruption_reconstructs_and_orders_sentinels():
    rng = np.random.default_rng(0)
    raw, tlen = obj.span_corruption_lengths(64)
    tokens = rng.integers(200, VOCAB, (16, raw))
    seg = np.ones_like(tokens)
    seg[3, 40:] = 0  # a short last row (padding)
    tokens[3, 40:] = PAD
    b = obj.span_corruption(
        tokens, seg, np.random.default_rng(1), inputs_length=64, targets_length=tlen, sentinel_ids=SENTINELS, eos_id=EOS
    )
    assert b["input_ids"].shape == (16, 64) and b["targets"].shape == (16, tlen)
    for r in range(16):
        n_in, n_tg = b["attention_mask"][r].sum(), int(b["loss_mask"][r].sum())
        inputs, targets = b["input_ids"][r, :n_in], b["targets"][r, :n_tg]
        assert inputs[-1] == EOS and targets[-1] == EOS
        original = tokens[r][seg[r] > 0]
        assert obj.uncorrupt_spans(inputs, targets, SENTINELS) == list(original)
        k = np.isin(inputs, SENTINELS).sum()
        np.testing.assert_array_equal(inputs[np.isin(inputs, SENTINELS)], SENTINELS[:k])
        np.testing.assert_array_equal(targets[np.isin(targets, SENTINELS)], SENTINELS[:k])
        assert targets[0] == SENTINELS[0]
        assert n_tg - 1 - k == round(len(original) * 0.15)  # 15% noise
        if r != 3:
            assert n_in == 64  # full rows fill the inputs exactly
        np.testing.assert_array_equal(b["decoder_input_ids"][r, :n_tg], np.concatenate([[0], targets[:-1]]))
        np.testing.assert_array_equal(b["decoder_attention_mask"][r], b["loss_mask"][r])
        assert np.all(b["targets"][r, n_tg:] == 0) and np.all(b["input_ids"][r, n_in:] == 0)


def test_span_corruption_too_many_spans_raises():
    with pytest.raises(ValueError, match="sentinels"):
        obj.corrupt_spans(np.arange(100), np.arange(100) % 2 == 1, SENTINELS[:3], EOS)


# ----------------------------------------------------------------------------- which losses
@pytest.mark.slow
def test_objective_specs_and_loss():
    import jax.numpy as jnp

    assert tasks.get("span_corruption").family == "encoder_decoder"
    with pytest.raises(ValueError, match="unknown objective"):
        tasks.get("nope")

    class Out:
        logits = jnp.zeros((2, 4, 10))
        heads = {"nsp": jnp.zeros((2, 2))}

    batch = {
        "mlm_targets": np.zeros((2, 4), np.int32),
        "mlm_weights": np.ones((2, 4), np.float32),
        "nsp_labels": np.zeros(2, np.int32),
        "nsp_weights": np.ones(2, np.float32),
        "input_ids": np.zeros((2, 4), np.int32),
        "attention_mask": np.ones((2, 4), np.int32),
    }
    loss, metrics = tasks.get("mlm_nsp").loss(Out(), batch)
    np.testing.assert_allclose(loss, np.log(10) + np.log(2), rtol=1e-6)
    np.testing.assert_allclose(metrics["nsp_loss"], np.log(2), rtol=1e-6)
    assert set(tasks.get("mlm_nsp").inputs(batch)) == {"input_ids", "attention_mask"}


@pytest.mark.slow
def test_mlm_positions_list_every_masked_token_and_give_the_dense_loss():
    import jax

    import transformer_jax as tj

    rng = np.random.default_rng(3)
    ids = _ids(rng, (6, 40))
    seg = np.ones_like(ids)
    seg[0, 30:] = 0  # a padded row
    batch = obj.masked_lm(ids, seg, np.broadcast_to(np.arange(40), ids.shape), np.random.default_rng(4), **MASK_KW)
    p = obj.max_predictions(40)
    gathered = obj.add_mlm_positions(batch, p)
    positions = gathered["mlm_positions"]
    assert positions.shape == (6, p) and p == 6
    for row in range(6):  # the masked tokens in order, then padding (index 40, out of range)
        masked = np.flatnonzero(batch["mlm_weights"][row])
        np.testing.assert_array_equal(positions[row, : len(masked)], masked)
        assert np.all(positions[row, len(masked) :] == 40)
    with pytest.raises(ValueError, match="more than 2"):
        obj.add_mlm_positions(batch, 2)

    cfg = tj.load_config("configs/bert_tiny.yaml", ["model.vocab_size=1000", "model.num_layers=1", "model.heads=[mlm]"])
    model, params = tj.build(cfg, rng=jax.random.key(0))
    inputs = tasks.get("mlm").inputs(gathered)
    out = model.apply(params, **inputs)
    assert out.logits.shape == (6, p, 1024)  # vocab 1000 padded to a multiple of 128
    dense_loss, dense = tasks.get("mlm").loss(model.apply(params, **tasks.get("mlm").inputs(batch)), batch)
    sparse_loss, sparse = tasks.get("mlm").loss(out, gathered)
    np.testing.assert_allclose(sparse_loss, dense_loss, rtol=1e-5)
    np.testing.assert_allclose(sparse["mlm_weight"], batch["mlm_weights"].sum())
