"""Pre-tokenise a pretraining corpus into ArrayRecord shards (train.pretrain reads them with data.source=prepared).

    python -m train.prepare --config configs/gpt_tiny.yaml --workdir data/stdlib
    python -m train.pretrain --config configs/gpt_tiny.yaml --set data.source=prepared --set data.path=data/stdlib

The corpus, the train/eval split and the tokenizer are those train.pretrain would use with the same
config and a fresh workdir (the tokenizer is trained on the train documents into --workdir, or
data.tokenizer is copied there). Every document is encoded once, without eos; process i of a
multi-process run encodes documents i::n into its own shard, and process 0 writes manifest.json.
A directory that already holds a manifest is never overwritten.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from train import cli
from transformer_jax.config import Config, ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import prepared
from transformer_jax.tasks import text
from transformer_jax.tasks.base import tokenizer_for

CHUNK = 256  # documents encoded per call


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def corpus_description(cfg: Config, documents) -> dict:
    d = cfg.data
    return dict(
        source=d.source,
        name=documents.name,
        paths=list(d.paths),
        tfds_name=d.tfds_name,
        data_dir=d.data_dir,
        split=d.split,
        text_feature=d.text_feature,
        max_documents=d.max_documents,
    )


def prepare(cfg: Config, out_dir: str, *, quiet: bool = False) -> dict:
    """Writes out_dir's shards, tokenizer.model and (process 0) manifest.json; returns the manifest."""
    if cfg.data.source == "prepared":
        raise ConfigError("data.source: train.prepare reads a corpus (embedded, files, tfds), not prepared data")
    manifest_path = os.path.join(out_dir, prepared.MANIFEST)
    if os.path.exists(manifest_path):
        raise ConfigError(
            f"--workdir: {out_dir} already holds prepared data ({prepared.MANIFEST}); choose another directory"
        )
    p, n = jax.process_index(), jax.process_count()
    documents = text.load_corpus(cfg)
    total = len(documents)
    num_eval = text.num_eval_documents(cfg, total)
    eval_indices = corpus_lib.eval_indices(total, num_eval=num_eval, seed=cfg.train.seed)
    train_docs, _ = corpus_lib.train_eval_split(documents, num_eval=num_eval, seed=cfg.train.seed)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = tokenizer_for(cfg, out_dir, train_docs)
    tokenizer_path = os.path.join(out_dir, prepared.TOKENIZER)
    if cfg.data.tokenizer and p == 0 and os.path.abspath(cfg.data.tokenizer) != os.path.abspath(tokenizer_path):
        prepared.copy_atomic(cfg.data.tokenizer, tokenizer_path)

    held = np.zeros(total, bool)
    held[eval_indices] = True
    mine = range(p, total, n)
    stats = dict(records=len(mine), tokens=0, eval_tokens=0)
    bar = tqdm(total=len(mine), desc="tokenising", unit="doc", disable=quiet or p != 0)

    def encoded():
        for start in range(0, len(mine), CHUNK):
            chunk = mine[start : start + CHUNK]
            for g, ids in zip(chunk, tokenizer.encode_batch([documents[g] for g in chunk])):
                stats["tokens"] += len(ids)
                stats["eval_tokens"] += len(ids) if held[g] else 0
                yield ids
            bar.update(len(chunk))

    shard = prepared.shard_name(p, n)
    prepared.write_shard(os.path.join(out_dir, shard), encoded())
    bar.close()
    with open(os.path.join(out_dir, shard + ".json"), "w") as f:
        json.dump(stats, f)
    _sync("prepare: shards written")
    if p != 0:
        return {}
    shards = []
    for i in range(n):
        stats_path = os.path.join(out_dir, prepared.shard_name(i, n) + ".json")
        with open(stats_path) as f:
            shards.append({"file": prepared.shard_name(i, n), **json.load(f)})
        os.remove(stats_path)
    tokens = sum(s["tokens"] for s in shards)
    eval_tokens = sum(s.pop("eval_tokens") for s in shards)
    manifest = {
        "format": prepared.FORMAT,
        "config": cfg.name,
        "corpus": corpus_description(cfg, documents),
        "tokenizer": {
            "file": prepared.TOKENIZER,
            "sha256": prepared.file_sha256(tokenizer_path),
            "vocab_size": tokenizer.vocab_size,
            "from": cfg.data.tokenizer or f"trained on the train documents (model.vocab_size {cfg.model.vocab_size})",
        },
        "documents": {"total": total, "train": total - num_eval, "eval": num_eval},
        "tokens": {"total": tokens, "train": tokens - eval_tokens, "eval": eval_tokens},
        "split": {"seed": cfg.train.seed, "num_eval": num_eval, "eval_indices": [int(i) for i in eval_indices]},
        "eos": False,
        "dtype": "int32 little-endian",
        "process_count": n,
        "layout": prepared.LAYOUT,
        "shards": shards,
    }
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, manifest_path)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(
        __doc__.splitlines()[0],
        workdir="the directory the shards, tokenizer.model and manifest.json go "
        "to (required; never one that holds a manifest)",
    )
    args = p.parse_args(argv)
    cfg, out_dir = cli.config_and_workdir(args)  # config mistakes first, then the missing --workdir
    if not args.workdir:
        raise ConfigError("--workdir: train.prepare needs the directory to write the shards to")
    cli.init_distributed(cfg)  # no mesh: prepare splits documents over processes, not devices
    manifest = prepare(cfg, out_dir)
    if jax.process_index() == 0:
        d, t = manifest["documents"], manifest["tokens"]
        print(
            f"done: {d['total']} documents ({d['train']} train, {d['eval']} eval), {t['total']} tokens, "
            f"vocab {manifest['tokenizer']['vocab_size']}, {len(manifest['shards'])} shard(s) in {out_dir}; "
            f"train with --set data.source=prepared --set data.path={out_dir}"
        )


if __name__ == "__main__":
    cli.main(main)
