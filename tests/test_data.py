"""Corpora, tokenizer and the grain input pipeline. No downloads: TFDS through mock_data and a
tiny builder prepared in a temporary folder."""

import json
import os
import sysconfig

import numpy as np
import pytest

from transformer_jax import objectives as obj
from transformer_jax.data import corpus, pipeline, tokenizer

OBJECTIVES = ("clm", "mlm", "mlm_nsp", "span_corruption")


class FakeTokenizer:
    """Document "i:n" -> tokens 1000 + 100 i + j (j < n): every token names its document and place."""

    pad_id, eos_id, unk_id, bos_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4, 5, 6
    sentinel_ids = np.arange(7, 107, dtype=np.int32)
    special_ids = np.arange(0, 107, dtype=np.int32)

    def __init__(self, num_docs):
        self.vocab_size = 1000 + 100 * num_docs
        self.starts_word = np.ones(self.vocab_size, bool)
        self.ends_word = np.ones(self.vocab_size, bool)

    def encode(self, text):
        i, n = map(int, text.split(":"))
        return [1000 + 100 * i + j for j in range(n)]


def fake_docs(num_docs=40, seed=0):
    lengths = np.random.default_rng(seed).integers(1, 90, num_docs)
    return corpus.from_strings([f"{i}:{n}" for i, n in enumerate(lengths)]), lengths


def doc_of(t):
    return (np.asarray(t) - 1000) // 100


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A small SentencePiece model on a sample of the embedded corpus."""
    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    return tokenizer.train_sentencepiece(corpus.embedded_corpus(), 2000, prefix, max_chars=300_000)


@pytest.fixture(scope="session")
def small_docs():
    docs = corpus.embedded_corpus()
    return docs.select(range(0, len(docs), 10))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- corpora
def test_embedded_corpus_is_the_stdlib_source():
    docs = corpus.embedded_corpus()
    assert len(docs) > 100
    keys = [docs.key(i) for i in range(len(docs))]
    assert keys == sorted(keys) and all(k.endswith(".py") for k in keys)
    assert not any(
        part in ("test", "tests", "idle_test", "site-packages") for k in keys for part in k.split(os.sep)[:-1]
    )
    i = keys.index("json" + os.sep + "decoder.py")
    with open(os.path.join(sysconfig.get_paths()["stdlib"], keys[i]), encoding="utf-8") as f:
        assert docs[i] == f.read()
    assert corpus.embedded_corpus()[i] == docs[i]


def test_local_files_folders_globs_and_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first doc\n\nsecond paragraph\n")
    (tmp_path / "a" / "two.txt").write_text("another file")
    (tmp_path / "a" / "skip.bin").write_text("not text")
    (tmp_path / "b.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two", "x": 1}\n')
    (tmp_path / "n.jsonl").write_text('{"meta": {"body": "nested"}}\n')

    assert list(corpus.local_corpus(str(tmp_path / "a"))) == ["first doc\n\nsecond paragraph\n", "another file"]
    assert list(corpus.local_corpus(str(tmp_path / "a"), txt_unit="paragraph")) == [
        "first doc",
        "second paragraph",
        "another file",
    ]
    assert list(corpus.local_corpus(str(tmp_path / "a" / "one.txt"), txt_unit="line")) == [
        "first doc",
        "second paragraph",
    ]
    assert list(corpus.local_corpus(str(tmp_path / "*.jsonl"), text_field="text")[:2]) == ["json one", "json two"]
    assert list(corpus.local_corpus(str(tmp_path / "n.jsonl"), text_field="meta/body")) == ["nested"]
    both = corpus.get_corpus(f"{tmp_path / 'a' / 'two.txt'},{tmp_path / 'b.jsonl'}")
    assert list(both) == ["another file", "json one", "json two"]
    assert list(corpus.local_corpus(str(tmp_path / "**" / "*.txt"))) == list(corpus.local_corpus(str(tmp_path / "a")))


def test_local_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        corpus.local_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="no files match"):
        corpus.local_corpus(str(tmp_path / "*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        corpus.local_corpus(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        corpus.local_corpus(str(tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="empty"):
        corpus.from_strings([])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no text field 'text'"):
        corpus.local_corpus(str(tmp_path / "bad.jsonl"))[0]


def test_train_eval_split():
    docs, _ = fake_docs(100)
    train, held = corpus.train_eval_split(docs, num_eval=7, seed=3)
    assert len(held) == 7 and len(train) == 93
    assert sorted(list(train) + list(held), key=lambda s: int(s.split(":")[0])) == list(docs)
    assert list(corpus.train_eval_split(docs, num_eval=7, seed=3)[1]) == list(held)
    assert list(corpus.train_eval_split(docs, num_eval=7, seed=4)[1]) != list(held)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_ids_and_round_trip(tok, tmp_path):
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 2000
    assert len({tok.cls_id, tok.sep_id, tok.mask_id}) == 3 and min(tok.cls_id, tok.sep_id, tok.mask_id) > 3
    assert len(tok.sentinel_ids) == 100 and len(set(tok.sentinel_ids.tolist())) == 100
    assert tok.encode("[MASK]")[-1] == tok.mask_id and tok.encode("<extra_id_7>")[-1] == tok.sentinel_ids[7]
    assert set(tok.special_ids.tolist()) >= {0, 1, 2, 3, tok.cls_id, tok.sep_id, tok.mask_id}
    docs = corpus.embedded_corpus()
    for i in range(0, len(docs), 97):
        assert tok.decode(tok.encode(docs[i])) == docs[i]
    odd = "  indented\n\ttab\r\nhéllo wörld 世界 🙂 \x00 end  "
    assert tok.decode(tok.encode(odd)) == odd
    again = tokenizer.Tokenizer(tok.path)
    assert again.encode(docs[3]) == tok.encode(docs[3])
    assert tokenizer.load_or_train_tokenizer(tmp_path, path=tok.path).vocab_size == 2000
    with pytest.raises(ValueError, match="no SentencePiece model"):
        tokenizer.Tokenizer(tmp_path / "nope.model")


def test_tokenizer_training_is_deterministic_and_saved_in_workdir(tmp_path, tok):
    docs = corpus.embedded_corpus()
    t = tokenizer.load_or_train_tokenizer(tmp_path, docs, 2000, max_chars=300_000)
    assert os.path.isfile(tmp_path / "tokenizer.model")
    assert [t.id_to_piece(i) for i in range(t.vocab_size)] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert tokenizer.load_or_train_tokenizer(tmp_path).path == str(tmp_path / "tokenizer.model")  # reused
    with pytest.raises(ValueError, match="too small"):
        tokenizer.train_sentencepiece(docs, 300, tmp_path / "small")
    small = tokenizer.train_sentencepiece(docs, 600, tmp_path / "few", num_sentinels=10, max_chars=100_000)
    assert len(small.sentinel_ids) == 10


def test_default_training_on_the_embedded_corpus_is_fast(tmp_path):
    import time

    t0 = time.time()
    t = tokenizer.train_sentencepiece(corpus.embedded_corpus(), 8000, tmp_path / "tokenizer")
    assert time.time() - t0 < 20
    assert t.vocab_size == 8000 and os.path.isfile(tmp_path / "tokenizer.model")


@pytest.mark.slow
def test_library_imports_without_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, transformer_jax.data, transformer_jax.objectives, transformer_jax.losses; "
        "print(any(m in sys.modules for m in ('tensorflow', 'tensorflow_datasets')))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


# ----------------------------------------------------------------------------- pipeline structure
def _all_clm_rows(docs, fake, **kw):
    ds = pipeline.make_dataset(
        docs, fake, objective="clm", seq_len=16, batch_size=4, num_epochs=1, drop_remainder=False, **kw
    )
    return list(ds)


def test_packing_keeps_documents_apart_and_positions_restart():
    docs, lengths = fake_docs(40)
    fake = FakeTokenizer(len(docs))
    batches = _all_clm_rows(docs, fake, seed=0)
    seen = []
    for b in batches:
        ids, tgt, seg, pos, mask = (b[k] for k in ("input_ids", "targets", "segment_ids", "positions", "loss_mask"))
        for r in range(ids.shape[0]):
            for s in set(seg[r].tolist()) - {0}:
                sel = seg[r] == s
                toks = ids[r][sel]
                real = toks[toks != fake.eos_id]
                assert len(set(doc_of(real).tolist())) <= 1  # one document per segment
                assert np.all(np.diff(real) == 1)  # in order
                np.testing.assert_array_equal(pos[r][sel], np.arange(sel.sum()))  # positions restart
                assert np.all(np.flatnonzero(sel) == np.flatnonzero(sel)[0] + np.arange(sel.sum()))
            # loss only where the target continues the same segment
            ok = mask[r] > 0
            nxt = tgt[r][ok]
            same = (nxt == ids[r][ok] + 1) | (nxt == fake.eos_id)
            assert np.all(same)
            assert np.all(mask[r][seg[r] == 0] == 0)
            seen += ids[r][seg[r] > 0].tolist()
    assert seen.count(fake.eos_id) >= len(docs) - 4  # an eos closes each document


def test_shards_are_disjoint_and_cover_the_data():
    docs, lengths = fake_docs(41)
    fake = FakeTokenizer(len(docs))
    tokens = []
    for p in range(2):
        t = []
        for b in _all_clm_rows(docs, fake, seed=1, process_index=p, process_count=2):
            real = np.concatenate([b["input_ids"][b["segment_ids"] > 0], b["targets"][b["loss_mask"] > 0]])
            t += [int(x) for x in real if x >= 1000]
        tokens.append(set(t))
    d0, d1 = (set(doc_of(list(t)).tolist()) for t in tokens)
    assert d0.isdisjoint(d1) and d0 | d1 == set(range(41))
    for i in range(41):  # every token of every document
        assert all(1000 + 100 * i + j in tokens[i % 2] for j in range(1, lengths[i]))


@pytest.mark.slow
def test_same_seed_same_batches_other_seed_other_batches(small_docs, tok):
    for objective in OBJECTIVES:
        make = lambda seed: pipeline.make_dataset(
            small_docs, tok, objective=objective, seq_len=64, batch_size=4, seed=seed, shuffle_window=16
        )
        a, b, c = take(iter(make(0)), 2), take(iter(make(0)), 2), take(iter(make(1)), 2)
        assert_batches_equal(a, b)
        assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"]), objective


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_state_restore_continues_exactly(small_docs, tok, objective):
    kw = dict(objective=objective, seq_len=64, batch_size=4, seed=3, shuffle_window=16)
    it = iter(pipeline.make_dataset(small_docs, tok, **kw))
    take(it, 5)
    state = json.loads(json.dumps(pipeline.get_state(it)))  # as saved with a checkpoint
    expected = take(it, 4)
    resumed = pipeline.restore(pipeline.make_dataset(small_docs, tok, **kw), state)  # a new process
    assert_batches_equal(take(resumed, 4), expected)


@pytest.mark.slow
def test_state_restore_across_epochs():
    docs, _ = fake_docs(12)
    fake = FakeTokenizer(len(docs))
    ds = pipeline.make_dataset(
        docs, fake, objective="mlm", seq_len=16, batch_size=2, seed=0, num_epochs=3, shuffle_window=4
    )
    full = list(ds)
    it = iter(ds)
    take(it, len(full) // 2)
    rest = list(pipeline.restore(ds, json.loads(json.dumps(it.get_state()))))
    assert_batches_equal(full[len(full) // 2 :], rest)


def test_epochs_repeat_in_a_new_order():
    docs, lengths = fake_docs(30)
    fake = FakeTokenizer(len(docs))
    ds = pipeline.make_dataset(
        docs, fake, objective="clm", seq_len=8, batch_size=1, seed=0, num_epochs=2, shuffle_window=0
    )
    stream = np.concatenate([np.append(b["input_ids"][0], b["targets"][0, -1]) for b in ds])  # the packed rows
    order = doc_of(stream[(stream >= 1000) & (stream % 100 == 0)]).tolist()  # first token of each document
    assert sorted(order) == sorted(list(range(30)) * 2)
    assert order[:30] != order[30:] and order[:30] != sorted(order[:30])


def test_eval_dataset_is_ordered_padded_and_repeatable(small_docs, tok):
    train, held = corpus.train_eval_split(small_docs, num_eval=3)
    ds = pipeline.make_eval_dataset(held, tok, objective="mlm", seq_len=64, batch_size=8)
    a, b = list(ds), list(ds)
    assert_batches_equal(a, b)
    assert all(x["input_ids"].shape == (8, 64) for x in a)
    total = sum(len(tok.encode(d)) + 1 for d in held)
    assert sum(int(x["attention_mask"].sum()) for x in a) == total
    assert np.all(a[-1]["attention_mask"][-1] == 0)  # padded with empty rows


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_batches_have_the_declared_shapes(small_docs, tok, objective):
    b = next(
        iter(pipeline.make_dataset(small_docs, tok, objective=objective, seq_len=64, batch_size=4, shuffle_window=8))
    )
    shapes = pipeline.batch_shapes(objective, seq_len=64, batch_size=4)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == shapes


def test_mlm_pipeline_never_masks_special_tokens(small_docs, tok):
    docs = corpus.from_strings([small_docs[i][:400] + " [MASK] [CLS] <extra_id_3>" for i in range(len(small_docs))])
    it = iter(pipeline.make_dataset(docs, tok, objective="mlm", seq_len=128, batch_size=16, shuffle_window=32))
    chosen = total = 0
    for b in take(it, 4):
        original = np.where(b["mlm_weights"] > 0, b["mlm_targets"], b["input_ids"])
        special = np.isin(original, tok.special_ids)
        assert special.any() and not np.any((b["mlm_weights"] > 0) & special)
        chosen += b["mlm_weights"].sum()
        total += (~special).sum()
    assert abs(chosen / total - 0.15) < 0.01


@pytest.mark.slow
def test_nsp_pipeline_labels_and_layout(small_docs, tok):
    it = iter(pipeline.make_dataset(small_docs, tok, objective="mlm_nsp", seq_len=64, batch_size=32, shuffle_window=64))
    labels = []
    for b in take(it, 12):
        labels += b["nsp_labels"].tolist()
        original = np.where(b["mlm_weights"] > 0, b["mlm_targets"], b["input_ids"])
        for r in range(32):
            n = b["attention_mask"][r].sum()
            row, types = original[r, :n], b["token_type_ids"][r, :n]
            seps = np.flatnonzero(row == tok.sep_id)
            assert row[0] == tok.cls_id and seps[-1] == n - 1 and len(seps) >= 2
            first_sep = seps[-2] if len(seps) == 2 else seps[0]
            np.testing.assert_array_equal(types, (np.arange(n) > first_sep).astype(int))
            assert np.all(b["token_type_ids"][r, n:] == 0)
    assert abs(np.mean(labels) - 0.5) < 0.08, np.mean(labels)  # 384 labels: 3.1 standard deviations


def test_span_corruption_pipeline_reconstructs_documents():
    docs, _ = fake_docs(30)
    fake = FakeTokenizer(len(docs))
    seq_len = 32
    for b in list(
        pipeline.make_dataset(
            docs, fake, objective="span_corruption", seq_len=seq_len, batch_size=4, num_epochs=1, drop_remainder=False
        )
    ):
        for r in range(4):
            n_in, n_tg = b["attention_mask"][r].sum(), int(b["loss_mask"][r].sum())
            if n_in == 0:
                continue
            seq = obj.uncorrupt_spans(b["input_ids"][r, :n_in], b["targets"][r, :n_tg], fake.sentinel_ids)
            # Between the eos separators: runs of consecutive tokens of one document.
            run = []
            for t in seq + [fake.eos_id]:
                if t == fake.eos_id:
                    assert len(set(doc_of(run).tolist())) <= 1 and np.all(np.diff(run) == 1)
                    run = []
                else:
                    run.append(t)


def test_pipeline_errors(small_docs, tok):
    with pytest.raises(ValueError, match="unknown objective"):
        pipeline.make_dataset(small_docs, tok, objective="itm")
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_dataset(small_docs, tok, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="empty"):
        pipeline.make_dataset([], tok)
    with pytest.raises(ValueError, match="cannot feed"):
        pipeline.make_dataset(small_docs[:2], tok, process_index=2, process_count=3)
    with pytest.raises(ValueError, match="sentinels"):
        pipeline.make_dataset(small_docs, tok, objective="span_corruption", seq_len=4096)


# ----------------------------------------------------------------------------- TFDS
tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name", ["lm1b", "c4/en"])
@pytest.mark.slow
def test_tfds_through_mock_data(tmp_path, tok, name):
    with tfds.testing.mock_data(num_examples=12):
        docs = corpus.tfds_corpus(name, data_dir=str(tmp_path), split="train")
        assert len(docs) == 12 and all(isinstance(d, str) and d for d in docs)
        b = next(iter(pipeline.make_dataset(docs, tok, objective="clm", seq_len=32, batch_size=2)))
        assert b["input_ids"].shape == (2, 32)
    with pytest.raises(ValueError, match="not prepared"):  # without the mock: nothing there, no download
        corpus.get_corpus("tfds:" + name, data_dir=str(tmp_path))


def _tiny_builder_cls():
    class TinyText(tfds.core.GeneratorBasedBuilder):
        """A tiny text dataset prepared from memory (no download)."""

        VERSION = tfds.core.Version("1.0.0")
        TEXTS = [f"document {i} " * (i + 1) for i in range(7)]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"content": tfds.features.Text()})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(self.TEXTS), "validation": self._generate_examples(["held"])}

        def _generate_examples(self, texts):
            for i, t in enumerate(texts):
                yield i, {"content": t}

    return TinyText


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny dataset prepared in a temporary data_dir, as ArrayRecord and as TFRecord."""
    cls = _tiny_builder_cls()
    dirs = {}
    for fmt in ("array_record", "tfrecord"):
        dirs[fmt] = str(tmp_path_factory.mktemp(fmt))
        cls(data_dir=dirs[fmt], file_format=fmt).download_and_prepare()
    return cls.TEXTS, dirs


@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
@pytest.mark.slow
def test_tfds_prepared_data_dir(prepared, fmt):
    texts, dirs = prepared
    docs = corpus.tfds_corpus("tiny_text", data_dir=dirs[fmt], text_feature="content")
    assert sorted(docs) == sorted(texts)
    assert list(
        corpus.get_corpus("tfds:tiny_text", data_dir=dirs[fmt], split="validation", text_feature="content")
    ) == ["held"]
    assert len(corpus.tfds_corpus("tiny_text", data_dir=dirs[fmt], text_feature="content", max_documents=3)) == 3


def test_tfds_clear_errors(prepared, tmp_path):
    _, dirs = prepared
    cases = [
        (dict(name="lm1b", data_dir=str(tmp_path / "missing")), r"data_dir .* does not exist"),
        (dict(name="lm1b", data_dir=None), "needs data_dir"),
        (dict(name="no_such_dataset_xyz", data_dir=str(tmp_path)), "no dataset named 'no_such_dataset_xyz'"),
        (dict(name="lm1b", data_dir=str(tmp_path)), "not prepared in data_dir"),
        (dict(name="tiny_text", data_dir=dirs["array_record"], split="test", text_feature="content"), "Unknown split"),
        (dict(name="tiny_text", data_dir=dirs["array_record"]), "no text feature 'text'"),
    ]
    for kw, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            corpus.tfds_corpus(**kw)
        assert "\n" not in str(e.value)
