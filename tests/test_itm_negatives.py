"""Edited negatives for ITM (NegCLIP-style, data/images.py's negative_layout): each differs from its
caption in exactly one attribute and is never a paraphrase of it; the pipeline emits the edited
caption and its rendered image deterministically; itm_loss weighs them by their share; the config
refuses them where they cannot be made."""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax import losses
from transformer_jax.config import ConfigError
from transformer_jax.data import images
from transformer_jax.data.tokenizer import Tokenizer, train_sentencepiece

from helpers import REPO


def attributes(layout):
    first, relation, second = layout
    ns = len(images.SHAPES)
    return divmod(first, ns), relation, divmod(second, ns)


def test_negative_layout_changes_one_attribute_and_is_never_a_paraphrase():
    rng = np.random.default_rng(0)
    source = images.shapes_dataset(300)
    kinds = set()
    for i in range(len(source)):
        layout = source[i]["layout"]
        assert images.describe(*layout) == source[i]["captions"][0]
        assert images.layout_id(*layout) == source[i]["pair_id"]
        for _ in range(3):
            negative, kind = images.negative_layout(layout, rng)
            kinds.add(kind)
            assert negative[0] != negative[2]  # two different objects, as every image shows
            assert images.layout_id(*negative) != images.layout_id(*layout)  # shows something else
            assert images.describe(*negative) != images.describe(*layout)
            (c1, s1), rel, (c2, s2) = attributes(layout)
            (n1, t1), nrel, (n2, t2) = attributes(negative)
            changed = [c1 != n1, s1 != t1, rel != nrel, c2 != n2, s2 != t2]
            if kind == "swap":  # the two colours trade places, nothing else moves
                assert (n1, n2, t1, t2, nrel) == (c2, c1, s1, s2, rel) and c1 != c2
            else:
                assert sum(changed) == 1, (layout, negative, kind)
                position = {"colour": (0, 3), "shape": (1, 4), "relation": (2,)}[kind]
                assert any(changed[p] for p in position)
    assert kinds == set(images.NEGATIVE_KINDS)
    # 'A above B' and 'B below A' are one layout: a relation change to 'below' must not swap the objects
    k = len(images.SHAPES)
    assert images.layout_id(0, "below", k) != images.layout_id(0, "above", k)


def test_pipeline_emits_caption_negatives(tmp_path):
    prefix = str(tmp_path / "tok")
    train_sentencepiece(images.caption_corpus(images.shapes_dataset(300)), 512, prefix)
    tok = Tokenizer(prefix + ".model")
    source = images.shapes_dataset(24, image_size=16)
    kw = dict(seq_len=12, image_size=16, batch_size=8, seed=3, caption_negatives=True)
    batch = next(iter(images.make_dataset(source, tok, **kw)))
    again = next(iter(images.make_dataset(source, tok, **kw)))
    for key in ("negative_input_ids", "negative_attention_mask"):
        np.testing.assert_array_equal(batch[key], again[key])
        assert batch[key].shape == (8, 12) and batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["negative_pixels"], again["negative_pixels"])
    assert batch["negative_pixels"].shape == (8, 16, 16, 3) and batch["negative_pixels"].dtype == np.uint8
    assert all(not np.array_equal(a, b) for a, b in zip(batch["pixels"], batch["negative_pixels"]))
    assert (batch["negative_input_ids"][:, 0] == tok.cls_id).all()
    assert all(not np.array_equal(a, b) for a, b in zip(batch["input_ids"], batch["negative_input_ids"]))
    assert "negative_input_ids" not in next(
        iter(images.make_dataset(source, tok, **{**kw, "caption_negatives": False}))
    )
    no_layout = images.ImageCaptions(4, lambda i: {k: v for k, v in source[i].items() if k != "layout"}, "plain")
    with pytest.raises(ValueError, match="caption negatives need the shapes dataset's layouts"):
        next(iter(images.make_dataset(no_layout, tok, **{**kw, "batch_size": 2})))


def test_itm_loss_weighs_edited_negatives_by_their_share():
    # yes - no per row; b = 2: rows 0-1 positives, 2-3 text, 4-5 image, 6-7 edited-caption, 8-9 edited-image negatives
    d = [2.0, -1.0, -3.0, 1.5, -0.5, 1.0, 0.25, -2.0, 0.5, -1.5]
    logits = jnp.array([[0.0, x] for x in d])
    nll_pos = lambda x: math.log(1 + math.exp(-x))
    nll_neg = lambda x: math.log(1 + math.exp(x))
    share = 0.6
    has = jnp.array([True, True])
    loss, aux = losses.itm_loss(logits, jnp.ones(2), has, has, has, share)
    rest = (1 - share) / 2  # each text and image negative; each edited one share / 2
    negatives = rest * sum(nll_neg(x) for x in d[2:6]) + share / 2 * sum(nll_neg(x) for x in d[6:])
    expected = (nll_pos(d[0]) + nll_pos(d[1]) + negatives) / (2 + 4 * rest + 4 * share / 2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # each negative group rejects one of its two (yes <= no): balanced negative accuracy 1/2
    assert float(aux["itm_negative_accuracy"]) == pytest.approx(0.5)
    assert float(aux["itm_positive_accuracy"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["itm.caption_negatives=1.0"], r"itm\.caption_negatives: must be in \[0, 1\), got 1\.0"),
        (["itm.itc_caption_negatives=true"], r"itm\.itc_caption_negatives: needs itm\.caption_negatives > 0"),
        (["itm.caption_negatives=-0.1"], r"itm\.caption_negatives: must be in \[0, 1\)"),
        (
            ["itm.caption_negatives=0.3", "data.source=tfds", "data.tfds_name=coco_captions"],
            r"itm\.caption_negatives: caption negatives need .* the embedded shapes data",
        ),
    ],
)
def test_caption_negative_config_mistakes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load_config(os.path.join(REPO, "configs", "itm_tiny.yaml"), overrides)


def test_held_out_edited_captions_are_fixed_and_name_their_edit(tmp_path):
    prefix = str(tmp_path / "tok")
    train_sentencepiece(images.caption_corpus(images.shapes_dataset(300)), 512, prefix)
    tok = Tokenizer(prefix + ".model")
    source = images.shapes_dataset(64, image_size=16, split="eval")
    edited = images.edited_captions(source, tok, seq_len=12)
    assert edited is not None
    again = images.edited_captions(source, tok, seq_len=12)
    assert again is not None
    for key in edited:
        np.testing.assert_array_equal(edited[key], again[key])
    assert set(edited["negative_kind"].tolist()) == set(range(len(images.NEGATIVE_KINDS)))
    rng = np.random.default_rng(0)  # the same draws, one example at a time
    for i in range(len(source)):
        negative, kind = images.negative_layout(source[i]["layout"], rng)
        assert images.NEGATIVE_KINDS[edited["negative_kind"][i]] == kind
        ids, _ = images.encode_caption(tok, images.describe(*negative), 12)
        np.testing.assert_array_equal(edited["negative_input_ids"][i], ids)
    no_layout = images.ImageCaptions(4, lambda i: {k: v for k, v in source[i].items() if k != "layout"}, "plain")
    assert images.edited_captions(no_layout, tok, seq_len=12) is None


def test_itc_extra_negative_text_enters_the_image_softmax_only():
    logits = jnp.array([[3.0, 1.0], [0.5, 2.0]])
    pair = jnp.array([0, 1])
    base, _ = losses.itc_loss(logits, pair)
    same, _ = losses.itc_loss(logits, pair, extra_text_logits=jnp.array([-jnp.inf, -jnp.inf]))
    assert float(same) == pytest.approx(float(base), rel=1e-6)
    extra = jnp.array([2.5, 1.0])
    loss, aux = losses.itc_loss(logits, pair, extra_text_logits=extra)
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))
    i2t = [lse(3.0, 1.0, 2.5) - 3.0, lse(0.5, 2.0, 1.0) - 2.0]  # image -> text: one more text each
    t2i = [lse(3.0, 0.5) - 3.0, lse(1.0, 2.0) - 2.0]  # text -> image: unchanged
    assert float(loss) == pytest.approx((sum(i2t) + sum(t2i)) / 4, rel=1e-6)
    assert float(aux["itc_accuracy"]) == 1.0
