"""Back-translation in translation (train/back_translation.py, the back_translation row): the split into
parallel pairs and German-only text, the reversed pairs, the Translator's sampled decoding that makes
the sampled synthetic sources (seeded; at a temperature near 0 it is greedy), and the refusals.
Whether back-translation helps is a bench figure: `python -m train.results --row back_translation`."""

from __future__ import annotations

import numpy as np
import pytest

from train import back_translation
from transformer_jax.config import ModelConfig
from transformer_jax.data import parallel
from transformer_jax.models import build
from transformer_jax.translation import Translator


def pairs(n: int) -> parallel.Pairs:
    return parallel.from_lists([f"source {i}" for i in range(n)], [f"ziel {i}" for i in range(n)])


def test_split_monolingual_is_a_seeded_partition():
    train = pairs(50)
    par, mono = back_translation.split_monolingual(train, 20, seed=0)
    assert len(par) == 20 and len(mono) == 30
    assert sorted(par.sources + mono.sources) == sorted(train.sources)  # every pair once
    assert all(s.split()[1] == t.split()[1] for s, t in zip(mono.sources, mono.targets))  # still aligned
    again, _ = back_translation.split_monolingual(train, 20, seed=0)
    other, _ = back_translation.split_monolingual(train, 20, seed=1)
    assert again.sources == par.sources and other.sources != par.sources
    rev = back_translation.reversed_pairs(par, "de-en")
    assert rev.sources == par.targets and rev.targets == par.sources
    for bad in (0, 50):
        with pytest.raises(ValueError, match="parallel: must be between 1 and 49"):
            back_translation.split_monolingual(train, bad, seed=0)


def test_measure_refuses_bad_options_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="decodings: unknown 'nucleus'"):
        back_translation.measure(str(tmp_path / "w"), 0, steps=10, num_parallel=300, decodings=("nucleus",))
    with pytest.raises(ValueError, match="synthetic: must be >= 0"):
        back_translation.measure(str(tmp_path / "w"), 0, steps=10, num_parallel=300, synthetic=-1)
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    from transformer_jax.data.tokenizer import train_sentencepiece

    words = "null eins zwei drei vier fuenf sechs sieben acht neun zero one two three four five six".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(2 + i % 4)) for i in range(200)]
    tok = train_sentencepiece(texts, 400, str(tmp_path_factory.mktemp("tok") / "tokenizer"), num_sentinels=0)
    cfg = ModelConfig(
        family="encoder_decoder",
        vocab_size=tok.vocab_size,
        model_dim=32,
        num_heads=4,
        mlp_dim=64,
        num_layers=1,
        position="sinusoidal",
        init_std=0.3,
    )
    model, params = build(cfg, 0)
    return Translator(model, params, tok, source_len=12, max_new_tokens=8, batch_size=8), texts[:8]


@pytest.mark.slow
def test_sampled_translations_are_seeded_and_greedy_near_temperature_zero(translator):
    translate, texts = translator
    greedy = translate(texts, beam_size=1)
    sampled = translate(texts, temperature=1.0, seed=0)
    assert translate(texts, temperature=1.0, seed=0) == sampled  # the seed fixes the draws
    assert translate(texts, temperature=1.0, seed=1) != sampled
    assert sampled != greedy  # a random model's distribution is wide: sampling leaves the argmax
    assert translate(texts, temperature=1e-4, seed=3) == greedy  # all the mass on the argmax
    with pytest.raises(ValueError, match="takes no beam"):
        translate(texts, temperature=1.0, beam_size=4)
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="temperature: must be a finite number >= 0"):
            translate(texts, temperature=bad)


def test_noised_beam_drops_blanks_and_swaps_locally():
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(40))
    assert back_translation.noised(text, rng, p_drop=0.0, p_blank=0.0, swap=0) == text
    assert back_translation.noised(text, rng, p_drop=1.0) == ""
    assert set(back_translation.noised(text, rng, p_drop=0.0, p_blank=1.0, swap=0).split()) == {back_translation.FILLER}
    words = back_translation.noised(text, rng, p_drop=0.0, p_blank=0.0).split()
    assert sorted(words) == sorted(text.split()) and words != text.split()  # a permutation, not the identity
    assert all(abs(int(w[1:]) - i) <= 3 for i, w in enumerate(words))  # no word moved more than 3 places
    dropped = back_translation.noised(text, rng).split()
    assert 20 < len(dropped) < 40 and back_translation.FILLER in dropped


def test_the_mix_upsamples_tags_and_drops_memorised_sources():
    par = pairs(3)
    sources = ["source 1", "new a", "", "new b"]  # memorised, fresh, empty (left out), fresh
    german = ["de 0", "de 1", "de 2", "de 3"]
    plain = back_translation.mixed(par, sources, german, upsample=1, tag=False, drop_memorised=False)
    assert plain.sources == par.sources + ["source 1", "new a", "new b"]
    assert plain.targets == par.targets + ["de 0", "de 1", "de 3"]
    mix = back_translation.mixed(par, sources, german, upsample=2, tag=True, drop_memorised=True)
    tag = back_translation.TAG
    assert mix.sources == par.sources * 2 + [f"{tag} new a", f"{tag} new b"]
    assert mix.targets == par.targets * 2 + ["de 1", "de 3"]
    with pytest.raises(ValueError, match="upsample: must be >= 1"):
        back_translation.measure("/nonexistent/w", 0, steps=10, num_parallel=300, upsample=0)
