"""Pre-tokenised corpora: the ArrayRecord shards `python -m train.prepare` writes and
`train.pretrain` reads with `data.source: prepared`, `data.path: DIR`.

    DIR/manifest.json                        what was prepared (corpus, split, tokenizer, shards)
    DIR/tokenizer.model                      the SentencePiece model the documents were encoded with
    DIR/tokens-PPPPP-of-NNNNN.array_record   process P of N: documents P::N in corpus order, one
                                             record each: its token ids (no eos), little-endian int32

Document g of the corpus is record g // N of shard g % N. `open_prepared(DIR)` checks the
manifest, every shard's record count and the tokenizer's hash, and gives random access:
`prepared.tokens[g]` (an int32 array), `prepared.train` / `prepared.eval` (the split train.prepare
made, as train.pretrain would make it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable

import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.data.corpus import LazySequence

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
FORMAT = "transformer-jax prepared tokens v1"
LAYOUT = "document g is record g // process_count of shard g % process_count"


class TokenDocuments(LazySequence):
    """Random-access token arrays: `len(t)`, `t[i] -> np.ndarray` (int32, no eos); `select` gives views."""

    item = "document"


def shard_name(process_index: int, process_count: int) -> str:
    return f"tokens-{process_index:05d}-of-{process_count:05d}.array_record"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_record(ids) -> bytes:
    return np.asarray(ids, "<i4").tobytes()


def decode_record(record: bytes) -> np.ndarray:
    return np.frombuffer(record, "<i4").astype(np.int32)


def write_shard(path: str, token_lists: Iterable) -> None:
    """Writes one record per document to `path` (via a temporary file: a finished shard or none)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # group_size 1: cheap random access
    try:
        for ids in token_lists:
            writer.write(encode_record(ids))
    finally:
        writer.close()
    os.replace(tmp, path)


def _shard_source(path: str):
    import grain

    return grain.sources.ArrayRecordDataSource([path])


def copy_atomic(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class Prepared:
    """An opened, verified prepared directory (see `open_prepared`)."""

    def __init__(self, path: str, manifest: dict, sources: list):
        self.path, self.manifest, self._sources = path, manifest, sources
        self.tokenizer_path = os.path.join(path, TOKENIZER)
        n, count = manifest["documents"]["total"], manifest["process_count"]
        self.tokens = TokenDocuments(
            n, lambda g: decode_record(self._sources[g % count][g // count]), f"prepared:{path}"
        )
        eval_idx = np.asarray(manifest["split"]["eval_indices"], np.int64)
        held = np.zeros(n, bool)
        held[eval_idx] = True
        self.train = self.tokens.select(np.flatnonzero(~held), f"prepared:{path}:train")
        self.eval = self.tokens.select(np.flatnonzero(held), f"prepared:{path}:eval")

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def run_tokenizer(
        self, workdir: str, *, tokenizer_path: str = "", vocab_size: int | None = None, process_index: int = 0
    ):
        """The run's tokenizer: the prepared one. A run that names its own (data.tokenizer) or has one in
        its workdir (resume) must have exactly that one; otherwise process 0 copies it into the workdir
        as tokenizer.model, so resume and the other programs find it."""
        from transformer_jax.data.tokenizer import Tokenizer

        want = self.manifest["tokenizer"]
        if vocab_size is not None and vocab_size < want["vocab_size"]:
            raise ConfigError(
                f"model.vocab_size: {vocab_size} is smaller than the {want['vocab_size']} pieces of "
                f"the tokenizer {self.path} was prepared with ({self.tokenizer_path})"
            )
        in_workdir = os.path.join(workdir, TOKENIZER)
        own = tokenizer_path or (in_workdir if os.path.isfile(in_workdir) else "")
        if own:
            key = "data.tokenizer" if tokenizer_path else "the workdir's tokenizer"
            if not os.path.isfile(own):
                raise ConfigError(f"{key}: no SentencePiece model at {own!r}")
            digest = file_sha256(own)
            if digest != want["sha256"]:
                try:
                    pieces = f"{Tokenizer(own).vocab_size} pieces"
                except Exception:
                    pieces = "not a SentencePiece model"
                raise ConfigError(
                    f"{key}: {own} (sha256 {digest[:12]}, {pieces}) is not the tokenizer {self.path} "
                    f"was prepared with ({self.tokenizer_path}: sha256 {want['sha256'][:12]}, "
                    f"{want['vocab_size']} pieces)"
                )
        elif process_index == 0:
            os.makedirs(workdir, exist_ok=True)
            copy_atomic(self.tokenizer_path, in_workdir)
        return Tokenizer(self.tokenizer_path)

    def __repr__(self) -> str:
        d = self.manifest["documents"]
        return f"Prepared({self.path!r}, {d['train']} train + {d['eval']} eval documents)"


def open_prepared(path: str) -> Prepared:
    """Opens DIR and checks it against its manifest: every shard present with the record count the
    manifest lists, the tokenizer with its hash. Any mismatch is a one-line ConfigError."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ConfigError(
            f"data.path: no {MANIFEST} in {path!r}: write it with python -m train.prepare --workdir {path}"
        )
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        shards, count = manifest["shards"], manifest["process_count"]
        total, tok = manifest["documents"]["total"], manifest["tokenizer"]
        eval_indices = manifest["split"]["eval_indices"]
        tok["sha256"], tok["vocab_size"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.path: {manifest_path} is not a train.prepare manifest: {e}") from e
    if len(shards) != count or sum(s["records"] for s in shards) != total:
        raise ConfigError(
            f"data.path: {manifest_path} lists {len(shards)} shards of "
            f"{sum(s['records'] for s in shards)} records for {count} processes and {total} documents"
        )
    if not all(0 <= int(i) < total for i in eval_indices):
        raise ConfigError(f"data.path: {manifest_path} holds eval indices outside [0, {total})")
    sources = []
    for p, shard in enumerate(shards):
        file = os.path.join(path, shard["file"])
        expected = len(range(p, total, count))
        if shard["records"] != expected:
            raise ConfigError(
                f"data.path: {manifest_path} lists {shard['records']} records for {shard['file']}, "
                f"the layout needs {expected}"
            )
        if not os.path.isfile(file):
            raise ConfigError(f"data.path: shard {file} is missing ({MANIFEST} lists {expected} records)")
        try:
            source = _shard_source(file)
            records = len(source)
        except Exception as e:  # noqa: BLE001 - any reader failure is an unreadable shard
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(
                f"data.path: shard {file} is unreadable (truncated or damaged; prepare {path} again): {why}"
            ) from e
        if records != expected:
            raise ConfigError(
                f"data.path: shard {file} holds {records} records, {MANIFEST} says {expected}: "
                f"truncated or replaced; prepare {path} again"
            )
        sources.append(source)
    tokenizer_path = os.path.join(path, TOKENIZER)
    if not os.path.isfile(tokenizer_path):
        raise ConfigError(f"data.path: {tokenizer_path} is missing (the tokenizer the shards were encoded with)")
    digest = file_sha256(tokenizer_path)
    if digest != tok["sha256"]:
        raise ConfigError(
            f"data.path: {tokenizer_path} (sha256 {digest[:12]}) is not the tokenizer {MANIFEST} "
            f"names (sha256 {tok['sha256'][:12]})"
        )
    return Prepared(path, manifest, sources)
