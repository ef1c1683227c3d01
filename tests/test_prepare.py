"""train.prepare: pre-tokenised ArrayRecord shards give exactly the batches of on-the-fly tokenisation,
and every bad directory is one line of error with nothing overwritten."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from train import prepare, pretrain
from transformer_jax.config import ConfigError, load_config
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import prepared
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.tasks import text
from transformer_jax.tasks.base import tokenizer_for

from helpers import run_program, sets

CORPUS = [
    "data.max_documents=60",
    "data.eval_documents=6",
    "model.vocab_size=512",
    "data.seq_len=64",
    "train.batch_size=4",
    "model.model_dim=64",
    "model.mlp_dim=128",
    "model.num_layers=1",
]


def config(name="gpt_tiny", *extra):
    return load_config(f"configs/{name}.yaml", [*CORPUS, *extra])


def snapshot(*dirs):
    """{path: sha256} of every file under dirs: what must stay untouched."""
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    out[os.path.join(root, f)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def prepared_dir(tokenizer_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "data")
    manifest = prepare.prepare(config("gpt_tiny", f"data.tokenizer={tokenizer_path}"), out, quiet=True)
    assert manifest["documents"] == {"total": 60, "train": 54, "eval": 6}
    return out


def test_manifest_and_records(prepared_dir, tokenizer_path):
    with open(os.path.join(prepared_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["process_count"] == 1 and manifest["shards"][0]["records"] == 60
    assert manifest["tokenizer"]["sha256"] == prepared.file_sha256(tokenizer_path)
    assert manifest["corpus"]["source"] == "embedded" and manifest["corpus"]["max_documents"] == 60
    docs = corpus_lib.get_corpus("embedded", max_documents=60)
    _, held = corpus_lib.train_eval_split(docs, num_eval=6, seed=0)
    assert [docs.key(int(i)) for i in manifest["split"]["eval_indices"]] == [held.key(i) for i in range(6)]
    data = prepared.open_prepared(prepared_dir)
    tok = Tokenizer(tokenizer_path)
    for i in (0, 17, 59):
        assert data.tokens[i].dtype == np.int32 and data.tokens[i].tolist() == tok.encode(docs[i])
    assert sum(len(t) for t in data.tokens) == manifest["tokens"]["total"]
    assert sum(len(t) for t in data.eval) == manifest["tokens"]["eval"]


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_tiny"])
@pytest.mark.slow
def test_prepared_batches_equal_on_the_fly(name, prepared_dir, tokenizer_path, tmp_path):
    _, fly = pretrain.make_task(config(name, f"data.tokenizer={tokenizer_path}"), str(tmp_path / "fly"))
    _, pre = pretrain.make_task(
        config(name, "data.source=prepared", f"data.path={prepared_dir}"), str(tmp_path / "pre")
    )
    # the prepared tokenizer went to the workdir, for resume and the other programs
    assert prepared.file_sha256(str(tmp_path / "pre" / "tokenizer.model")) == prepared.file_sha256(tokenizer_path)
    for _ in range(3):
        a, b = next(fly.train_batches), next(pre.train_batches)
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), (name, k)
    for a, b in zip(fly.eval_batches(), pre.eval_batches()):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
        break


def test_prepare_trains_the_tokenizer_pretrain_would(tmp_path):
    cfg = config("gpt_tiny")
    manifest = prepare.prepare(cfg, str(tmp_path / "data"), quiet=True)
    documents = text.load_corpus(cfg)
    train_docs, _ = corpus_lib.train_eval_split(documents, num_eval=6, seed=0)
    ours = tokenizer_for(cfg, str(tmp_path / "run"), train_docs)
    theirs = Tokenizer(str(tmp_path / "data" / "tokenizer.model"))  # the files differ only in the paths they record
    assert manifest["tokenizer"]["vocab_size"] == ours.vocab_size == theirs.vocab_size
    assert all(
        ours.sp.id_to_piece(i) == theirs.sp.id_to_piece(i) and ours.sp.get_score(i) == theirs.sp.get_score(i)
        for i in range(ours.vocab_size)
    )


def _one_line_error(fn, *needles):
    with pytest.raises(ConfigError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def _broken_copy(prepared_dir, tmp_path, name, damage):
    path = str(tmp_path / name)
    shutil.copytree(prepared_dir, path)
    damage(path)
    return path


def test_bad_directories_are_one_line_errors_leaving_files_untouched(prepared_dir, tmp_path):
    shard = prepared.shard_name(0, 1)

    def truncate(path):
        file = os.path.join(path, shard)
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) // 2)

    def other_tokenizer(path):  # a tokenizer file that is not the one the manifest names
        with open(os.path.join(path, "tokenizer.model"), "ab") as f:
            f.write(b"x")

    def fewer_records(path):  # a readable shard of 59 records where the manifest lists 60
        data = prepared.open_prepared(prepared_dir)
        prepared.write_shard(os.path.join(path, shard), (data.tokens[i] for i in range(59)))

    cases = {
        "no_manifest": (lambda p: os.remove(os.path.join(p, "manifest.json")), ["no manifest.json"]),
        "truncated": (truncate, [shard, "truncated"]),
        "fewer_records": (fewer_records, [shard, "holds 59 records", "says 60"]),
        "missing_shard": (lambda p: os.remove(os.path.join(p, shard)), [shard, "is missing"]),
        "tokenizer_changed": (other_tokenizer, ["tokenizer.model", "is not the tokenizer"]),
    }
    for name, (damage, needles) in cases.items():
        path = _broken_copy(prepared_dir, tmp_path, name, damage)
        workdir = tmp_path / f"run_{name}"
        before = snapshot(path)
        cfg = config("gpt_tiny", "data.source=prepared", f"data.path={path}")
        _one_line_error(lambda: pretrain.make_task(cfg, str(workdir)), *needles)
        assert snapshot(path) == before and not workdir.exists(), name


def test_tokenizer_mismatch_names_both(prepared_dir, tmp_path):
    # a different tokenizer: data.tokenizer, or one already in the workdir (a resumed run)
    other = tmp_path / "other"
    prepare.prepare(config("gpt_tiny", "data.max_documents=40", "data.eval_documents=4"), str(other), quiet=True)
    other_model = str(other / "tokenizer.model")
    prepared_model = os.path.join(prepared_dir, "tokenizer.model")
    cfg = config("gpt_tiny", "data.source=prepared", f"data.path={prepared_dir}", f"data.tokenizer={other_model}")
    workdir = tmp_path / "run"
    _one_line_error(lambda: pretrain.make_task(cfg, str(workdir)), "data.tokenizer", other_model, prepared_model)
    assert not workdir.exists()
    os.makedirs(workdir)
    shutil.copyfile(other_model, workdir / "tokenizer.model")
    before = snapshot(workdir, prepared_dir)
    cfg = config("gpt_tiny", "data.source=prepared", f"data.path={prepared_dir}")
    _one_line_error(
        lambda: pretrain.make_task(cfg, str(workdir)), "workdir", str(workdir / "tokenizer.model"), prepared_model
    )
    cfg = config("gpt_tiny", "data.source=prepared", f"data.path={prepared_dir}", "model.vocab_size=400")
    _one_line_error(lambda: pretrain.make_task(cfg, str(tmp_path / "small")), "model.vocab_size", "400", "512")
    assert snapshot(workdir, prepared_dir) == before


@pytest.mark.slow
def test_cli_refuses_an_existing_manifest_and_a_missing_path(prepared_dir, tokenizer_path, tmp_path):
    before = snapshot(prepared_dir)
    result = run_program(
        "train.prepare",
        [
            "--config",
            "configs/gpt_tiny.yaml",
            "--workdir",
            prepared_dir,
            *sets(CORPUS + [f"data.tokenizer={tokenizer_path}"]),
        ],
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --workdir:") and "already holds" in result.stderr
    assert snapshot(prepared_dir) == before
    with pytest.raises(ConfigError, match="data.path"):
        config("gpt_tiny", "data.source=prepared")


def test_two_processes_write_interleaved_shards(prepared_dir, tokenizer_path, tmp_path, monkeypatch):
    """Process i of 2 encodes documents i::2 into its own shard; process 0 (last here: the sync is a
    no-op in one process) writes the manifest. The documents read back are those of one process."""
    import jax

    out = str(tmp_path / "two")
    cfg = config("gpt_tiny", f"data.tokenizer={tokenizer_path}")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(prepare, "_sync", lambda name: None)
    for index in (1, 0):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        manifest = prepare.prepare(cfg, out, quiet=True)
    assert [s["records"] for s in manifest["shards"]] == [30, 30] and manifest["process_count"] == 2
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", prepared.shard_name(0, 2), prepared.shard_name(1, 2), "tokenizer.model"]
    )
    one, two = prepared.open_prepared(prepared_dir), prepared.open_prepared(out)
    assert all(np.array_equal(one.tokens[i], two.tokens[i]) for i in range(60))
    assert all(np.array_equal(a, b) for a, b in zip(one.eval, two.eval))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_resume_on_prepared_shards_is_exact(workers, prepared_dir, tmp_path):
    """The position after 5 batches, restored in a fresh run (with 0 or 2 grain worker processes):
    the next batches are those an uninterrupted run draws."""
    cfg = config("bert_tiny", "data.source=prepared", f"data.path={prepared_dir}", f"data.workers={workers}")
    _, straight = pretrain.make_task(cfg, str(tmp_path / "a"))
    for _ in range(5):
        next(straight.train_batches)
    state = json.loads(json.dumps(straight.train_batches.get_state()))  # as a checkpoint stores it
    want = [next(straight.train_batches) for _ in range(3)]
    _, resumed = pretrain.make_task(cfg, str(tmp_path / "b"))
    resumed.train_batches.set_state(state)
    for a, b in zip(want, [next(resumed.train_batches) for _ in range(3)]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
