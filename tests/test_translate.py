"""Machine translation: parallel-text sources (gettext catalogs, a TFDS TranslateFolder, TSV and
line-aligned files, TFDS wmt through mock_data), the packed pipeline, beam search with the KV cache
against the uncached reference (identity; its speed is a bench figure, train.translate.bench_decoding),
and train.translate end to end through the shared train loop (BLEU / chrF logged, equal to sacrebleu's
on the eval's own translations; batch translation from a file and stdin; clear errors).
No downloads. BLEU after real training is a bench figure: `python -m train.translate --bench N`."""

from __future__ import annotations

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from transformer_jax import decoding
from transformer_jax.config import ConfigError, ModelConfig, load_config
from transformer_jax.data import parallel
from transformer_jax.models import build
from transformer_jax.tasks import translation

from helpers import REPO, run_main, run_program

EN = "zero one two three four five six seven eight nine".split()
DE = "null eins zwei drei vier fuenf sechs sieben acht neun".split()


def synthetic_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Digit words, English -> German, word for word: learnable, deterministic."""
    rng = np.random.default_rng(seed)
    src, tgt = [], []
    for _ in range(n):
        words = rng.integers(0, 10, size=rng.integers(2, 6))
        src.append(" ".join(EN[w] for w in words) + ".")
        tgt.append(" ".join(DE[w] for w in words) + ".")
    return src, tgt


def write_translate_folder(root, splits=(("train", 160), ("validation", 16))) -> str:
    os.makedirs(root, exist_ok=True)
    for i, (split, n) in enumerate(splits):
        src, tgt = synthetic_pairs(n, seed=i)
        for lang, lines in (("en", src), ("de", tgt)):
            with open(os.path.join(root, f"{lang}.{split}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
    return str(root)


# ----------------------------------------------------------------------------- sources
PO = textwrap.dedent(r"""
    # header
    msgid ""
    msgstr ""
    "Content-Type: text/plain; charset=UTF-8\n"

    msgid "Save"
    msgstr "Speichern"

    #, fuzzy
    msgid "Delete"
    msgstr "Wrong guess"

    #: somewhere.py:12
    msgid ""
    "Enter a valid "
    "email address."
    msgstr "Geben Sie eine gültige E-Mail-Adresse ein."

    msgid "%(count)d file"
    msgid_plural "%(count)d files"
    msgstr[0] "%(count)d Datei"
    msgstr[1] "%(count)d Dateien"

    msgid "Untranslated"
    msgstr ""

    #~ msgid "Old"
    #~ msgstr "Alt"
""")


def test_gettext_catalogs_of_an_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    (pkg / "locale" / "de" / "LC_MESSAGES").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "locale" / "de" / "LC_MESSAGES" / "django.po").write_text(PO, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    pairs = parallel.gettext_pairs("en", "de", packages=("fakepkg", "not_installed_pkg"))
    assert sorted(pairs) == sorted(
        [
            ("Save", "Speichern"),
            ("Enter a valid email address.", "Geben Sie eine gültige E-Mail-Adresse ein."),
            ("%(count)d file", "%(count)d Datei"),
            ("%(count)d files", "%(count)d Dateien"),
        ]
    )  # no fuzzy/obsolete/empty
    reverse = parallel.gettext_pairs("de", "en", packages=("fakepkg",))
    assert ("Speichern", "Save") in list(reverse)
    with pytest.raises(ValueError, match="no gettext catalogs for en->fr"):
        parallel.gettext_pairs("en", "fr", packages=("fakepkg",))


def test_local_parallel_folder_tsv_and_aligned_files(tmp_path):
    root = write_translate_folder(tmp_path / "folder")
    train = parallel.local_pairs(root, split="train")  # through tfds.folder_dataset.TranslateFolder
    dev = parallel.local_pairs(root, split="validation")
    src, tgt = synthetic_pairs(160)
    assert len(train) == 160 and len(dev) == 16
    assert sorted(train) == sorted(zip(src, tgt))
    assert sorted(parallel.local_pairs(root, split="train", source_lang="de", target_lang="en")) == sorted(
        zip(tgt, src)
    )
    with pytest.raises(ValueError, match="no split 'test'"):
        parallel.local_pairs(root, split="test")
    with pytest.raises(ValueError, match="no language 'fr'"):
        parallel.local_pairs(root, split="train", target_lang="fr")

    (tmp_path / "p.tsv").write_text("hello\thallo\n\nworld\twelt\textra\n")
    assert list(parallel.local_pairs(str(tmp_path / "p.tsv"))) == [("hello", "hallo"), ("world", "welt")]
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        parallel.local_pairs(str(tmp_path / "bad.tsv"))
    (tmp_path / "c.en").write_text("a\nb\n")
    (tmp_path / "c.de").write_text("A\nB\n")
    assert list(parallel.local_pairs(str(tmp_path / "c"))) == [("a", "A"), ("b", "B")]
    (tmp_path / "c.de").write_text("A\n")
    with pytest.raises(ValueError, match="2 lines but"):
        parallel.local_pairs(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="no parallel text"):
        parallel.local_pairs(str(tmp_path / "missing"))


tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name", ["wmt14_translate/de-en", "wmt17_translate/de-en"])
def test_tfds_wmt_through_mock_data(tmp_path, name):
    cfg = load_config(
        os.path.join(REPO, "configs", "transformer_base_wmt.yaml"),
        [f"data.tfds_name={name}", f"data.data_dir={tmp_path}"],
    )
    with tfds.testing.mock_data(num_examples=12):
        train, dev = translation.load_pairs(cfg)
        assert len(train) == 12 and len(dev) == 12
        src, tgt = train[3]
        assert isinstance(src, str) and isinstance(tgt, str) and src and tgt and src != tgt
    with pytest.raises(ValueError, match="not prepared"):  # without the mock: nothing there, no download
        translation.load_pairs(cfg)


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformer_jax.data.tokenizer import train_sentencepiece

    src, tgt = synthetic_pairs(200)
    return train_sentencepiece(src + tgt, 400, str(tmp_path_factory.mktemp("tok") / "tokenizer"), num_sentinels=0)


def test_packed_batches_keep_pairs_apart_and_shift_per_segment(tok):
    pairs = parallel.from_lists(*synthetic_pairs(40))
    ds = parallel.make_dataset(pairs, tok, source_len=32, target_len=32, batch_size=4, seed=0)
    b = next(iter(ds))
    assert b["input_ids"].shape == (4, 32) and b["decoder_input_ids"].shape == (4, 32)
    assert b["segment_ids"].max() >= 2  # several pairs share a row
    for r in range(4):
        seg, dseg = b["segment_ids"][r], b["decoder_segment_ids"][r]
        assert set(seg[seg > 0]) == set(dseg[dseg > 0])  # each pair's source and target in the same row
        for s in set(dseg[dseg > 0]):
            at = np.where(dseg == s)[0]
            t, d = b["targets"][r, at], b["decoder_input_ids"][r, at]
            assert d[0] == 0 and list(d[1:]) == list(t[:-1]) and t[-1] == tok.eos_id  # shifted within the pair
            assert list(b["decoder_positions"][r, at]) == list(range(len(at)))
            src = b["input_ids"][r, seg == s]
            text = tok.decode(src[:-1])
            assert text in pairs.sources and tok.decode(t[:-1]) == pairs.targets[pairs.sources.index(text)]
    again = next(iter(parallel.make_dataset(pairs, tok, source_len=32, target_len=32, batch_size=4, seed=0)))
    assert all(np.array_equal(b[k], again[k]) for k in b)  # deterministic


# ----------------------------------------------------------------------------- the KV cache
def _tiny(family, scan=False, **kw):
    cfg = ModelConfig(
        family=family,
        vocab_size=64,
        model_dim=32,
        num_heads=4,
        mlp_dim=64,
        num_layers=2,
        position="sinusoidal",
        init_std=0.3,
        scan_layers=scan,
        **kw,
    )
    return build(cfg, 0)


@pytest.mark.parametrize("family,scan", [("encoder_decoder", False), ("encoder_decoder", True), ("decoder", False)])
@pytest.mark.slow
def test_cached_beam_search_identical_to_uncached(family, scan):
    model, params = _tiny(family, scan)
    ids = jax.random.randint(jax.random.key(1), (3, 7), 3, 64)
    mask = jnp.ones_like(ids).at[1, 5:].set(0) if family == "encoder_decoder" else jnp.ones_like(ids).at[1, :2].set(0)
    kw = dict(max_new_tokens=10, eos_id=5)
    cached = decoding.beam_search(model, params, ids, mask, beam_size=3, return_all=True, **kw)
    uncached = decoding.beam_search(model, params, ids, mask, beam_size=3, return_all=True, use_cache=False, **kw)
    np.testing.assert_array_equal(cached[0], uncached[0])
    np.testing.assert_allclose(cached[1], uncached[1], rtol=1e-5, atol=1e-5)
    assert len(np.unique(np.asarray(cached[0]))) >= 3  # not a degenerate constant output
    if not scan:
        greedy = decoding.generate(model, params, ids, mask, **kw)
        np.testing.assert_array_equal(greedy, decoding.generate(model, params, ids, mask, use_cache=False, **kw))


@pytest.mark.slow
def test_beam_search_scores_at_least_greedy():
    """Beam search's best hypothesis scores (length-penalised log-prob under the model) at least
    as well as the greedy one, which is among the hypotheses beam search could have kept."""
    model, params = _tiny("encoder_decoder")
    ids = jax.random.randint(jax.random.key(2), (4, 6), 3, 64)
    n, alpha = 10, 0.6
    greedy = np.asarray(decoding.generate(model, params, ids, max_new_tokens=n, eos_id=5))
    _, scores = decoding.beam_search(
        model, params, ids, beam_size=4, max_new_tokens=n, eos_id=5, alpha=alpha, return_all=True
    )

    def score(seqs):
        dec = jnp.concatenate([jnp.zeros((seqs.shape[0], 1), jnp.int32), jnp.asarray(seqs[:, :-1])], axis=1)
        logp = jax.nn.log_softmax(model.apply(params, input_ids=ids, decoder_input_ids=dec).logits)
        tok_logp = np.take_along_axis(np.asarray(logp), seqs[..., None], axis=-1)[..., 0]
        out = []
        for row, lp in zip(seqs, tok_logp):
            length = (list(row).index(5) + 1) if 5 in row else n
            out.append(lp[:length].sum() / decoding.length_penalty(float(length), alpha))
        return np.asarray(out)

    assert np.all(np.asarray(scores)[:, 0] >= score(greedy) - 1e-4)


# ----------------------------------------------------------------------------- end to end
TINY = {
    "model": {
        "family": "encoder_decoder",
        "vocab_size": 400,
        "model_dim": 32,
        "num_heads": 2,
        "mlp_dim": 64,
        "num_layers": 1,
        "position": "sinusoidal",
        "tie_embeddings": True,
        "embed_scale": True,
    },
    "train": {
        "objective": "translate",
        "steps": 6,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "schedule": "inverse_sqrt",
        "label_smoothing": 0.1,
        "log_every": 3,
        "eval_every": 6,
        "eval_steps": 2,
        "checkpoint_every": 6,
    },
    "data": {"source": "files", "seq_len": 24, "split": "train", "eval_split": "validation"},
    "translate": {"eval_examples": 8, "eval_batch_size": 4, "beam_size": 2, "max_decode_len": 10},
}


@pytest.mark.slow
def test_train_then_translate_end_to_end(tmp_path, monkeypatch, capsys):
    from train import translate

    folder = write_translate_folder(tmp_path / "data")
    config = dict(TINY, data=dict(TINY["data"], paths=[folder]))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    workdir = str(tmp_path / "run")
    # what the eval's translator is asked and answers: the hypotheses its BLEU / chrF must score
    from transformer_jax.translation import Translator

    calls, translator_call = [], Translator.__call__

    def spy(self, texts, **kw):
        out = translator_call(self, texts, **kw)
        calls.append((list(texts), kw.get("beam_size") or self.beam_size, out))
        return out

    monkeypatch.setattr(Translator, "__call__", spy)
    code, out, err = run_main(
        translate, ["--config", str(tmp_path / "tiny.yaml"), "--workdir", workdir], monkeypatch, capsys
    )
    monkeypatch.setattr(Translator, "__call__", translator_call)
    assert code == 0, err
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    last = records[-1]
    assert last["step"] == 6 and "eval_bleu" in last and "eval_chrf" in last
    # one eval (step 6): beam search (translate.beam_size, as configured) over the first eval_examples=8
    # validation pairs of the folder; the logged scores are sacrebleu's corpus BLEU / chrF of those
    # translations against the folder's own German lines, computed here
    import sacrebleu

    dev_sources, dev_references = synthetic_pairs(16, seed=1)
    sources, references = dev_sources[:8], dev_references[:8]
    assert [(texts, beam) for texts, beam, _ in calls] == [(sources, 2)]
    hypotheses = calls[0][2]
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score
    # exactly: JSON keeps a float64 as it is
    assert (last["eval_bleu"], last["eval_chrf"]) == (bleu, chrf), (last, bleu, chrf, hypotheses)
    # not a score blind to its references: against the other 8 validation lines both differ
    others = dev_references[8:]
    assert (
        min(
            abs(sacrebleu.corpus_bleu(hypotheses, [others]).score - bleu),
            abs(sacrebleu.corpus_chrf(hypotheses, [others]).score - chrf),
        )
        > 0.01
    )
    assert os.path.isfile(os.path.join(workdir, "tokenizer.model")) and os.path.isdir(
        os.path.join(workdir, "checkpoints")
    )

    lines = ["one two three.", "nine eight.", "", "five."]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not text\n")
    # the real command line, as a user runs it: a file in, translations out, one per line
    proc = run_program(
        "train.translate", ["--checkpoint", workdir, "--input", str(tmp_path / "in.txt"), "--beam", "2"], timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    file_out = proc.stdout.split("\n")[:-1]
    assert len(file_out) == len(lines) and file_out[2] == ""

    code, out, err = run_main(
        translate, ["--checkpoint", workdir, "--beam", "2"], monkeypatch, capsys, stdin="\n".join(lines) + "\n"
    )
    assert code == 0 and out.split("\n")[:-1] == file_out  # stdin: same translations, same order
    code, out, err = run_main(
        translate,
        ["--checkpoint", workdir, "--beam", "1", "--output", str(tmp_path / "out.txt")],
        monkeypatch,
        capsys,
        stdin="one.\n",
    )
    assert code == 0 and len((tmp_path / "out.txt").read_text().split("\n")) == 2
    # --set of runtime keys on top of the checkpoint's config: the same as the flags they stand for
    code, out, err = run_main(
        translate,
        ["--checkpoint", workdir, "--set", "translate.beam_size=2"],
        monkeypatch,
        capsys,
        stdin="\n".join(lines) + "\n",
    )
    assert code == 0 and out.split("\n")[:-1] == file_out, err

    from train import visualize  # the attention of the trained checkpoint (checkpoints/<step>/ restore)

    shown = visualize.visualize(workdir, "one two three.", outdir=str(tmp_path / "attention"))
    assert len(shown["pngs"]) == 3 * 1 * 2 and os.path.isfile(tmp_path / "attention" / "index.html")

    for argv, message in [
        (["--checkpoint", workdir, "--input", str(tmp_path / "nope.txt")], "--input: no such file"),
        (["--checkpoint", str(tmp_path / "nowhere")], "does not exist"),
        (["--checkpoint", str(tmp_path)], "no config.yaml"),
        (["--checkpoint", workdir, "--beam", "0"], "--beam: must be at least 1"),
        (["--checkpoint", workdir, "--input", str(tmp_path / "binary.txt")], "not UTF-8 text"),
        (["--input", "x.txt"], "go with --checkpoint"),
        (
            ["--checkpoint", workdir, "--set", "model.num_layers=2"],
            "model.num_layers: fixed by the model of --checkpoint",
        ),
        (["--checkpoint", str(tmp_path / "nowhere"), "--set", "translate.beam_sz=2"], "translate.beam_sz: unknown key"),
        (["--checkpoint", workdir, "--config", str(tmp_path / "tiny.yaml")], "--config: with --checkpoint"),
        (["--checkpoint", workdir, "--beam", "2", "--set", "translate.beam_size=3"], "--beam: also given"),
        (["--checkpoint", workdir, "--set", "translate.beam_size=0"], "translate.beam_size"),
        (["--config", str(tmp_path / "tiny.yaml"), "--set", "translate.beam_size=0"], "translate.beam_size"),
    ]:
        code, out, err = run_main(translate, argv, monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)


def test_config_rejects_bad_translate_settings():
    base = os.path.join(REPO, "configs", "translate_tiny.yaml")
    for override, key in [
        ("translate.alpha=-1", "translate.alpha"),
        ("translate.target_lang=en", "translate.target_lang"),
        ("translate.eval_batch_size=0", "translate.eval_batch_size"),
        ("model.family=decoder", "train.objective"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(base, [override])
    cfg = load_config(os.path.join(REPO, "configs", "transformer_base_wmt.yaml"))
    assert (
        cfg.model.model_dim,
        cfg.model.num_layers,
        cfg.train.label_smoothing,
        cfg.train.schedule,
        cfg.translate.beam_size,
        cfg.translate.alpha,
    ) == (512, 6, 0.1, "inverse_sqrt", 4, 0.6)
